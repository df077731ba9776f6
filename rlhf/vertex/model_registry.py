"""Upload a tuned policy to the Vertex AI Model Registry, served by this project's image, and deploy it.

The serving container runs `rlhf serve`, which reads the artifact Vertex AI copies to `AIP_STORAGE_URI`
(see rlhf/serving.py). Credentials come only from the environment (Application Default Credentials).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.errors import UserError

SERVING_COMMAND = ["rlhf", "serve"]
SERVING_PORT = 8080
HEALTH_ROUTE = "/health"
PREDICT_ROUTE = "/predict"


@dataclass
class RegistrySettings:
    """Where and how the tuned model is registered and served."""

    model_display_name: str  # the model's name in the Model Registry
    serving_container_image: str  # the image that runs `rlhf serve`
    project: str = ""  # empty: the environment's project
    location: str = "us-central1"  # Vertex AI region
    encryption_spec_key_name: str = ""  # Cloud KMS key for the model and endpoint (CMEK); empty: Google-managed
    deploy: bool = False  # also create an endpoint and deploy the model to it
    deploy_machine_type: str = "g2-standard-8"  # the endpoint's machine
    deploy_accelerator_type: str = "NVIDIA_L4"  # its GPU
    deploy_accelerator_count: int = 1  # GPUs per replica
    labels: dict[str, str] = field(default_factory=dict)  # on the model and endpoint
    api_endpoint: str = ""  # empty: Vertex AI's regional endpoint


def upload_and_deploy(artifact_uri: str, settings: RegistrySettings, credentials=None) -> dict:
    """Register the policy at `artifact_uri` (gs://); deploy it when asked. Returns the resource names."""
    from google.cloud import aiplatform

    if not artifact_uri.startswith("gs://"):
        raise UserError(f"{artifact_uri}: the Model Registry takes a gs:// artifact; run the pipeline on Vertex AI "
                         "or copy the policy artifact to Cloud Storage")
    aiplatform.init(project=settings.project or None, location=settings.location, credentials=credentials,
                    encryption_spec_key_name=settings.encryption_spec_key_name or None,
                    api_endpoint=settings.api_endpoint or None,
                    api_transport="rest" if settings.api_endpoint.startswith("http://") else None)
    model = aiplatform.Model.upload(
        display_name=settings.model_display_name, artifact_uri=artifact_uri,
        serving_container_image_uri=settings.serving_container_image,
        serving_container_command=SERVING_COMMAND, serving_container_ports=[SERVING_PORT],
        serving_container_health_route=HEALTH_ROUTE, serving_container_predict_route=PREDICT_ROUTE,
        labels=settings.labels or None, sync=True)
    result = {"model": model.resource_name, "endpoint": None}
    if settings.deploy:
        endpoint = model.deploy(machine_type=settings.deploy_machine_type,
                                accelerator_type=settings.deploy_accelerator_type,
                                accelerator_count=settings.deploy_accelerator_count,
                                min_replica_count=1, max_replica_count=1, sync=True)
        result["endpoint"] = endpoint.resource_name
    return result
