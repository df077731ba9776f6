"""Reward functions for the RL stage: rows and completion token ids in, one float per completion out."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from rlhf.data.validation import prompt_key
from rlhf.models.loading import Placement
from rlhf.reward.model import load_reward_model, score_packed
from rlhf.reward.packing import packing_problem


class RewardFunction(Protocol):
    name: str

    def __call__(self, rows: list[dict], completions: list[list[int]]) -> torch.Tensor: ...


class RewardModelReward:
    """Scores from a trained reward model, normalised with the mean and std stored at training time."""

    def __init__(self, directory: Path, placement: Placement, base_model_path: str | None = None,
                 max_tokens: int = 4096):
        self.loaded = load_reward_model(directory, placement, base_model_path)
        self.loaded.model.requires_grad_(False)
        self.encoder = self.loaded.encoder()
        self.max_tokens = max_tokens
        self.name = f"reward_model:{Path(directory).resolve()}"
        self._prompt_ids: dict[str, list[int]] = {}

    def _prompt(self, row: dict) -> list[int]:
        key = prompt_key(row)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = self.encoder.encode_prompt(row)
        return self._prompt_ids[key]

    def __call__(self, rows: list[dict], completions: list[list[int]]) -> torch.Tensor:
        """Normalised scores; rows that come in runs of one prompt (rloo's and grpo's k samples) are packed
        with the prompt once, when that is exact for the backbone."""
        limit = self.loaded.spec.target_sequence_length
        prompts = [self._prompt(r) for r in rows]
        group = self._prompt_run(prompts, limit)
        scores = score_packed(self.loaded.model, prompts[::group],
                              [[c[:limit] for c in completions[start:start + group]]
                               for start in range(0, len(rows), group)],
                              self.loaded.tokenizer.pad_token_id, self.max_tokens)
        return self.loaded.normalise(scores.flatten())

    def _prompt_run(self, prompts: list[list[int]], limit: int) -> int:
        """The length of the runs of equal prompts the rows come in, or 1 when they do not all come so."""
        run = next((i for i, p in enumerate(prompts) if p != prompts[0]), len(prompts))
        if run == 1 or len(prompts) % run or any(prompts[i] != prompts[i - i % run] for i in range(len(prompts))):
            return 1
        longest = max(len(p) for p in prompts) + run * limit
        return run if packing_problem(self.loaded.model.backbone.config, longest) is None else 1
