"""Rollouts: prompts and their completions laid out as one batch, and the masks that say which tokens are real.

Prompts are left-padded so every completion starts at the same column; completions are right-padded, and a
completion ends at its first stop token (EOS, or any id the model's generation config lists as one) whatever
follows it (the pad and EOS ids may be the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """Sequences laid out as [left-padded prompt | completion, right-padded]."""

    sequences: torch.Tensor  # [batch, prompt + completion]
    attention_mask: torch.Tensor  # [batch, prompt + completion]: 1 on real tokens
    completion_mask: torch.Tensor  # [batch, completion]: 1 up to and including the first EOS
    ended: torch.Tensor  # [batch]: the completion ended with EOS within the limit

    def to(self, device: torch.device) -> Rollout:
        return Rollout(self.sequences.to(device), self.attention_mask.to(device), self.completion_mask.to(device),
                       self.ended.to(device))

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.completion_mask.shape[1]

    def rows(self, start: int, stop: int) -> Rollout:
        """Rows `start` to `stop` alone, without the prompt and completion columns that are padding in all of
        them (a pass over them costs what their own longest prompt and completion cost)."""
        mask = self.attention_mask[start:stop]
        first = int(mask[:, :self.prompt_length].any(dim=0).long().argmax())
        # A completion mask is 1 on a prefix of each row: its longest prefix is the columns kept.
        width = int(self.completion_mask[start:stop].sum(dim=1).max())
        end = self.prompt_length + width
        return Rollout(self.sequences[start:stop, first:end], mask[:, first:end],
                       self.completion_mask[start:stop, :width], self.ended[start:stop])

    def completions(self) -> list[list[int]]:
        tokens = self.sequences[:, self.prompt_length:]
        return [row[mask.bool()].tolist() for row, mask in zip(tokens, self.completion_mask)]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return ids, mask


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, :len(row)] = torch.tensor(row)
        mask[index, :len(row)] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of a left-padded row, as generation counts them."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def completion_mask(completions: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first stop token, and whether each row has one at all."""
    is_eos = torch.isin(completions, torch.tensor(list(stop_ids), device=completions.device))
    ended = is_eos.any(dim=1)
    # Tokens strictly after the first EOS are padding, whatever their id (pad and EOS may be the same id).
    after_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_first_eos).long(), ended


def make_rollout(prompts: list[list[int]], completions: list[list[int]], pad_id: int, ended: list[bool]) -> Rollout:
    """A rollout from given token ids, e.g. completions generated elsewhere, to score them."""
    ids, mask = left_pad(prompts, pad_id)
    tokens, keep = right_pad(completions, pad_id)
    return Rollout(torch.cat([ids, tokens], dim=1), torch.cat([mask, keep], dim=1), keep, torch.tensor(ended))
