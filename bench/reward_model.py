"""Reward-model training, ours against TRL's RewardTrainer: pairs/s, tokens/s, peak memory, held-out accuracy.

    .venv/bin/python bench/reward_model.py [--steps 6] [--rounds 2]

Both sides train the default model with the same LoRA (rank, alpha, targets, no dropout), learning rate and
schedule, pairs per optimizer step and step count, on the same pre-filtered pairs (one epoch over the
slice), then score the same held-out pairs. Each side runs in its own child process; the sides alternate
(A B, B A, ...) so background load hits both. The first step of every run is warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys

from common import (
    OUR_PYTHON,
    SCRATCH,
    TRL_PYTHON,
    load_average,
    machine,
    model_dir,
    our_versions,
    pair_side,
    run_child,
    spread_text,
    start_comparison,
    trl_versions,
    write_results,
)
from data import preference_slices

NAME = "reward_model"


def settings_from(args) -> dict:
    return {
        "steps": args.steps, "batch_size": args.batch_size, "held_out_pairs": args.held_out_pairs,
        "prompt_length": 512, "target_length": 64, "max_length": 512,
        "lora_rank": 4, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "learning_rate": 1e-3, "warmup_fraction": 0.1, "seed": 0,
        # Pairs per forward pass. TRL pads chosen and rejected to the longest sequence of the micro-batch; ours
        # packs prompt + winner + loser and groups pairs by a token budget that holds about as many pairs.
        "trl_pairs_per_forward": 4, "micro_batch_tokens": 2048,
        "trl_pad_token": "<empty_output>",
    }


def length_baseline(rows: list[dict]) -> float:
    """Held-out accuracy of 'the longer completion wins': what a reward model that learned only length gets."""
    return statistics.mean(float(len(r["chosen_ids"]) > len(r["rejected_ids"])) for r in rows)


WORK_ORDERS = 200  # seeded step orders over which the tokens each side computes are averaged


def computed_tokens_per_pair(rows: list[dict], settings: dict) -> dict[str, float]:
    """Tokens each side runs through the model per pair, padding included, for one epoch of `rows` in steps of
    `batch_size` pairs (the mean over WORK_ORDERS seeded orders: each side draws its own). TRL pads the winner
    and the loser of `trl_pairs_per_forward` pairs to the longest of them; ours packs prompt + winner + loser
    and pads each micro-batch (longest first, `micro_batch_tokens` at most) to its longest pair. Both run the
    same model at about the same rate per token, so the ratio of these is the speed-up to expect from the work
    alone."""
    from rlhf.training.batching import micro_batches

    sequences = [(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    packed = [len(r["chosen_ids"]) + len(r["rejected_ids"]) - len(r["prompt_ids"]) for r in rows]
    batch, per_forward = settings["batch_size"], settings["trl_pairs_per_forward"]
    totals = {"ours": 0, "trl": 0}
    for seed in range(WORK_ORDERS):
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        for start in range(0, len(order), batch):
            step = order[start:start + batch]
            for first in range(0, len(step), per_forward):
                forward = step[first:first + per_forward]
                totals["trl"] += 2 * len(forward) * max(max(sequences[i]) for i in forward)
            lengths = [packed[i] for i in step]
            totals["ours"] += sum(len(group) * lengths[group[0]]
                                  for group in micro_batches(lengths, settings["micro_batch_tokens"]))
    return {side: total / (WORK_ORDERS * len(rows)) for side, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    parser.add_argument("--held-out-pairs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating sides")
    args = parser.parse_args()
    load_at_start = start_comparison(args.steps)

    from rlhf.models.loading import load_tokenizer

    settings = settings_from(args)
    base = model_dir()
    tokenizer = load_tokenizer(base)
    train_rows, held_out_rows = preference_slices(
        tokenizer, args.steps * args.batch_size, args.held_out_pairs, settings["prompt_length"],
        settings["target_length"], settings["max_length"])
    spec = {"model_dir": base, "settings": settings, "train_rows": train_rows, "held_out_rows": held_out_rows}
    sides = {"ours": (OUR_PYTHON, "rm_ours.py", True), "trl": (TRL_PYTHON, "rm_trl.py", False)}

    runs = {"ours": [], "trl": []}
    for round_index in range(args.rounds):
        order = ["ours", "trl"] if round_index % 2 == 0 else ["trl", "ours"]
        for side in order:
            python, worker, ours = sides[side]
            print(f"round {round_index + 1}/{args.rounds}: {side}", file=sys.stderr)
            run = run_child(python, worker, {**spec, "output_dir": str(SCRATCH / f"rm-{side}")}, f"rm-{side}", ours)
            runs[side].append(run)

    # Both sides train on the same pairs (one epoch over the slice), so the mean tokens per pair is shared.
    pair_tokens = statistics.mean(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows)
    packed_tokens = statistics.mean(len(r["chosen_ids"]) + len(r["rejected_ids"]) - len(r["prompt_ids"])
                                    for r in train_rows)
    computed = computed_tokens_per_pair(train_rows, settings)
    sides_result = {side: pair_side(side_runs, args.batch_size, pair_tokens) for side, side_runs in runs.items()}
    ours, trl = sides_result["ours"], sides_result["trl"]
    speedup = ours["pairs_per_second"]["median"] / trl["pairs_per_second"]["median"]
    memory_ratio = ours["peak_rss_gb"] / trl["peak_rss_gb"]
    accuracy_ours, accuracy_trl = statistics.mean(ours["held_out_accuracy"]), statistics.mean(trl["held_out_accuracy"])
    result = {
        "benchmark": NAME, "settings": settings, "rounds": args.rounds,
        "train_pairs": len(train_rows), "held_out_pairs": len(held_out_rows),
        "mean_tokens_per_pair": pair_tokens, "mean_tokens_per_packed_pair": packed_tokens,
        "computed_tokens_per_pair": computed, "work_ratio": computed["trl"] / computed["ours"],
        "length_baseline_accuracy": length_baseline(held_out_rows),
        "ours": ours, "trl": trl,
        "speedup_pairs_per_second": speedup, "peak_memory_ratio": memory_ratio,
        "targets": {"speedup_at_least_3": speedup >= 3.0, "accuracy_not_lower": accuracy_ours >= accuracy_trl,
                    "memory_not_higher": memory_ratio <= 1.0},
        "versions": {"ours": our_versions(), "trl_venv": trl_versions()}, "machine": machine(),
        "load_average_start": load_at_start, "load_average_end": load_average(),
    }
    write_results(NAME, result, markdown(result))


def markdown(r: dict) -> str:
    s = r["settings"]
    rows = []
    for side, label in (("ours", "ours (`train_reward_model`)"), ("trl", f"TRL {r['versions']['trl_venv']['trl']} `RewardTrainer`")):
        x = r[side]
        accuracy = ", ".join(f"{a:.3f}" for a in x["held_out_accuracy"])
        rows.append(f"| {label} | {spread_text(x['pairs_per_second'], 3)} | {spread_text(x['tokens_per_second'], 0)} "
                    f"| {spread_text(x['step_seconds'], 1)} | {x['step_cpu_seconds']['median']:.1f} | {x['peak_rss_gb']:.2f} "
                    f"| {accuracy} |")
    return "\n".join([
        "### Reward-model training",
        "",
        f"{r['train_pairs']} training pairs, {s['steps']} steps of {s['batch_size']} pairs, LoRA r={s['lora_rank']} "
        f"({', '.join(s['lora_targets'])}), lr {s['learning_rate']}, max length {s['max_length']}, "
        f"{r['rounds']} runs per side alternating; median [min–max] over {r['ours']['step_seconds']['n']} timed steps "
        f"per side (first step of each run is warm-up). Held-out: {r['held_out_pairs']} pairs from posts not "
        f"trained on (length baseline {r['length_baseline_accuracy']:.3f}).",
        "",
        "| side | pairs/s | tokens/s | s/step | CPU-s/step | peak RSS (GB) | held-out accuracy (per run) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"**Ours / TRL pairs/s: {r['speedup_pairs_per_second']:.2f}x** (median ratio); peak memory ours / TRL: "
        f"{r['peak_memory_ratio']:.2f}. Tokens/s counts the tokens of both sequences of each pair "
        f"({r['mean_tokens_per_pair']:.0f} per pair on average); packing computes the prompt once, "
        f"{r['mean_tokens_per_packed_pair']:.0f} tokens per pair. With padding, TRL runs "
        f"{r['computed_tokens_per_pair']['trl']:.0f} tokens through the model per pair and ours "
        f"{r['computed_tokens_per_pair']['ours']:.0f} (the mean over {WORK_ORDERS} seeded step orders): "
        f"{r['work_ratio']:.2f}x less work, against which the measured speed-up is "
        f"{r['speedup_pairs_per_second'] / r['work_ratio']:.2f}x per token. Load average start "
        f"{r['load_average_start']}, end {r['load_average_end']}.",
    ])


if __name__ == "__main__":
    main()
