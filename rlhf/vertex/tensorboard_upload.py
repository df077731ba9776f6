"""Copy the training curves (TensorBoard event files) into a Vertex AI TensorBoard instance."""

from __future__ import annotations

import re
import time
from pathlib import Path

from rlhf.errors import UserError
from rlhf.models.artifacts import TENSORBOARD_DIR

_RESOURCE = re.compile(r"projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/tensorboards/(?P<id>\d+)")


def parse_tensorboard(resource: str, project: str, location: str) -> tuple[str, str, str]:
    """(project, location, id) from a full resource name or a bare numeric id."""
    match = _RESOURCE.fullmatch(resource.strip())
    if match:
        return match["project"], match["location"], match["id"]
    if resource.strip().isdigit():
        return project, location, resource.strip()
    raise UserError(f"tensorboard_resource_id={resource!r}: expected a number or "
                     "projects/PROJECT/locations/LOCATION/tensorboards/ID")


def upload_training_curves(runs: dict[str, Path], tensorboard_resource_id: str, project: str, location: str) -> str:
    """One TensorBoard run per artifact (its `tensorboard/` folder) in a new experiment; returns its name."""
    from google.cloud import aiplatform

    project, location, tensorboard_id = parse_tensorboard(tensorboard_resource_id, project, location)
    experiment = f"rlhf-{time.strftime('%Y%m%d-%H%M%S')}"
    for run, artifact in runs.items():
        logdir = artifact / TENSORBOARD_DIR
        if not logdir.is_dir():
            raise FileNotFoundError(f"{logdir}: no TensorBoard logs in the {run} artifact")
        aiplatform.upload_tb_log(tensorboard_id=tensorboard_id, tensorboard_experiment_name=experiment,
                                 logdir=str(logdir), run_name_prefix=f"{run}-", project=project or None,
                                 location=location)
    return experiment
