"""Which rows go into each step, and how a step's rows are split into forward passes."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def batch_indices(step: int, batch_size: int, rows: int, seed: int) -> list[int]:
    """The pairs of one step: a stream of seeded per-epoch permutations, so any step is known without state."""
    first, last = step * batch_size, (step + 1) * batch_size
    permutations = {}
    indices = []
    for position in range(first, last):
        epoch, offset = divmod(position, rows)
        if epoch not in permutations:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            permutations[epoch] = torch.randperm(rows, generator=generator).tolist()
        indices.append(permutations[epoch][offset])
    return indices


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped, longest first, so each group padded to its longest stays within `max_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current = [], []
    for index in order:
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            groups.append(current)
            current = []
        current.append(index)
    if current:
        groups.append(current)
    return groups
