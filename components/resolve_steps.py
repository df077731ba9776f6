from typing import NamedTuple

from kfp import dsl

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def resolve_steps(
    train_pair_count: int,
    prompt_count: int,
    reward_model_train_steps: int,
    reward_model_train_epochs: int,
    reward_model_batch_size: int,
    reinforcement_learning_train_steps: int,
    reinforcement_learning_train_epochs: int,
    reinforcement_learning_batch_size: int,
    tuning_method: str,
) -> NamedTuple("Steps", reward_model_steps=int, reinforcement_learning_steps=int):
    """Training steps for both stages: from epochs when given (ceil(rows / batch) * epochs), else the steps. The
    policy's rows are the prompts, or the training pairs for DPO."""
    from collections import namedtuple

    from rlhf.training.steps import resolve_stage_steps

    steps = namedtuple("Steps", ["reward_model_steps", "reinforcement_learning_steps"])
    return steps(
        resolve_stage_steps(train_pair_count, reward_model_train_steps, reward_model_train_epochs,
                            reward_model_batch_size, "reward model"),
        resolve_stage_steps(train_pair_count if tuning_method == "dpo" else prompt_count,
                            reinforcement_learning_train_steps, reinforcement_learning_train_epochs,
                            reinforcement_learning_batch_size, "reinforcement learning"),
    )
