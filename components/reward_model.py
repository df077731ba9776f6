from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_reward_model(
    train_pairs: Input[Dataset],
    held_out_pairs: Input[Dataset],
    large_model_reference: str,
    train_steps: int,
    batch_size: int,
    micro_batch_tokens: int,
    learning_rate_multiplier: float,
    lora_dim: int,
    warmup_fraction: float,
    weight_decay: float,
    max_grad_norm: float,
    normalization_pairs: int,
    balance_lengths: bool,
    prompt_sequence_length: int,
    target_sequence_length: int,
    instruction: str,
    plain_text: bool,
    seed: int,
    gradient_checkpointing: bool,
    reward_model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the pairwise reward model; a retry with the same output location resumes from its checkpoint."""
    inputs = dict(locals())
    from pathlib import Path

    from rlhf.data.datasets import read_jsonl
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.reward.training import train_reward_model as train
    from rlhf.training.stopping import Interrupted, StopFlag

    # Each setting is the input of its field's name (the pipeline maps its parameters onto them).
    config = RewardTrainingConfig.from_values({name: inputs[name] for name in RewardTrainingConfig.parameter_names},
                                              plain_text)
    result = train(config, read_jsonl(Path(train_pairs.path)), read_jsonl(Path(held_out_pairs.path)),
                   large_model_reference, Path(reward_model.path), stop_requested=StopFlag().install())
    if result.get("interrupted"):
        raise Interrupted("reward-model training", result["step"])
    reward_model.metadata["large_model_reference"] = large_model_reference
    reward_model.metadata["lora_dim"] = lora_dim
    for name in ("eval_accuracy", "eval_pairs", "final_rank_loss", "final_train_accuracy", "pairs_per_second"):
        if result.get(name) is not None:
            metrics.log_metric(name, result[name])
