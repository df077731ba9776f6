"""A training or bulk-inference stage on several Vertex AI machines (`*_replica_count` above 1): the stage's
component with the same inputs and outputs, whose task runs `rlhf.vertex.custom_job` instead, on a machine
without accelerators.
That starts the stage's own container, with its inputs and outputs as Vertex AI Pipelines filled them in, on
every replica of a custom job with worker pools (as GCPC's `create_custom_training_job_from_component` does),
and waits for it. The pipeline chooses between this and the stage on one machine when it runs.
"""

import copy

import yaml
from google.protobuf import json_format
from kfp import components, dsl

from rlhf.vertex.custom_job import MACHINE_SETTINGS

# The launcher's inputs besides the stage's own (which include `project`): how many machines, what each has
# (`machine_<setting>`, the stage's `<stage>_<setting>` parameters), and where the job runs.
MACHINE_INPUTS = {
    "replica_count": "NUMBER_INTEGER",
    **{f"machine_{name}": "NUMBER_INTEGER" if name == "accelerator_count" else "STRING" for name in MACHINE_SETTINGS},
    "location": "STRING",
    "encryption_spec_key_name": "STRING",
}
LAUNCHER = ["python3", "-m", "rlhf.vertex.custom_job"]


def _input(name: str) -> str:
    return "{{$.inputs.parameters['" + name + "']}}"  # KFP's placeholder for an input parameter's value


def on_replicas(component):
    """`component` (a stage with a `project` input) as a custom job on `replica_count` machines."""
    spec = json_format.MessageToDict(component.pipeline_spec)
    name = spec["pipelineInfo"]["name"]
    launcher = f"{name}-on-replicas"
    # KFP loads a spec as one container (not a graph around one) when its names are the launcher's.
    definition = spec["components"].pop(f"comp-{name}")
    stage = spec["deploymentSpec"]["executors"].pop(f"exec-{name}")["container"]
    parameters = definition["inputDefinitions"]["parameters"]
    assert "project" in parameters and not set(MACHINE_INPUTS) & set(parameters), name
    parameters.update({key: {"parameterType": kind} for key, kind in MACHINE_INPUTS.items()})
    definition["executorLabel"] = f"exec-{launcher}"
    spec["components"][f"comp-{launcher}"] = definition
    spec["deploymentSpec"]["executors"][f"exec-{launcher}"] = {"container": {
        "image": stage["image"],
        "command": LAUNCHER,
        # The job is named after the pipeline run and the stage, as the console lists it beside the run.
        "args": ["--display-name", f"{dsl.PIPELINE_JOB_NAME_PLACEHOLDER}-{name}",
                 "--project", _input("project"), "--location", _input("location"),
                 "--replica-count", _input("replica_count"),
                 *(part for name in MACHINE_SETTINGS for part in (f"--{name.replace('_', '-')}",
                                                                  _input(f"machine_{name}"))),
                 "--encryption-spec-key-name", _input("encryption_spec_key_name"), "--image", stage["image"],
                 # What every replica runs: the stage's command; Vertex AI Pipelines fills in its placeholders
                 # (the executor input, `{{$}}`, holds the inputs and the outputs' Cloud Storage locations).
                 "--", *stage["command"], *stage["args"]],
    }}
    spec["root"]["inputDefinitions"] = copy.deepcopy(definition["inputDefinitions"])
    task = spec["root"]["dag"]["tasks"].pop(name)
    task["inputs"]["parameters"].update({key: {"componentInputParameter": key} for key in MACHINE_INPUTS})
    task["componentRef"]["name"] = f"comp-{launcher}"
    task["taskInfo"]["name"] = launcher
    spec["root"]["dag"]["tasks"][launcher] = task
    spec["pipelineInfo"]["name"] = launcher
    return components.load_component_from_text(yaml.safe_dump(spec))
