"""`rlhf_pipeline`: the DAG, with parameters named as in Google's Vertex AI RLHF pipeline.

Stages built so far: validate the datasets, then resolve the training steps of both stages.
"""

from kfp import dsl

from components.resolve_steps import resolve_steps
from components.validate import validate_datasets


@dsl.pipeline(name="rlhf-pipeline", description="Tune a language model from human preferences.")
def rlhf_pipeline(
    preference_dataset: str,
    prompt_dataset: str = "",
    eval_dataset: str = "",
    on_invalid: str = "fail",
    eval_fraction: float = 0.1,
    seed: int = 0,
    reward_model_train_steps: int = 0,
    reward_model_train_epochs: int = 0,
    reward_model_batch_size: int = 64,
    reinforcement_learning_train_steps: int = 0,
    reinforcement_learning_train_epochs: int = 0,
    reinforcement_learning_batch_size: int = 64,
):
    validated = validate_datasets(
        preference_dataset=preference_dataset, prompt_dataset=prompt_dataset, eval_dataset=eval_dataset,
        on_invalid=on_invalid, eval_fraction=eval_fraction, seed=seed,
    ).set_display_name("validate")
    resolve_steps(
        train_pair_count=validated.outputs["train_pair_count"],
        prompt_count=validated.outputs["prompt_count"],
        reward_model_train_steps=reward_model_train_steps,
        reward_model_train_epochs=reward_model_train_epochs,
        reward_model_batch_size=reward_model_batch_size,
        reinforcement_learning_train_steps=reinforcement_learning_train_steps,
        reinforcement_learning_train_epochs=reinforcement_learning_train_epochs,
        reinforcement_learning_batch_size=reinforcement_learning_batch_size,
    ).set_display_name("resolve steps")
