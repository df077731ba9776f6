"""A Hugging Face token for gated hub models (the course's llama-2 and gemma), read from Secret Manager inside
the stage that loads the model: a pipeline parameter names the secret, never holds its value, and the value
goes into no log, artifact or request body.

Secret Manager's REST API through google-auth (already here with google-cloud-aiplatform), with the
environment's credentials: on Vertex AI the job's service account, which needs
`roles/secretmanager.secretAccessor` on the secret.
"""

from __future__ import annotations

import base64
import os
import re

from rlhf.errors import UserError

SECRET_MANAGER = "https://secretmanager.googleapis.com"
HUB_TOKEN_VARIABLE = "HF_TOKEN"  # where huggingface_hub (and so transformers) looks for a token
_FULL_NAME = re.compile(r"projects/[^/]+/secrets/[\w-]+(/versions/(latest|\d+))?")
_SECRET_ID = re.compile(r"[\w-]{1,255}")


def secret_problem(secret: str) -> str | None:
    """What is wrong with a secret's name (a pipeline parameter's check), or None."""
    if _FULL_NAME.fullmatch(secret) or _SECRET_ID.fullmatch(secret):
        return None
    return (f"huggingface_token_secret={secret!r}: expected a secret id (in the job's project) or "
            "projects/PROJECT/secrets/SECRET[/versions/VERSION]")


def secret_version(secret: str, project: str) -> str:
    """The resource name of the version to read: `projects/P/secrets/S[/versions/V]`, or a bare secret id `S`
    in `project`; the latest version unless one is named."""
    problem = secret_problem(secret)
    if problem:
        raise UserError(problem)
    if _FULL_NAME.fullmatch(secret):
        return secret if "/versions/" in secret else f"{secret}/versions/latest"
    if not project:
        raise UserError(f"huggingface_token_secret={secret!r}: a secret id needs a project; give `project` or "
                        "the full name projects/PROJECT/secrets/SECRET")
    return f"projects/{project}/secrets/{secret}/versions/latest"


def read_secret(secret: str, project: str = "", api_endpoint: str = "") -> str:
    """The secret's value, read with the environment's credentials. A refusal names the secret and the
    status, never any part of the value."""
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    credentials, default_project = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    name = secret_version(secret, project or default_project or "")
    response = AuthorizedSession(credentials).get(f"{api_endpoint or SECRET_MANAGER}/v1/{name}:access", timeout=60)
    if response.status_code != 200:
        raise UserError(f"huggingface_token_secret: Secret Manager refused to read {name} (HTTP "
                        f"{response.status_code}); the job's service account needs "
                        "roles/secretmanager.secretAccessor on it")
    return base64.b64decode(response.json()["payload"]["data"]).decode().strip()


def use_hub_token(secret: str, project: str = "", api_endpoint: str = "") -> None:
    """Where a secret is named, its value as this process's hub token, inherited by the processes it starts."""
    if secret:
        os.environ[HUB_TOKEN_VARIABLE] = read_secret(secret, project, api_endpoint)
