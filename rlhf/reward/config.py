"""The reward-model stage's settings: one dataclass, the one definition of each (no torch, so the pipeline
compiles without it)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.settings import SHARED_PARAMETERS, PromptSettings, StageSettings

BASE_LEARNING_RATE = 1e-4  # Vertex's reward-model rate; the multiplier scales it


@dataclass
class RewardTrainingConfig(StageSettings, PromptSettings):
    """Hyperparameters of the reward-model stage."""

    stage = "reward model"
    parameter_names = {
        "train_steps": "reward_model_train_steps", "batch_size": "reward_model_batch_size",
        "micro_batch_tokens": "reward_model_micro_batch_tokens",
        "learning_rate_multiplier": "reward_model_learning_rate_multiplier",
        "warmup_fraction": "reward_model_warmup_fraction", "weight_decay": "reward_model_weight_decay",
        "max_grad_norm": "reward_model_max_grad_norm", "lora_dim": "reward_lora_dim",
        "normalization_pairs": "reward_model_normalization_pairs", "balance_lengths": "reward_model_balance_lengths",
        "gradient_checkpointing": "reward_model_gradient_checkpointing",
        "shard_weights": "reward_model_shard_weights", **SHARED_PARAMETERS}

    train_steps: int = 1000  # optimizer steps (the pipeline turns epochs into steps before this)
    batch_size: int = 64  # preference pairs per optimizer step
    micro_batch_tokens: int = 4096  # padded tokens per forward pass; gradient accumulation covers the rest
    learning_rate_multiplier: float = 1.0  # times the base rate 1e-4
    warmup_fraction: float = 0.1  # share of steps with a linear warm-up, then cosine decay to 0
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    lora_dim: int = 4  # LoRA rank; 0 fine-tunes the whole backbone
    seed: int = 0  # data order and head initialisation
    checkpoint_every: int = 50  # steps between checkpoints
    log_every: int = 1  # steps between TensorBoard points
    normalization_pairs: int = 512  # training pairs (a seeded sample) scored after training for the reward mean and std
    balance_lengths: bool = False  # train on a seeded subset where the longer candidate wins half the pairs
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass: less memory, slower
    shard_weights: bool = False  # split the frozen backbone's weights over the stage's processes (FSDP): a model no GPU holds alone

    def learning_rate(self) -> float:
        return BASE_LEARNING_RATE * self.learning_rate_multiplier

    def stage_problems(self, say) -> list[str]:
        found = self.below_one(("train_steps", "batch_size", "micro_batch_tokens", "prompt_sequence_length",
                                "target_sequence_length", "checkpoint_every", "log_every", "normalization_pairs"),
                               say)
        if self.lora_dim < 0:
            found.append(f"{say('lora_dim')} must be 0 (full fine-tuning) or more")
        if self.shard_weights and self.lora_dim == 0:
            found.append(f"{say('shard_weights')} shards frozen weights, and {say('lora_dim')} trains them all: "
                         "shard with a LoRA adapter (lora_dim above 0)")
        return found
