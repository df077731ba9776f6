"""The reward model: `{prompt, completion} -> scalar`, a transformer backbone (+ LoRA) and a linear head.

The score is read at the last real token of each completion, located by the packing (never by searching
for a pad or EOS id: the default model's pad and EOS are the same token).

Artifact layout (safetensors and JSON only):
    reward_model.json      base model reference, LoRA rank, sequence lengths, prompt format, normalisation
    head.safetensors       the scalar head
    adapter/               the LoRA adapter (peft format), when lora_dim > 0
    backbone/              the fully fine-tuned backbone, when lora_dim == 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf.data.prompts import PromptEncoder
from rlhf.errors import UserError
from rlhf.models.artifacts import ModelSpec, read_spec_file, refuse_pickles, save_weights, write_spec
from rlhf.models.loading import Placement, in_float32, load_backbone, load_tokenizer, scalar_head
from rlhf.reward.packing import PackedBatch, pack, packed_length, packing_problem
from rlhf.training.batching import micro_batches
from rlhf.training.distributed import ALONE, Ranks
from rlhf.training.sharding import loading_placement, loading_turn, lockstep, shard_frozen_weights

SPEC_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
FORMAT = "rlhf-reward-model/1"


@dataclass
class RewardModelSpec(ModelSpec):
    """What a later stage needs to load the reward model and feed it the same way it was trained."""

    score_mean: float = 0.0
    score_std: float = 1.0
    format: str = FORMAT
    training: dict = field(default_factory=dict)


def require_exact_packing(backbone, lengths, stage: str = "reward model") -> None:
    """Refuse a backbone for which packing pairs of `lengths`' prompt and completion limits is not exact."""
    problem = packing_problem(backbone.config, lengths.prompt_sequence_length + 2 * lengths.target_sequence_length)
    if problem:
        raise UserError(f"{stage}: {problem}")


class RewardModel(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @classmethod
    def with_new_head(cls, backbone: torch.nn.Module, seed: int) -> RewardModel:
        head = scalar_head(backbone, seed)
        # The pairwise loss sees only score differences, so the bias's gradient is zero up to rounding, and Adam,
        # which divides by the gradient's own scale, would turn that rounding into steps of the full learning rate.
        head.bias.requires_grad_(False)
        return cls(backbone, head)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        """Scores [batch, completions] in float32 (the head runs in float32 whatever the backbone's dtype)."""
        dtype = next(self.backbone.parameters()).dtype
        hidden = self.backbone(input_ids=batch.input_ids, position_ids=batch.position_ids,
                               attention_mask=batch.attention_mask(dtype), use_cache=False).last_hidden_state
        index = batch.last_token[..., None].expand(-1, -1, hidden.shape[-1])
        return self.head(hidden.gather(1, index).float()).squeeze(-1)


@torch.no_grad()
def score_packed(model: RewardModel, prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int,
                 max_tokens: int, in_step: Ranks = ALONE) -> torch.Tensor:
    """Raw scores [rows, completions per row] for prompt rows and their completions, batched by length.
    `in_step`: the ranks the model's weights are sharded over (`rlhf.training.sharding`), each scoring rows of
    its own, in step."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [packed_length(p, c) for p, c in zip(prompts, completions)]
    scores = torch.empty(len(prompts), len(completions[0]) if completions else 0)
    # An idle pass scores the first row again, or a one-token stand-in on a rank without rows.
    idle = ([prompts[0]], [completions[0]]) if prompts else ([[pad_id]], [[[pad_id]]])
    for group in lockstep(micro_batches(lengths, max_tokens), in_step):
        rows = ([prompts[i] for i in group], [completions[i] for i in group]) if group is not None else idle
        scored = model(pack(*rows, pad_id).to(device)).cpu()
        if group is not None:
            scores[group] = scored
    model.train(was_training)
    return scores


def save_reward_model(model: RewardModel, spec: RewardModelSpec, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model.backbone, directory / (ADAPTER_DIR if spec.lora_dim > 0 else BACKBONE_DIR))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, directory / HEAD_FILE)
    write_spec(directory / SPEC_FILE, spec)


def read_spec(directory: Path) -> RewardModelSpec:
    return read_spec_file(directory, SPEC_FILE, RewardModelSpec, FORMAT, "reward model")


@dataclass
class LoadedRewardModel:
    model: RewardModel
    tokenizer: object
    spec: RewardModelSpec

    def encoder(self) -> PromptEncoder:
        return PromptEncoder(self.tokenizer, self.spec.prompt_format(), self.spec.prompt_sequence_length,
                             self.spec.target_sequence_length)

    def normalise(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.spec.score_mean) / self.spec.score_std


def load_reward_model(directory: Path, placement: Placement, base_model_path: str | None = None,
                      in_step: Ranks = ALONE) -> LoadedRewardModel:
    """Load a saved reward model, to score with (no gradients); `base_model_path` overrides resolving the stored
    model reference. `in_step`: the ranks to shard its weights over (`rlhf.training.sharding`), which then score
    together (`score_packed`); loaded on the host first, each keeps its share."""
    from rlhf.models.reference import resolve_model_reference

    directory = Path(directory)
    spec = read_spec(directory)
    refuse_pickles(directory)
    base = base_model_path or resolve_model_reference(spec.large_model_reference)
    tokenizer = load_tokenizer(base)
    loading = loading_placement(placement, in_step.parallel)
    backbone_path = base if spec.lora_dim > 0 else str(directory / BACKBONE_DIR)
    with loading_turn(in_step, in_step.parallel, backbone_path, placement.dtype):
        backbone = load_backbone(backbone_path, loading)
        if spec.lora_dim > 0:
            from peft import PeftModel

            # A loaded reward model only scores: merged once, it runs as a plain backbone, without the adapter's
            # extra products in every layer (in float32 only: a lower precision would round the update away).
            backbone = PeftModel.from_pretrained(backbone, directory / ADAPTER_DIR)
            if in_float32(backbone):
                backbone = backbone.merge_and_unload()
        require_exact_packing(backbone, spec)
        head_weights = load_file(directory / HEAD_FILE)
        head = torch.nn.Linear(head_weights["weight"].shape[1], 1)
        head.load_state_dict(head_weights)
        model = RewardModel(backbone, head)
        model.requires_grad_(False)
        shard_frozen_weights(backbone, in_step, placement.device)
        model.to(placement.device)
    model.eval()
    return LoadedRewardModel(model, tokenizer, spec)
