"""The reinforcement-learning stage's settings: one dataclass, the one definition of each (no torch, so the
pipeline compiles without it)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.settings import SHARED_PARAMETERS, PromptSettings, StageSettings

BASE_LEARNING_RATE = 1e-4  # the RL rate for LoRA; reinforcement_learning_rate_multiplier scales it
TUNING_METHODS = ("ppo", "rloo", "grpo", "dpo")  # ppo, rloo, grpo: rlhf/rl/ppo.py; dpo: rlhf/rl/dpo.py
ONLINE_METHODS = ("ppo", "rloo", "grpo")  # sample from the policy and score with the reward model


@dataclass
class PPOConfig(StageSettings, PromptSettings):
    """Hyperparameters of the reinforcement-learning stage."""

    stage = "reinforcement learning"
    parameter_names = {
        "tuning_method": "tuning_method", "samples_per_prompt": "samples_per_prompt",
        "train_steps": "reinforcement_learning_train_steps", "batch_size": "reinforcement_learning_batch_size",
        "micro_batch_size": "reinforcement_learning_micro_batch_size",
        "rollout_micro_batch_size": "reinforcement_learning_rollout_micro_batch_size",
        "ppo_minibatch_size": "reinforcement_learning_minibatch_size",
        "ppo_epochs": "reinforcement_learning_ppo_epochs",
        "learning_rate_multiplier": "reinforcement_learning_rate_multiplier",
        "warmup_fraction": "reinforcement_learning_warmup_fraction", "kl_coeff": "kl_coeff",
        "lora_dim": "policy_lora_dim", "temperature": "temperature", "top_p": "top_p", "gamma": "gamma",
        "lam": "gae_lambda", "clip_range": "clip_range", "value_clip_range": "value_clip_range",
        "value_loss_coeff": "value_loss_coeff", "max_grad_norm": "reinforcement_learning_max_grad_norm",
        "penalize_unfinished": "penalize_unfinished", "unfinished_reward": "unfinished_reward",
        "export_merged": "export_merged_model",
        "gradient_checkpointing": "reinforcement_learning_gradient_checkpointing", "beta": "dpo_beta",
        "sft_steps": "sft_steps", "dpo_warmup_steps": "dpo_warmup_steps", "kl_target": "kl_target",
        "kl_horizon": "kl_horizon", "shard_weights": "reinforcement_learning_shard_weights",
        **SHARED_PARAMETERS}

    tuning_method: str = "ppo"  # ppo (value head, GAE), rloo (leave-one-out), grpo (group-normalised) or dpo (the pairs)
    samples_per_prompt: int = 1  # completions sampled per prompt in a step; rloo and grpo compare them (at least 2)
    sft_steps: int = 0  # supervised steps on the training pairs' winners first (dpo: then its reference)
    dpo_warmup_steps: int = 0  # ppo, rloo, grpo: DPO steps on the training pairs first (beta), instead of sft_steps
    train_steps: int = 1000  # PPO steps (each: one batch of prompts, rollouts, then updates; dpo: one batch of pairs)
    batch_size: int = 64  # prompts per step (each sampled samples_per_prompt times; dpo: preference pairs per step)
    micro_batch_size: int = 8  # rollouts (dpo: pairs) per forward pass with gradients
    rollout_micro_batch_size: int = 0  # rollouts per pass without gradients (sampling, reference, reward); 0: micro_batch_size
    ppo_minibatch_size: int = 32  # rollouts per optimizer step; divides the step's rollouts, a multiple of the micro-batch
    ppo_epochs: int = 2  # passes over each batch of rollouts
    learning_rate_multiplier: float = 1.0  # times the base rate 1e-4
    warmup_fraction: float = 0.1  # share of steps with a linear warm-up, then cosine decay to 0
    kl_coeff: float = 0.1  # weight of the KL(policy || reference) penalty (reference: base, or the warmed-up policy)
    kl_target: float = 0.0  # adaptive KL: nats per completion kl_coeff is steered toward after each step; 0: kl_coeff fixed
    kl_horizon: int = 10000  # adaptive KL: rollouts over which kl_coeff moves by the KL's relative error (clipped at 20%)
    lora_dim: int = 8  # LoRA rank of the policy
    temperature: float = 1.0  # sampling temperature of rollouts
    top_p: float = 1.0  # nucleus sampling of rollouts
    gamma: float = 1.0  # discount over completion tokens
    lam: float = 1.0  # GAE lambda; 1: each token's advantage is the whole return minus its value
    clip_range: float = 0.2  # PPO ratio clipping
    value_clip_range: float = 0.2  # value clipping around the rollout's values
    value_loss_coeff: float = 0.1  # weight of the value loss in the joint loss
    max_grad_norm: float = 1.0  # gradient clipping
    penalize_unfinished: bool = True  # score completions without EOS with unfinished_reward, not the reward model
    unfinished_reward: float = -2.0  # what a completion without EOS scores instead, in normalised units (2 std down)
    seed: int = 0  # data order and sampling
    checkpoint_every: int = 20  # steps between checkpoints
    sample_every: int = 10  # steps between sample completions logged as text
    export_merged: bool = False  # also write base + adapter merged into a plain model directory
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass: less memory, slower
    beta: float = 0.1  # dpo and its warm-up: scale of the implicit reward, beta * log(policy / reference); lower moves further
    shard_weights: bool = False  # split the frozen weights (policy's, reward model's) over the stage's processes (FSDP)

    def warmup_steps(self) -> int:
        """Steps before the method's own: the supervised or the DPO warm-up (`validate` allows one of them)."""
        return self.sft_steps + self.dpo_warmup_steps

    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def micro_batches_per_rollout_pass(self) -> int:
        return max(1, self.rollout_micro_batch_size // self.micro_batch_size)

    def rollouts_per_step(self) -> int:
        return self.batch_size * self.samples_per_prompt

    def pairs_per_step(self) -> int:
        """Preference pairs a step of DPO or of a warm-up takes. A warm-up before PPO, RLOO or GRPO takes as many
        pairs as the method's step takes rollouts, so methods that split those rollouts into other numbers of
        prompts (RLOO and GRPO's k samples of batch / k prompts) start from the same warm-up."""
        return self.batch_size if self.tuning_method == "dpo" else self.rollouts_per_step()

    def updates_per_step(self) -> int:
        """Optimizer steps per PPO step: `validate` makes minibatches whole numbers of micro-batches."""
        return self.ppo_epochs * (self.rollouts_per_step() // self.ppo_minibatch_size)

    def stage_problems(self, say) -> list[str]:
        found = self.below_one(("samples_per_prompt", "train_steps", "batch_size", "micro_batch_size",
                                "ppo_minibatch_size", "ppo_epochs",
                                "prompt_sequence_length", "target_sequence_length", "checkpoint_every",
                                "sample_every"), say)
        if self.lora_dim < 1:
            found.append(f"{say('lora_dim')} must be at least 1: the reference model is the policy with its "
                         "adapter switched off, so the policy needs one")
        if self.tuning_method not in TUNING_METHODS:
            found.append(f"{say('tuning_method')} must be one of {', '.join(TUNING_METHODS)}")
        elif self.tuning_method in ("rloo", "grpo") and self.samples_per_prompt < 2:
            found.append(f"{say('samples_per_prompt')} must be at least 2 for {self.tuning_method}: its baseline is "
                         "the other samples of the same prompt")
        if not found and self.tuning_method in ONLINE_METHODS:
            # As TRL does: a remainder would make some optimizer steps smaller and the schedule miscount them.
            rollouts = self.rollouts_per_step()
            if rollouts % self.micro_batch_size:
                found.append(f"{say('batch_size')} times {say('samples_per_prompt')} ({rollouts} rollouts) must be "
                             f"a multiple of {say('micro_batch_size')}")
            if self.rollout_micro_batch_size < 0 or self.rollout_micro_batch_size % self.micro_batch_size:
                found.append(f"{say('rollout_micro_batch_size')} must be 0 or a multiple of {say('micro_batch_size')}")
            if self.ppo_minibatch_size % self.micro_batch_size or rollouts % self.ppo_minibatch_size:
                found.append(f"{say('ppo_minibatch_size')} must be a multiple of {say('micro_batch_size')} and "
                             f"divide the {rollouts} rollouts of a step")
        if (self.tuning_method == "dpo" or self.dpo_warmup_steps > 0) and self.beta <= 0:
            found.append(f"{say('beta')} must be above 0")
        for name in ("sft_steps", "dpo_warmup_steps"):
            if getattr(self, name) < 0:
                found.append(f"{say(name)} must not be negative")
        if self.dpo_warmup_steps > 0 and self.tuning_method == "dpo":
            found.append(f"{say('dpo_warmup_steps')} is a warm-up before ppo, rloo or grpo; with dpo, set it to 0 and "
                         f"count its steps in {say('train_steps')}")
        if self.dpo_warmup_steps > 0 and self.sft_steps > 0:
            found.append(f"{say('sft_steps')} and {say('dpo_warmup_steps')}: one warm-up or the other, not both")
        if self.kl_coeff < 0:
            found.append(f"{say('kl_coeff')} must not be negative")
        if self.kl_target < 0:
            found.append(f"{say('kl_target')} must not be negative (0 keeps kl_coeff fixed)")
        elif self.kl_target > 0 and self.kl_coeff == 0:
            found.append(f"{say('kl_target')} needs a {say('kl_coeff')} above 0 to start from (the controller "
                         "multiplies it)")
        if self.shard_weights and self.export_merged:
            found.append(f"{say('export_merged')}: a merged copy needs the whole base model in one process, which "
                         f"{say('shard_weights')} splits; merge the adapter afterwards (`peft`'s merge_and_unload)")
        if self.kl_horizon < 1:
            found.append(f"{say('kl_horizon')} must be at least 1")
        found += self.sampling_problems(say)
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                found.append(f"{say(name)} must be from 0 to 1")
        return found
