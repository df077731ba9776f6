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
    reward_model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the pairwise reward model; a retry with the same output location resumes from its checkpoint."""
    from pathlib import Path

    from rlhf.data.datasets import read_jsonl
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.reward.training import train_reward_model as train
    from rlhf.settings import chat_template_choice
    from rlhf.training.stopping import Interrupted, StopFlag

    config = RewardTrainingConfig(
        train_steps=train_steps, batch_size=batch_size, micro_batch_tokens=micro_batch_tokens,
        learning_rate_multiplier=learning_rate_multiplier, lora_dim=lora_dim, warmup_fraction=warmup_fraction,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, normalization_pairs=normalization_pairs,
        balance_lengths=balance_lengths, prompt_sequence_length=prompt_sequence_length,
        target_sequence_length=target_sequence_length, instruction=instruction,
        use_chat_template=chat_template_choice(plain_text), seed=seed)
    result = train(config, read_jsonl(Path(train_pairs.path)), read_jsonl(Path(held_out_pairs.path)),
                   large_model_reference, Path(reward_model.path), stop_requested=StopFlag().install())
    if result.get("interrupted"):
        raise Interrupted("reward-model training", result["step"])
    reward_model.metadata["large_model_reference"] = large_model_reference
    reward_model.metadata["lora_dim"] = lora_dim
    for name in ("eval_accuracy", "eval_pairs", "final_rank_loss", "final_train_accuracy", "pairs_per_second"):
        if result.get(name) is not None:
            metrics.log_metric(name, result[name])
