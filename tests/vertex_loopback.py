"""A loopback HTTP server that plays the parts of the Vertex AI REST API (and Google's OAuth token
endpoint, and Secret Manager's access call) that submit, schedule, upload, deploy, the stages and the custom-job
launcher call, and records every request it gets."""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

ACCESS_TOKEN = "ya29.loopback-access-token-7f3a9c"
API = "type.googleapis.com/google.cloud.aiplatform.v1"


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict
    body: dict | None


def _done(name: str, response: dict) -> dict:
    return {"name": name, "done": True, "response": response}


class VertexLoopback:
    """Answers like Vertex AI: creates echo the resource with a name; long-running operations are done."""

    def __init__(self):
        self.requests: list[Request] = []
        self.resources: dict[str, dict] = {}
        self.secrets: dict[str, str] = {}  # Secret Manager's secret versions by resource name: their values
        # A custom job's states, one more each time it is read after its creation; or `run_custom_job`, which
        # plays the job (its replicas) in a thread and returns its final resource fields.
        self.custom_job_states = ["JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
        self.run_custom_job = None
        self.failing_job_reads = 0  # how many reads of a custom job fail (HTTP 503) before they answer again
        self._pending_states: dict[str, list[str]] = {}
        loopback = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                url = urlsplit(self.path)
                try:
                    body = json.loads(raw) if raw and raw.lstrip()[:1] == b"{" else None
                except ValueError:
                    body = None
                loopback.requests.append(Request(self.command, unquote(url.path), url.query, {k.lower(): v for k, v in self.headers.items()}, body))
                status, answer = loopback.answer(self.command, unquote(url.path), url.query, body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_DELETE = _reply

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def api_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.startswith("/v1/")]

    def answer(self, method: str, path: str, query: str, body: dict | None) -> tuple[int, dict]:
        if path == "/token":
            return 200, {"access_token": ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"}
        parent = path[len("/v1/"):]
        if method == "GET" and parent.endswith(":access"):  # Secret Manager: a secret version's value
            name = parent[: -len(":access")]
            if name not in self.secrets:
                return 404, {"error": {"code": 404, "message": f"Secret [{name}] not found or has no versions."}}
            return 200, {"name": name, "payload": {"data": base64.b64encode(self.secrets[name].encode()).decode()}}
        if method == "GET" and "/customJobs/" in parent and self.failing_job_reads:
            self.failing_job_reads -= 1
            return 503, {"error": {"code": 503, "message": "The service is currently unavailable."}}
        if method == "GET" and self._pending_states.get(parent):
            self.resources[parent]["state"] = self._pending_states[parent].pop(0)
        if method == "GET":
            parent = parent.split("@")[0]  # models/42@1 names version 1 of model 42
            return (200, self.resources[parent]) if parent in self.resources else (404, {"error": {"code": 404}})
        if method == "POST" and parent.endswith("/pipelineJobs"):
            job_id = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("pipelineJobId", "job-1")
            return 200, self._create(f"{parent}/{job_id}", body, state="PIPELINE_STATE_PENDING")
        if method == "POST" and parent.endswith("/customJobs"):
            job = self._create(f"{parent}/{len(self.resources) + 1}", body, state="JOB_STATE_PENDING")
            if self.run_custom_job:
                job["state"] = "JOB_STATE_RUNNING"
                threading.Thread(target=lambda: job.update(self.run_custom_job(job)), daemon=True).start()
            else:
                self._pending_states[job["name"]] = list(self.custom_job_states)
            return 200, job
        if method == "POST" and parent.endswith(":cancel"):
            job = self.resources[parent[: -len(":cancel")]]
            self._pending_states.pop(job["name"], None)
            job["state"] = "JOB_STATE_CANCELLED"
            return 200, {}
        if method == "POST" and parent.endswith("/schedules"):
            return 200, self._create(f"{parent}/1234", body, state="ACTIVE")
        if method == "POST" and parent.endswith("/models:upload"):
            location = parent[: -len("/models:upload")]
            # As Vertex AI reports a model with a custom serving container: dedicated machines only.
            model = self._create(f"{location}/models/42", body["model"], versionId="1",
                                 supportedDeploymentResourcesTypes=["DEDICATED_RESOURCES"])
            return 200, _done(f"{location}/operations/1", {"@type": f"{API}.UploadModelResponse",
                                                           "model": model["name"], "modelVersionId": "1"})
        if method == "POST" and parent.endswith("/endpoints"):
            endpoint = self._create(f"{parent}/7", body or {})
            return 200, _done(f"{parent}/operations/2", {"@type": f"{API}.Endpoint", **endpoint})
        if method == "POST" and parent.endswith(":deployModel"):
            endpoint = parent[: -len(":deployModel")]
            deployed = {**body["deployedModel"], "id": "99"}
            self.resources[endpoint]["deployedModels"] = [deployed]
            return 200, _done(f"{endpoint}/operations/3", {"@type": f"{API}.DeployModelResponse",
                                                           "deployedModel": deployed})
        return 404, {"error": {"code": 404, "message": f"no such method here: {method} {path}"}}

    def _create(self, name: str, body: dict, **extra) -> dict:
        resource = {**body, **extra, "name": name}
        self.resources[name] = resource
        return resource


def write_service_account(path, token_uri: str) -> tuple[str, str]:
    """A made-up service-account key file (a fresh RSA key); returns (the file's text, the key's PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": "loopback-project", "private_key_id": "k1",
            "private_key": pem, "client_email": "runner@loopback-project.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": token_uri}
    path.write_text(json.dumps(info))
    return path.read_text(), pem
