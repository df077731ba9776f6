"""A training stage's work on this CPU in float32 against bfloat16, in one process: what `RLHF_CPU_PRECISION`
changes (its default, auto, trains in bfloat16 where the CPU has AMX; `rlhf/models/loading.py`).

    .venv/bin/python bench/cpu_precision.py [--repetitions 3]

Three pieces of work, each timed in both precisions one after the other (median of the repetitions after a
warm-up): one reward-model optimizer step and one PPO update, as `bench/efficiency.py` runs them (8 pairs;
4 rollouts), and one sampling pass of the policy at 16 rows x 48 new tokens after the bundled prompts, as PPO
samples: in float32 the adapter folded into the weights, in bfloat16 beside them (a bfloat16 sum would round
a small update away), through the written-out decode step where it applies (the table says where).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import decoding_policy, load_average, machine, model_dir, our_versions, require_data, summary, write_results
from efficiency import policy_update, reward_step, timed

NAME = "cpu_precision"
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLING = {"rows": 16, "new_tokens": 48}


def sampling_pass(dtype: torch.dtype, repetitions: int) -> dict:
    import rlhf.rl.decoding as decoding
    from rlhf.rl.cpu_decode_step import cpu_decode_step

    policy, tokenizer, prompts = decoding_policy(SAMPLING["new_tokens"], SAMPLING["rows"], dtype, adapter_std=0.01)
    with decoding.adapter_merged(policy.model):
        written_out = cpu_decode_step(policy.model, len(prompts)) is not None

    def sample():
        torch.manual_seed(0)
        with decoding.adapter_merged(policy.model):
            decoding.decode(policy.model, prompts, SAMPLING["new_tokens"], [-1], tokenizer.pad_token_id)

    return {"written_out_step": written_out, "seconds": summary(timed(sample, repetitions))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    require_data()
    from rlhf.models.loading import cpu_has_amx

    load_at_start = load_average()
    base = model_dir()
    work = {"reward-model step (8 pairs, LoRA r=4)": lambda dtype: reward_step(base, args.repetitions, dtype),
            "PPO update (4 rollouts, LoRA r=8 + value head)": lambda dtype: policy_update(base, args.repetitions, dtype),
            f"sampling pass ({SAMPLING['rows']} rows x {SAMPLING['new_tokens']} tokens)":
                lambda dtype: sampling_pass(dtype, args.repetitions)}
    results = {}
    started = time.perf_counter()
    for label, run in work.items():
        torch.manual_seed(0)
        results[label] = {name: run(dtype) for name, dtype in PRECISIONS.items()}
    lines = [f"CPU with AMX: {cpu_has_amx()}; {torch.get_num_threads()} torch threads; median of {args.repetitions} "
             "repetitions after a warm-up, both precisions in one process.", "",
             "| work | float32, s | bfloat16, s | speed-up |", "|---|---|---|---|"]
    for label, by_precision in results.items():
        f32, b16 = (by_precision[name]["seconds"]["median"] for name in PRECISIONS)
        lines.append(f"| {label} | {f32:.2f} | {b16:.2f} | {f32 / b16:.2f}x |")
    sampled = next(r for label, r in results.items() if label.startswith("sampling"))
    lines += ["", "Written-out decode step used: " + ", ".join(
        f"{name} {sampled[name]['written_out_step']}" for name in PRECISIONS) + ".",
        "", f"Load average start {load_at_start}, end {load_average()}; {time.perf_counter() - started:.0f} s in all."]
    write_results(NAME, {"machine": machine(), "versions": our_versions(), "cpu_has_amx": cpu_has_amx(),
                         "repetitions": args.repetitions, "results": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
