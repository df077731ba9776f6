"""Which kernel runs the linear layers of passes without gradients: torch's default on a CPU (MKL's sgemm)
against oneDNN's (`rlhf.models.loading.OneDNNLinear`), alternated in one process on the default model.

    .venv/bin/python bench/linear_kernels.py [--repeats 3]

Measures, for each kernel: a decode step at 4, 8 and 16 rows (the policy with its adapter merged, as PPO
samples; 48 new tokens after the bundled prompts, no stop token honoured), the prefill of 8 prompts, and a
reference pass (8 prompts and 64 tokens sampled after each, no gradients, logits for the completion only). A
decode step reads every weight once, so the machine's read bandwidth (a sum over 400 MB, measured in the
same run) bounds it from below: the table gives each step's share of that bound.
"""

from __future__ import annotations

import argparse
import time

from common import alternated, decoding_policy, load_average, machine, our_versions, summary, write_results

NAME = "linear_kernels"
ROWS = (4, 8, 16)
NEW_TOKENS = 48


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each kernel, after one warm-up")
    args = parser.parse_args()

    import torch

    from rlhf.models.loading import OneDNNLinear
    from rlhf.rl.decoding import adapter_merged, decode

    load_at_start = load_average()
    policy, tokenizer, prompts = decoding_policy(64, 16)
    # The layers loading makes OneDNNLinear (the adapter's own are added later, and idle while it is merged).
    linears = [m for name, m in policy.model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name]
    kernels = {"mkl": torch.nn.Linear, "onednn": OneDNNLinear}
    # The weights a decode step reads: every linear layer's (the adapter merged in) and the head's.
    weight_bytes = sum(m.weight.numel() * 4 for m in linears)
    with adapter_merged(policy.model):
        reference = decode(policy.model, prompts[:8], 64, [-1], tokenizer.pad_token_id).rollout

    def measure() -> dict:
        seconds = {}
        with adapter_merged(policy.model):
            for count in ROWS:
                started = time.perf_counter()
                decode(policy.model, prompts[:count], 1, [-1], tokenizer.pad_token_id)
                prefill = time.perf_counter() - started
                started = time.perf_counter()
                decode(policy.model, prompts[:count], NEW_TOKENS, [-1], tokenizer.pad_token_id)
                seconds[f"decode step, {count} rows"] = (time.perf_counter() - started - prefill) / (NEW_TOKENS - 1)
                if count == 8:
                    seconds["prefill, 8 prompts"] = prefill
        with torch.no_grad():
            started = time.perf_counter()
            policy.evaluate(reference, 1.0, with_values=False, reference=True)
            seconds["reference pass, 8 rows"] = time.perf_counter() - started
        return seconds

    def with_kernel(cls):
        def measure_with() -> dict:
            for module in linears:
                module.__class__ = cls
            return measure()
        return measure_with

    results, bandwidth = alternated({kernel: with_kernel(cls) for kernel, cls in kernels.items()}, args.repeats)
    median_bandwidth = summary(bandwidth)["median"]
    bound = weight_bytes / median_bandwidth

    lines = [f"Median of {args.repeats} rounds after a warm-up, the kernels alternated in one process; "
             f"read bandwidth {median_bandwidth / 1e9:.1f} GB/s (before and after: "
             f"{', '.join(f'{b / 1e9:.1f}' for b in bandwidth)}), so a decode step, which reads "
             f"{weight_bytes / 1e6:.0f} MB of weights, takes at least {bound * 1e3:.1f} ms.", "",
             "| pass | MKL (torch's default), ms | oneDNN, ms | speed-up | decode step's share of the bandwidth bound, MKL / oneDNN |",
             "|---|---|---|---|---|"]
    for name in results["mkl"]:
        mkl, onednn = results["mkl"][name]["median"], results["onednn"][name]["median"]
        share = f"{bound / mkl:.0%} / {bound / onednn:.0%}" if name.startswith("decode") else "–"
        lines.append(f"| {name} | {mkl * 1e3:.1f} | {onednn * 1e3:.1f} | {mkl / onednn:.2f}x | {share} |")
    lines += ["", f"Load average start {load_at_start}, end {load_average()}."]
    write_results(NAME, {"machine": machine(), "versions": our_versions(), "read_bandwidth": bandwidth,
                         "weight_bytes": weight_bytes, "seconds": results, "repeats": args.repeats},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
