"""A decode step of the default model through its own forward pass against the written-out CPU step
(`rlhf/rl/cpu_decode_step.py`), alternated in one process, against the machine's read bandwidth.

    .venv/bin/python bench/decode_step.py [--repeats 3]

The policy (the default model with a seeded LoRA adapter, merged while decoding, as PPO samples) decodes 48
new tokens after the bundled prompts at 4, 8 and 16 rows, no stop token honoured; a step's time is that of
the whole decode less that of a one-token decode (the prefill, which both ways run through the model), over
the 47 steps after it. The written-out way's time includes reordering the weights (once per decode), which
is also given on its own. A decode step reads every weight once, so the read bandwidth (a sum over 400 MB,
measured in the same run) bounds it from below: the table gives each way's share of that bound. Both ways
decode the same prompts greedily once, to show they agree.

A third way, the written-out step in bfloat16 (as a training stage samples on a CPU with AMX: the same
seeded adapter beside the weights, its low-rank term added in the step), is timed in the same rounds and
put against its own bound: its weights' bytes, half the float32 ones.
"""

from __future__ import annotations

import argparse
import time

from common import alternated, decoding_policy, load_average, machine, our_versions, summary, write_results

NAME = "decode_step"
ROWS = (4, 8, 16)
NEW_TOKENS = 48
WAYS = ("forward pass", "written out")
BFLOAT16_WAY = "written out, bfloat16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each way, after one warm-up")
    args = parser.parse_args()

    import torch

    import rlhf.rl.decoding as decoding
    from rlhf.rl.cpu_decode_step import cpu_decode_step

    load_at_start = load_average()
    policies = {}
    for dtype in (torch.float32, torch.bfloat16):
        policies[dtype], tokenizer, prompts = decoding_policy(NEW_TOKENS, max(ROWS), dtype, adapter_std=0.01)
    policy = policies[torch.float32]
    weight_bytes = sum(m.weight.numel() * 4 for name, m in policy.model.named_modules()
                       if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    step_for = {"forward pass": lambda model, rows: None, "written out": cpu_decode_step,
                BFLOAT16_WAY: cpu_decode_step}

    def run(way: str, rows: int, new_tokens: int, greedy: bool = False):
        decoding.cpu_decode_step = step_for[way]
        model = policies[torch.bfloat16 if way == BFLOAT16_WAY else torch.float32].model
        with decoding.adapter_merged(model):
            return decoding.decode(model, prompts[:rows], new_tokens, [-1], tokenizer.pad_token_id, greedy=greedy)

    agreement = {}
    greedy = {way: run(way, 4, NEW_TOKENS, greedy=True) for way in WAYS}
    agreement["same greedy tokens"] = bool(torch.equal(greedy[WAYS[0]].rollout.sequences,
                                                       greedy[WAYS[1]].rollout.sequences))
    agreement["largest log-prob difference"] = float((greedy[WAYS[0]].log_probs - greedy[WAYS[1]].log_probs).abs().max())

    def measure(way: str) -> dict:
        seconds = {}
        for rows in ROWS:
            started = time.perf_counter()
            run(way, rows, 1)
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            run(way, rows, NEW_TOKENS)
            seconds[f"decode step, {rows} rows"] = (time.perf_counter() - started - prefill) / (NEW_TOKENS - 1)
        return seconds

    reorder = []
    with decoding.adapter_merged(policy.model):
        for _ in range(args.repeats):
            started = time.perf_counter()
            cpu_decode_step(policy.model, 4)
            reorder.append(time.perf_counter() - started)

    results, bandwidth = alternated({way: lambda way=way: measure(way) for way in (*WAYS, BFLOAT16_WAY)},
                                    args.repeats)
    median_bandwidth = summary(bandwidth)["median"]
    bound = weight_bytes / median_bandwidth

    lines = [f"Median of {args.repeats} rounds after a warm-up, the ways alternated in one process; read bandwidth "
             f"{median_bandwidth / 1e9:.1f} GB/s (before and after: {', '.join(f'{b / 1e9:.1f}' for b in bandwidth)}), "
             f"so a decode step, which reads {weight_bytes / 1e6:.0f} MB of weights, takes at least "
             f"{bound * 1e3:.1f} ms. Reordering the weights for the written-out step: "
             f"{summary(reorder)['median'] * 1e3:.0f} ms a decode (included in its steps' times).", "",
             "| decode step | forward pass, ms | written out, ms | speed-up | share of the bandwidth bound, forward pass / written out |",
             "|---|---|---|---|---|"]
    for name in results[WAYS[0]]:
        before, after = results[WAYS[0]][name]["median"], results[WAYS[1]][name]["median"]
        lines.append(f"| {name} | {before * 1e3:.1f} | {after * 1e3:.1f} | {before / after:.2f}x "
                     f"| {bound / before:.0%} / {bound / after:.0%} |")
    lines += ["", f"The written-out step in bfloat16 (the adapter beside the weights), against its own bound of "
              f"{bound / 2 * 1e3:.1f} ms (half the bytes):", "",
              "| decode step | written out, float32, ms | written out, bfloat16, ms | speed-up | share of its own bound, bfloat16 |",
              "|---|---|---|---|---|"]
    for name in results[BFLOAT16_WAY]:
        f32, b16 = results[WAYS[1]][name]["median"], results[BFLOAT16_WAY][name]["median"]
        lines.append(f"| {name} | {f32 * 1e3:.1f} | {b16 * 1e3:.1f} | {f32 / b16:.2f}x | {bound / 2 / b16:.0%} |")
    lines += ["", f"Greedy decoding of 4 prompts, {NEW_TOKENS} tokens: the same tokens both ways: "
              f"{agreement['same greedy tokens']}; largest difference in a token's log-prob "
              f"{agreement['largest log-prob difference']:.1e}.",
              "", f"Load average start {load_at_start}, end {load_average()}."]
    write_results(NAME, {"machine": machine(), "versions": our_versions(), "read_bandwidth": bandwidth,
                         "weight_bytes": weight_bytes, "reorder_seconds": summary(reorder), "seconds": results,
                         "agreement": agreement, "repeats": args.repeats}, "\n".join(lines))


if __name__ == "__main__":
    main()
