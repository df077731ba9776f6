from kfp import dsl
from kfp.dsl import Input, Model

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def upload_tensorboard(
    reward_model: Input[Model],
    policy: Input[Model],
    tensorboard_resource_id: str,
    project: str,
    location: str,
):
    """The reward-model and PPO curves into a Vertex AI TensorBoard instance, one run each."""
    from pathlib import Path

    from rlhf.vertex.tensorboard_upload import upload_training_curves

    upload_training_curves({"reward-model": Path(reward_model.path), "policy": Path(policy.path)},
                           tensorboard_resource_id, project, location)
