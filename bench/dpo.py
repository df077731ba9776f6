"""DPO training, ours against TRL's DPOTrainer: pairs/s, tokens/s, peak memory, held-out implicit-reward accuracy.

    .venv/bin/python bench/dpo.py [--steps 6] [--rounds 2]

Both sides train the default model with the same LoRA (rank, alpha, targets, no dropout), beta, learning rate
and schedule, pairs per optimizer step and per forward pass and step count, on the same pre-filtered TL;DR
pairs (one epoch over the slice, so each side computes each pair's reference log-probs once), then measure
the implicit reward's accuracy on the same held-out pairs. A third side is ours with every pair run as two
separate sequences (prompt + winner, prompt + loser), as TRL runs them: what the shared-prefix packing saves.
Each side runs in its own child process; the sides alternate; the first step of every run is warm-up and is
not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import (
    OUR_PYTHON,
    SCRATCH,
    TRL_PREFERENCE_VERSION,
    load_average,
    machine,
    model_dir,
    our_versions,
    pair_side,
    run_child,
    spread_text,
    start_comparison,
    trl_python,
    trl_versions,
    write_results,
)
from data import preference_slices

NAME = "dpo"
SIDES = ("ours", "ours_unpacked", "trl")


def settings_from(args) -> dict:
    return {
        "steps": args.steps, "batch_size": args.batch_size, "held_out_pairs": args.held_out_pairs,
        "pairs_per_forward": 4, "prompt_length": 512, "target_length": 64, "max_length": 576,
        "lora_rank": 8, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "learning_rate": 5e-4, "warmup_fraction": 0.1, "beta": 0.1, "seed": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="preference pairs per optimizer step")
    parser.add_argument("--held-out-pairs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating sides")
    args = parser.parse_args()
    load_at_start = start_comparison(args.steps, TRL_PREFERENCE_VERSION)

    from rlhf.models.loading import load_tokenizer

    settings = settings_from(args)
    base = model_dir()
    tokenizer = load_tokenizer(base)
    train_rows, held_out_rows = preference_slices(
        tokenizer, args.steps * args.batch_size, args.held_out_pairs, settings["prompt_length"],
        settings["target_length"], settings["max_length"])
    spec = {"model_dir": base, "settings": settings, "train_rows": train_rows, "held_out_rows": held_out_rows}
    workers = {"ours": (OUR_PYTHON, "dpo_ours.py", True, {"packed": True}),
               "ours_unpacked": (OUR_PYTHON, "dpo_ours.py", True, {"packed": False}),
               "trl": (trl_python(TRL_PREFERENCE_VERSION), "dpo_trl.py", False, {})}

    runs = {side: [] for side in SIDES}
    for round_index in range(args.rounds):
        order = SIDES if round_index % 2 == 0 else tuple(reversed(SIDES))
        for side in order:
            python, worker, ours, extra = workers[side]
            print(f"round {round_index + 1}/{args.rounds}: {side}", file=sys.stderr)
            runs[side].append(run_child(python, worker, {**spec, **extra, "output_dir": str(SCRATCH / f"dpo-{side}")},
                                        f"dpo-{side}", ours))

    pair_tokens = statistics.mean(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows)
    packed_tokens = statistics.mean(len(r["chosen_ids"]) + len(r["rejected_ids"]) - len(r["prompt_ids"])
                                    for r in train_rows)
    sides_result = {side: pair_side(side_runs, args.batch_size, pair_tokens) for side, side_runs in runs.items()}
    ours, unpacked, trl = (sides_result[side] for side in SIDES)
    speedup = ours["pairs_per_second"]["median"] / trl["pairs_per_second"]["median"]
    packing_speedup = ours["pairs_per_second"]["median"] / unpacked["pairs_per_second"]["median"]
    memory_ratio = ours["peak_rss_gb"] / trl["peak_rss_gb"]
    result = {
        "benchmark": NAME, "settings": settings, "rounds": args.rounds,
        "train_pairs": len(train_rows), "held_out_pairs": len(held_out_rows),
        "mean_tokens_per_pair": pair_tokens, "mean_tokens_per_packed_pair": packed_tokens,
        **sides_result,
        "speedup_pairs_per_second": speedup, "packing_speedup": packing_speedup, "peak_memory_ratio": memory_ratio,
        "targets": {"speedup_at_least_2": speedup >= 2.0, "memory_not_higher": memory_ratio <= 1.0,
                    "packing_faster_than_two_sequences": packing_speedup > 1.0},
        "versions": {"ours": our_versions(), "trl_venv": trl_versions(TRL_PREFERENCE_VERSION)}, "machine": machine(),
        "load_average_start": load_at_start, "load_average_end": load_average(),
    }
    write_results(NAME, result, markdown(result))


def markdown(r: dict) -> str:
    s = r["settings"]
    labels = {"ours": "ours (`train_dpo`, prompt + winner + loser packed)",
              "ours_unpacked": "ours, each pair as two sequences",
              "trl": f"TRL {r['versions']['trl_venv']['trl']} `DPOTrainer`"}
    rows = []
    for side in SIDES:
        x = r[side]
        accuracy = ", ".join(f"{a:.3f}" for a in x["held_out_accuracy"])
        rows.append(f"| {labels[side]} | {spread_text(x['pairs_per_second'], 3)} | "
                    f"{spread_text(x['tokens_per_second'], 0)} | {spread_text(x['step_seconds'], 1)} | "
                    f"{x['step_cpu_seconds']['median']:.1f} | {x['peak_rss_gb']:.2f} | {accuracy} |")
    return "\n".join([
        "### DPO training",
        "",
        f"{r['train_pairs']} TL;DR training pairs, {s['steps']} steps of {s['batch_size']} pairs "
        f"({s['pairs_per_forward']} per forward pass), LoRA r={s['lora_rank']} ({', '.join(s['lora_targets'])}), "
        f"beta {s['beta']}, lr {s['learning_rate']}, {r['rounds']} runs per side alternating; median [min–max] over "
        f"{r['ours']['step_seconds']['n']} timed steps per side (first step of each run is warm-up). Held-out: "
        f"{r['held_out_pairs']} pairs from posts not trained on; accuracy of the implicit reward "
        "beta * log(policy / base).",
        "",
        "| side | pairs/s | tokens/s | s/step | CPU-s/step | peak RSS (GB) | held-out accuracy (per run) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"**Ours / TRL pairs/s: {r['speedup_pairs_per_second']:.2f}x** (median ratio); packed / two sequences: "
        f"{r['packing_speedup']:.2f}x; peak memory ours / TRL: {r['peak_memory_ratio']:.2f}. Tokens/s counts the "
        f"tokens of both sequences of each pair ({r['mean_tokens_per_pair']:.0f} per pair on average); packing "
        f"computes the prompt once, {r['mean_tokens_per_packed_pair']:.0f} tokens per pair. Load average start "
        f"{r['load_average_start']}, end {r['load_average_end']}.",
    ])


if __name__ == "__main__":
    main()
