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
    shard_weights: bool,
    processes: int,
    huggingface_token_secret: str,
    project: str,
    reward_model: Output[Model],
    metrics: Output[Metrics],
):
    """Train the pairwise reward model, in one process per accelerator; a retry with the same output location
    resumes from its checkpoint."""
    inputs = dict(locals())
    from rlhf.components.processes import run_stage
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.training.stopping import Interrupted
    from rlhf.vertex.secrets import use_hub_token

    use_hub_token(huggingface_token_secret, project)
    # Each setting is the input of its field's name (the pipeline maps its parameters onto them).
    settings = {name: inputs[name] for name in RewardTrainingConfig.parameter_names}
    result = run_stage("reward_model", processes, settings=settings, plain_text=plain_text,
                       train_pairs=train_pairs.path, held_out_pairs=held_out_pairs.path,
                       large_model_reference=large_model_reference, output=reward_model.path)
    if result.get("interrupted"):
        raise Interrupted("reward-model training", result["step"])
    reward_model.metadata["large_model_reference"] = large_model_reference
    reward_model.metadata["lora_dim"] = lora_dim
    for name in ("eval_accuracy", "eval_pairs", "final_rank_loss", "final_train_accuracy", "pairs_per_second"):
        if result.get(name) is not None:
            metrics.log_metric(name, result[name])
