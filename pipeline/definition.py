"""`rlhf_pipeline`: the DAG, with parameters named as in Google's Vertex AI RLHF pipeline.

Stages built so far: validate the datasets, resolve the training steps of both stages, train the
reward model.
"""

from kfp import dsl

from components.resolve_steps import resolve_steps
from components.reward_model import train_reward_model
from components.validate import validate_datasets


@dsl.pipeline(name="rlhf-pipeline", description="Tune a language model from human preferences.")
def rlhf_pipeline(
    preference_dataset: str,
    large_model_reference: str = "smollm2-135m-instruct",
    prompt_dataset: str = "",
    eval_dataset: str = "",
    on_invalid: str = "fail",
    eval_fraction: float = 0.1,
    seed: int = 0,
    reward_model_train_steps: int = 0,
    reward_model_train_epochs: int = 0,
    reward_model_batch_size: int = 64,
    reward_model_micro_batch_tokens: int = 4096,
    reward_model_learning_rate_multiplier: float = 1.0,
    reward_lora_dim: int = 4,
    reinforcement_learning_train_steps: int = 0,
    reinforcement_learning_train_epochs: int = 0,
    reinforcement_learning_batch_size: int = 64,
    prompt_sequence_length: int = 512,
    target_sequence_length: int = 64,
    instruction: str = "",
    plain_text: bool = False,
):
    validated = validate_datasets(
        preference_dataset=preference_dataset, prompt_dataset=prompt_dataset, eval_dataset=eval_dataset,
        on_invalid=on_invalid, eval_fraction=eval_fraction, seed=seed,
    ).set_display_name("validate")
    steps = resolve_steps(
        train_pair_count=validated.outputs["train_pair_count"],
        prompt_count=validated.outputs["prompt_count"],
        reward_model_train_steps=reward_model_train_steps,
        reward_model_train_epochs=reward_model_train_epochs,
        reward_model_batch_size=reward_model_batch_size,
        reinforcement_learning_train_steps=reinforcement_learning_train_steps,
        reinforcement_learning_train_epochs=reinforcement_learning_train_epochs,
        reinforcement_learning_batch_size=reinforcement_learning_batch_size,
    ).set_display_name("resolve steps")
    train_reward_model(
        train_pairs=validated.outputs["train_pairs"],
        held_out_pairs=validated.outputs["held_out_pairs"],
        large_model_reference=large_model_reference,
        train_steps=steps.outputs["reward_model_steps"],
        batch_size=reward_model_batch_size,
        micro_batch_tokens=reward_model_micro_batch_tokens,
        learning_rate_multiplier=reward_model_learning_rate_multiplier,
        lora_dim=reward_lora_dim,
        prompt_sequence_length=prompt_sequence_length,
        target_sequence_length=target_sequence_length,
        instruction=instruction,
        plain_text=plain_text,
        seed=seed,
    ).set_display_name("train reward model")
