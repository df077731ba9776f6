"""The fixed data slices the benchmarks feed to both sides, tokenised once with our prompt encoder.

Both sides get the same token ids: TRL gets them pre-tokenised; ours re-encodes the same rows with the same
tokenizer and settings, which gives the same ids. Pairs and prompts that would be truncated or dropped on
either side are filtered out first (RewardTrainer drops, rather than truncates, pairs over `max_length`),
so neither side does work the other skips.
"""

from __future__ import annotations

import random

from common import DATA, DATA_SEED


def encoder(tokenizer, prompt_length: int, target_length: int):
    from rlhf.data.prompts import PromptEncoder, PromptFormat

    return PromptEncoder(tokenizer, PromptFormat(), prompt_length, target_length)


def preference_slices(tokenizer, train_count: int, held_out_count: int, prompt_length: int, target_length: int,
                      max_length: int) -> tuple[list[dict], list[dict]]:
    """`train_count` training and `held_out_count` held-out pairs (split by post), each row with its token ids
    (`prompt_ids`, `chosen_ids`, `rejected_ids`: completions end with EOS) next to the original fields."""
    from rlhf.data.config import DataConfig
    from rlhf.data.datasets import prepare_datasets
    from rlhf.data.validation import chosen, rejected

    # Split by post (866 posts for 928 pairs), so no post is on both sides.
    data = prepare_datasets(str(DATA / "preference.jsonl"), data=DataConfig(eval_fraction=0.25, seed=DATA_SEED))
    coder = encoder(tokenizer, prompt_length, target_length)

    def usable(rows: list[dict], count: int, name: str) -> list[dict]:
        rows = list(rows)
        random.Random(DATA_SEED).shuffle(rows)
        kept = []
        for row in rows:
            prompt = coder.encode_prompt(row)
            winner, loser = coder.encode_completion(chosen(row)), coder.encode_completion(rejected(row))
            fits = (len(prompt) < prompt_length and len(winner) < target_length and len(loser) < target_length
                    and len(prompt) + max(len(winner), len(loser)) <= max_length)
            if fits:
                kept.append({**row, "prompt_ids": prompt, "chosen_ids": prompt + winner, "rejected_ids": prompt + loser})
            if len(kept) == count:
                return kept
        raise SystemExit(f"only {len(kept)} {name} pairs fit the benchmark's lengths; {count} wanted")

    return usable(data.train_pairs, train_count, "training"), usable(data.held_out_pairs, held_out_count, "held-out")


def prompt_slice(tokenizer, count: int, prompt_length: int) -> list[dict]:
    """`count` prompts (a seeded shuffle of prompts.jsonl) that fit `prompt_length` tokens untruncated."""
    from rlhf.data.datasets import read_jsonl

    rows = [{"input_text": r["input_text"]} for r in read_jsonl(DATA / "prompts.jsonl")]
    random.Random(DATA_SEED).shuffle(rows)
    coder = encoder(tokenizer, prompt_length, 1)
    kept = []
    for row in rows:
        ids = coder.encode_prompt(row)
        if len(ids) < prompt_length:
            kept.append({**row, "prompt_ids": ids})
        if len(kept) == count:
            return kept
    raise SystemExit(f"only {len(kept)} prompts fit {prompt_length} tokens; {count} wanted")
