from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def upload_model(
    policy: Input[Model],
    model_display_name: str,
    deploy_model: bool,
    project: str,
    location: str,
    encryption_spec_key_name: str,
    serving_container_image: str,
    deploy_machine_type: str,
    deploy_accelerator_type: str,
    deploy_accelerator_count: int,
    registered_model: Output[Artifact],
) -> NamedTuple("Outputs", model_resource_name=str, endpoint_resource_name=str):
    """The tuned policy into the Vertex AI Model Registry, served by `rlhf serve`; deployed when asked."""
    from collections import namedtuple

    from rlhf.vertex.model_registry import RegistrySettings, upload_and_deploy

    settings = RegistrySettings(
        model_display_name=model_display_name, serving_container_image=serving_container_image, project=project,
        location=location, encryption_spec_key_name=encryption_spec_key_name, deploy=deploy_model,
        deploy_machine_type=deploy_machine_type, deploy_accelerator_type=deploy_accelerator_type,
        deploy_accelerator_count=deploy_accelerator_count)
    names = upload_and_deploy(policy.uri, settings)
    registered_model.metadata["model"] = names["model"]
    if names["endpoint"]:
        registered_model.metadata["endpoint"] = names["endpoint"]
    print(f"Registered {names['model']}" + (f", deployed to {names['endpoint']}" if names["endpoint"] else ""))
    outputs = namedtuple("Outputs", ["model_resource_name", "endpoint_resource_name"])
    return outputs(names["model"], names["endpoint"] or "")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def skip_upload() -> NamedTuple("Outputs", model_resource_name=str, endpoint_resource_name=str):
    """The resource names when no `model_display_name` asks for an upload: none."""
    from collections import namedtuple

    return namedtuple("Outputs", ["model_resource_name", "endpoint_resource_name"])("", "")
