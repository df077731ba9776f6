"""Reward functions for the RL stage: rows and completion token ids in, one float per completion out."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from rlhf.data.validation import prompt_key
from rlhf.models.loading import Placement
from rlhf.reward.model import load_reward_model, score_packed
from rlhf.reward.packing import packing_problem
from rlhf.rl.prefix_cache import PrefixCache, worth_keeping
from rlhf.rl.rollouts import right_pad
from rlhf.training.batching import micro_batches
from rlhf.training.distributed import ALONE, Ranks


class RewardFunction(Protocol):
    name: str

    def __call__(self, rows: list[dict], completions: list[list[int]]) -> torch.Tensor: ...


class RewardModelReward:
    """Scores from a trained reward model, normalised with the mean and std stored at training time."""

    def __init__(self, directory: Path, placement: Placement, base_model_path: str | None = None,
                 max_tokens: int = 4096, in_step: Ranks = ALONE):
        """`in_step`: the ranks to shard the reward model's weights over (`rlhf.training.sharding`), which then
        score every batch together, each its share; loaded on the host first, each keeps its share."""
        self.loaded = load_reward_model(directory, placement, base_model_path, in_step)
        self.in_step = in_step
        self.encoder = self.loaded.encoder()
        self.max_tokens = max_tokens
        self.name = f"reward_model:{Path(directory).resolve()}"
        self._prompt_ids: dict[str, list[int]] = {}
        self.prefixes: PrefixCache | None = None  # the kept prompts, once `keep_prompts` is called

    @classmethod
    def for_stage(cls, directory: Path, config) -> RewardModelReward:
        """What a policy stage with `config` (its `device` and `shard_weights`) scores with."""
        from rlhf.models.loading import pick_placement
        from rlhf.training.distributed import join, local_device

        return cls(Path(directory), pick_placement(local_device(config.device)),
                   in_step=join() if config.shard_weights else ALONE)

    def keep_prompts(self, rows: list[dict], passes: int) -> bool:
        """From now on keep each prompt's keys and values and score only the completions over them
        (rlhf/rl/prefix_cache.py), if `passes` scorings of prompts from `rows` gain by it and it is exact for
        the backbone; returns whether it does."""
        spec, backbone = self.loaded.spec, self.loaded.model.backbone
        dtype = next(backbone.parameters()).dtype
        longest = spec.prompt_sequence_length + spec.target_sequence_length
        # Sharded, the ranks would run the prompts' passes on different cache misses, out of step.
        if (not self.in_step.parallel and worth_keeping(backbone.config, dtype, [self._prompt(r) for r in rows], passes)
                and packing_problem(backbone.config, longest) is None):
            self.prefixes = PrefixCache(backbone)
        return self.prefixes is not None

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
        if self.prefixes is not None:
            return self.loaded.normalise(self._score_over_prefixes(prompts, [c[:limit] for c in completions]))
        group = self._prompt_run(prompts, limit)
        scores = score_packed(self.loaded.model, prompts[::group],
                              [[c[:limit] for c in completions[start:start + group]]
                               for start in range(0, len(rows), group)],
                              self.loaded.tokenizer.pad_token_id, self.max_tokens, self.in_step)
        return self.loaded.normalise(scores.flatten())

    @torch.no_grad()
    def _score_over_prefixes(self, prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        """Raw scores [rows]: the head on the hidden state of each completion's last token, its prompt kept."""
        model = self.loaded.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        scores = torch.empty(len(prompts))
        for rows in micro_batches([len(p) + len(c) for p, c in zip(prompts, completions)], self.max_tokens):
            batch = [completions[i] for i in rows]
            ids, mask = right_pad(batch, self.loaded.tokenizer.pad_token_id)
            hidden = self.prefixes.hidden_states([prompts[i] for i in rows], ids.to(device), mask.to(device))
            # Position 0 is the prompt's last token, so a completion's last token sits at its length.
            last = hidden[torch.arange(len(batch)), torch.tensor([len(c) for c in batch])]
            scores[rows] = model.head(last.float()).squeeze(-1).cpu()
        model.train(was_training)
        return scores

    def _prompt_run(self, prompts: list[list[int]], limit: int) -> int:
        """The length of the runs of equal prompts the rows come in, or 1 when they do not all come so."""
        run = next((i for i, p in enumerate(prompts) if p != prompts[0]), len(prompts))
        if run == 1 or len(prompts) % run or any(prompts[i] != prompts[i - i % run] for i in range(len(prompts))):
            return 1
        longest = max(len(p) for p in prompts) + run * limit
        return run if packing_problem(self.loaded.model.backbone.config, longest) is None else 1
