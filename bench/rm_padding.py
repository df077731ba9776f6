"""Padding in the reward model's training passes: tokens of padding per real token, with each step's pairs
grouped into micro-batches in the order they were drawn (before) and longest first (ours, `micro_batches`),
under the same token budget. Counts only: the tokenizer and the training's own encoding and step batches,
no model.

    python bench/rm_padding.py [--batch-size 64] [--micro-batch-tokens 4096]

Prints one row per dataset (the bundled sample; the course's TL;DR pairs where ../shared/data holds them).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rlhf.data.datasets import read_jsonl, sample_dataset
from rlhf.data.prompts import PromptEncoder
from rlhf.models.loading import load_tokenizer
from rlhf.models.reference import DEFAULT_MODEL, resolve_model_reference
from rlhf.pipeline.local_run import LOCAL_DEFAULTS
from rlhf.reward.config import RewardTrainingConfig
from rlhf.reward.training import encode_pairs
from rlhf.training.batching import batch_indices, micro_batches

TLDR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tldr" / "preference.jsonl"


def in_drawn_order(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Before: the step's pairs as drawn, a new micro-batch whenever the next pair would pass the budget."""
    groups, current = [], []
    for index, length in enumerate(lengths):
        if current and (len(current) + 1) * max(length, *(lengths[i] for i in current)) > max_tokens:
            groups.append(current)
            current = []
        current.append(index)
    return groups + [current] if current else groups


def padding_per_real_token(lengths: list[int], groups: list[list[int]]) -> float:
    real = sum(lengths)
    padded = sum(len(group) * max(lengths[i] for i in group) for group in groups)
    return (padded - real) / real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--micro-batch-tokens", type=int, default=RewardTrainingConfig.micro_batch_tokens)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = load_tokenizer(resolve_model_reference(DEFAULT_MODEL))
    encoder = PromptEncoder.for_settings(tokenizer, RewardTrainingConfig(instruction=LOCAL_DEFAULTS["instruction"]))
    datasets = {"bundled sample": Path(sample_dataset("preference.jsonl"))}
    if TLDR.is_file():
        datasets["TL;DR"] = TLDR
    print(f"| pairs | steps of {args.batch_size} | micro-batch budget | padding per real token, drawn order "
          "| the same, longest first (ours) | micro-batches per step, drawn / ours |")
    print("|---|---|---|---|---|---|")
    for name, path in datasets.items():
        lengths_all = [p.length() for p in encode_pairs(read_jsonl(path), encoder)]
        steps = math.ceil(len(lengths_all) / args.batch_size)
        before, after, passes_before, passes_after, real = 0.0, 0.0, 0, 0, 0
        for step in range(steps):
            lengths = [lengths_all[i] for i in batch_indices(step, args.batch_size, len(lengths_all), args.seed)]
            drawn, ours = in_drawn_order(lengths, args.micro_batch_tokens), micro_batches(lengths, args.micro_batch_tokens)
            before += padding_per_real_token(lengths, drawn) * sum(lengths)
            after += padding_per_real_token(lengths, ours) * sum(lengths)
            passes_before, passes_after, real = passes_before + len(drawn), passes_after + len(ours), real + sum(lengths)
        print(f"| {name}: {len(lengths_all)} | {steps} | {args.micro_batch_tokens} tokens | {before / real:.3f} "
              f"| {after / real:.3f} | {passes_before / steps:.1f} / {passes_after / steps:.1f} |")


if __name__ == "__main__":
    main()
