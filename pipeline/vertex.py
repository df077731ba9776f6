"""Submit `pipeline.yaml` to Vertex AI Pipelines, or schedule it, through google-cloud-aiplatform.

Credentials come only from the environment (Application Default Credentials); a dry run uses none and
touches no network: it prints the exact request body the real call sends.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_LABEL = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_JOB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,127}")


@dataclass
class VertexSettings:
    """Where and how a pipeline job runs on Vertex AI."""

    project: str  # Google Cloud project id
    location: str  # Vertex AI region, e.g. us-central1
    pipeline_root: str  # gs:// folder for the run's artifacts
    display_name: str = "rlhf-pipeline"  # the run's name in the console
    job_id: str = ""  # empty: Vertex AI makes one from the display name and time
    service_account: str = ""  # the run-as service account; empty: the project's default compute account
    network: str = ""  # VPC network to peer with, projects/NUMBER/global/networks/NAME
    labels: dict[str, str] = field(default_factory=dict)  # on the job (and the schedule's jobs)
    enable_caching: bool | None = None  # None: as compiled (on); False reruns every stage
    encryption_spec_key_name: str = ""  # Cloud KMS key (CMEK) for the job and its artifacts
    image: str = ""  # container image for every component; empty: the one compiled into the YAML
    api_endpoint: str = ""  # empty: Vertex AI's regional endpoint


@dataclass
class ScheduleSettings:
    """When a scheduled pipeline runs."""

    cron: str  # cron expression, optionally prefixed with TZ=Area/City
    display_name: str = "rlhf-pipeline-schedule"  # the schedule's name in the console
    start_time: str = ""  # RFC 3339; empty: now
    end_time: str = ""  # RFC 3339; empty: never
    max_concurrent_run_count: int = 1  # runs at once
    max_run_count: int = 0  # 0: no limit
    allow_queueing: bool = False  # queue runs beyond max_concurrent_run_count instead of skipping them


def check_settings(settings: VertexSettings, schedule: ScheduleSettings | None = None) -> list[str]:
    """Every problem with the settings, one line each."""
    problems = []
    if not settings.project:
        problems.append("--project is required (or set GOOGLE_CLOUD_PROJECT)")
    if not settings.location:
        problems.append("--location is required")
    if not settings.pipeline_root:
        problems.append("--pipeline-root is required: a gs://BUCKET/PATH folder for the run's artifacts")
    elif not re.fullmatch(r"gs://[a-z0-9][a-z0-9._-]{1,221}(/.*)?", settings.pipeline_root):
        problems.append(f"--pipeline-root {settings.pipeline_root!r}: expected gs://BUCKET/PATH")
    if settings.job_id and not _JOB_ID.fullmatch(settings.job_id):
        problems.append(f"--job-id {settings.job_id!r}: lowercase letters, digits and hyphens, at most 128")
    for key, value in settings.labels.items():
        if not _LABEL.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
            problems.append(f"--label {key}={value}: keys start with a lowercase letter; keys and values hold "
                            "lowercase letters, digits, _ and -, at most 63")
    if settings.encryption_spec_key_name and not re.fullmatch(
            r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+", settings.encryption_spec_key_name):
        problems.append(f"--encryption-spec-key-name {settings.encryption_spec_key_name!r}: expected "
                        "projects/P/locations/L/keyRings/R/cryptoKeys/K")
    if schedule is not None:
        fields = schedule.cron.split()
        if fields and fields[0].startswith(("TZ=", "CRON_TZ=")):
            fields = fields[1:]
        if len(fields) != 5:
            problems.append(f"--cron {schedule.cron!r}: expected five fields (minute hour day month weekday)")
        if schedule.max_concurrent_run_count < 1:
            problems.append("--max-concurrent-runs must be at least 1")
        if schedule.max_run_count < 0:
            problems.append("--max-runs must not be negative (0: no limit)")
    return problems


def pipeline_spec_with_image(template: Path, image: str) -> Path:
    """A copy of the compiled pipeline whose components all run in `image`."""
    spec = yaml.safe_load(template.read_text())
    for executor in spec["deploymentSpec"]["executors"].values():
        executor["container"]["image"] = image
    copied = Path(tempfile.mkdtemp(prefix="rlhf-submit-")) / template.name
    copied.write_text(yaml.safe_dump(spec, sort_keys=False))
    return copied


def build_job(template: Path, parameters: dict, settings: VertexSettings):
    """The job's request body (a proto message), built by aiplatform's PipelineJob from the template.

    No credentials are needed to build it; nothing is sent.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform
    from google.cloud.aiplatform_v1 import types
    from google.protobuf import json_format

    if settings.image:
        template = pipeline_spec_with_image(template, settings.image)
    job = aiplatform.PipelineJob(
        display_name=settings.display_name, template_path=str(template), job_id=settings.job_id or None,
        pipeline_root=settings.pipeline_root, parameter_values=parameters, enable_caching=settings.enable_caching,
        encryption_spec_key_name=settings.encryption_spec_key_name or None, labels=settings.labels or None,
        project=settings.project, location=settings.location, credentials=AnonymousCredentials())
    body = types.PipelineJob()
    json_format.ParseDict(job.to_dict(), body._pb)
    if settings.service_account:
        body.service_account = settings.service_account
    if settings.network:
        body.network = settings.network
    return body, job.job_id


def schedule_body(job_body, settings: VertexSettings, schedule: ScheduleSettings):
    """The schedule's request body: when to run, and the job each run creates."""
    from google.cloud.aiplatform_v1 import types

    job = types.PipelineJob(
        runtime_config=job_body.runtime_config, pipeline_spec=job_body.pipeline_spec, labels=job_body.labels,
        encryption_spec=job_body.encryption_spec, service_account=job_body.service_account, network=job_body.network)
    return types.Schedule(
        display_name=schedule.display_name, cron=schedule.cron,
        max_concurrent_run_count=schedule.max_concurrent_run_count, max_run_count=schedule.max_run_count or None,
        allow_queueing=schedule.allow_queueing, start_time=schedule.start_time or None,
        end_time=schedule.end_time or None,
        create_pipeline_job_request=types.CreatePipelineJobRequest(parent=_parent(settings), pipeline_job=job))


def as_json(message) -> dict:
    """A request body as the REST API receives it."""
    from google.protobuf import json_format

    return json_format.MessageToDict(type(message).pb(message))


def _parent(settings: VertexSettings) -> str:
    return f"projects/{settings.project}/locations/{settings.location}"


def _client_options(settings: VertexSettings) -> dict:
    endpoint = settings.api_endpoint or f"{settings.location}-aiplatform.googleapis.com"
    options = {"client_options": {"api_endpoint": endpoint}}
    if endpoint.startswith("http://"):
        options["transport"] = "rest"
    return options


def submit(job_body, job_id: str, settings: VertexSettings) -> str:
    """Create the pipeline job with the environment's credentials; returns its resource name."""
    from google.cloud.aiplatform_v1 import PipelineServiceClient

    client = PipelineServiceClient(**_client_options(settings))
    created = client.create_pipeline_job(parent=_parent(settings), pipeline_job=job_body, pipeline_job_id=job_id)
    return created.name


def create_schedule(body, settings: VertexSettings) -> str:
    """Create the schedule with the environment's credentials; returns its resource name."""
    from google.cloud.aiplatform_v1 import ScheduleServiceClient

    client = ScheduleServiceClient(**_client_options(settings))
    return client.create_schedule(parent=_parent(settings), schedule=body).name
