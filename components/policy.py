from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_policy(
    prompts: Input[Dataset],
    reward_model: Input[Model],
    train_pairs: Input[Dataset],
    held_out_pairs: Input[Dataset],
    large_model_reference: str,
    tuning_method: str,
    samples_per_prompt: int,
    sft_steps: int,
    dpo_warmup_steps: int,
    train_steps: int,
    batch_size: int,
    micro_batch_size: int,
    rollout_micro_batch_size: int,
    ppo_minibatch_size: int,
    ppo_epochs: int,
    learning_rate_multiplier: float,
    kl_coeff: float,
    kl_target: float,
    kl_horizon: int,
    lora_dim: int,
    temperature: float,
    top_p: float,
    warmup_fraction: float,
    gamma: float,
    lam: float,
    clip_range: float,
    value_clip_range: float,
    value_loss_coeff: float,
    max_grad_norm: float,
    penalize_unfinished: bool,
    unfinished_reward: float,
    prompt_sequence_length: int,
    target_sequence_length: int,
    instruction: str,
    plain_text: bool,
    seed: int,
    export_merged: bool,
    gradient_checkpointing: bool,
    shard_weights: bool,
    beta: float,
    processes: int,
    huggingface_token_secret: str,
    project: str,
    policy: Output[Model],
    metrics: Output[Metrics],
):
    """PPO, RLOO or GRPO against the reward model, or DPO on the training pairs (`tuning_method`), after a
    warm-up on the training pairs (`sft_steps` or `dpo_warmup_steps`), in one process per accelerator; a retry
    with the same output location resumes from its checkpoint."""
    inputs = dict(locals())
    from rlhf.components.processes import run_stage
    from rlhf.rl.config import PPOConfig
    from rlhf.training.stopping import Interrupted
    from rlhf.vertex.secrets import use_hub_token

    use_hub_token(huggingface_token_secret, project)
    # Each setting is the input of its field's name (the pipeline maps its parameters onto them).
    settings = {name: inputs[name] for name in PPOConfig.parameter_names}
    result = run_stage("policy", processes, settings=settings, plain_text=plain_text, prompts=prompts.path,
                       reward_model=reward_model.path, train_pairs=train_pairs.path,
                       held_out_pairs=held_out_pairs.path, large_model_reference=large_model_reference,
                       output=policy.path)
    if result.get("interrupted"):
        raise Interrupted(tuning_method.upper(), result["step"])
    policy.metadata["large_model_reference"] = large_model_reference
    for name in ("final_reward", "final_kl", "initial_reward", "episodes_per_second", "final_dpo_loss",
                 "final_sft_loss", "final_dpo_warmup_loss", "eval_accuracy", "pairs_per_second"):
        if result.get(name) is not None:
            metrics.log_metric(name, result[name])
