"""Peak memory of one PPO update pass on the default model, three ways: `before`, the log-probs and entropy
as `Policy.evaluate` computed them before (a full-vocabulary log_softmax kept for the backward pass, the
entropy over the whole batch at once, the KV cache built and thrown away); `now`, as it computes them now
(each token's logit minus the logsumexp, the entropy a row at a time, no KV cache in a training pass); and
`checkpointed`, `now` with gradient checkpointing (the `*_gradient_checkpointing` settings).

    .venv/bin/python bench/memory.py [--rows 8] [--prompt-tokens 200] [--completion-tokens 64] [--repetitions 3]

Each variant runs in its own child process, so one never inherits the other's freed pages. The child loads
the model, resets the kernel's peak-RSS counter (`/proc/self/clear_refs`), runs one forward and backward pass
of a PPO-shaped loss over `rows` rollouts with the entropy, and reports the peak resident memory above what
it held before the pass. Random token ids stand in for a rollout: memory depends on shapes, not on text.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from common import machine, model_dir, our_versions, resident_kib, write_results

NAME = "memory"
VARIANTS = ("before", "now", "checkpointed")


def evaluate_before(policy, rollout, temperature: float):
    """`Policy.evaluate` as it was: the baseline of this benchmark."""
    import torch
    import torch.nn.functional as F

    from rlhf.rl.rollouts import positions

    length = rollout.completion_mask.shape[1]
    output = policy.model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                          position_ids=positions(rollout.attention_mask), logits_to_keep=length + 1,
                          output_hidden_states=True)
    logits = output.logits[:, :-1].float() / temperature
    log_probs = F.log_softmax(logits, dim=-1)
    token_log_probs = log_probs.gather(-1, rollout.sequences[:, -length:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    values = policy.value_head(output.hidden_states[-1][:, -length - 1:-1].detach().float()).squeeze(-1)
    return token_log_probs, entropy, values


def child(variant: str, rows: int, prompt_tokens: int, completion_tokens: int) -> dict:
    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_placement, recompute_activations
    from rlhf.rl.policy import Policy
    from rlhf.rl.rollouts import Rollout

    path = model_dir()
    tokenizer = load_tokenizer(path)
    policy = Policy.create(load_causal_lm(path, pick_placement("cpu")), 8, [tokenizer.eos_token_id],
                           tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, len(tokenizer), (rows, prompt_tokens + completion_tokens), generator=generator)
    rollout = Rollout(sequences=sequences, attention_mask=torch.ones_like(sequences),
                      completion_mask=torch.ones(rows, completion_tokens), ended=torch.ones(rows, dtype=torch.bool))
    if variant == "checkpointed":
        recompute_activations(policy.model)
    policy.model.train()  # as the trainer has it (checkpointing acts only in training mode)
    Path("/proc/self/clear_refs").write_text("5")  # the peak-RSS counter now starts from here
    held = resident_kib("VmRSS")
    if variant != "before":
        log_probs, entropy, values = policy.evaluate(rollout, 1.0, with_entropy=True)
    else:
        log_probs, entropy, values = evaluate_before(policy, rollout, 1.0)
    loss = -log_probs.mean() + values.square().mean()
    loss.backward()
    return {"variant": variant, "peak_above_start_mb": (resident_kib("VmHWM") - held) / 1024,
            "held_before_mb": held / 1024, "entropy_mean": float(entropy.mean()),
            "vocabulary": policy.model.config.vocab_size}


def each(runs: list[dict]) -> str:
    return ", ".join(f"{run['peak_above_start_mb']:.0f}" for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8, help="rollouts in the pass (the PPO micro-batch)")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=3, help="child processes per variant, alternating")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, args.prompt_tokens, args.completion_tokens)))
        return
    runs = {variant: [] for variant in VARIANTS}
    for repetition in range(args.repetitions):
        for variant in VARIANTS if repetition % 2 == 0 else VARIANTS[::-1]:
            output = subprocess.run([sys.executable, __file__, "--child", variant, "--rows", str(args.rows),
                                     "--prompt-tokens", str(args.prompt_tokens), "--completion-tokens",
                                     str(args.completion_tokens)], capture_output=True, text=True, check=True)
            runs[variant].append(json.loads(output.stdout.strip().splitlines()[-1]))
    peaks = {variant: statistics.median(r["peak_above_start_mb"] for r in runs[variant]) for variant in VARIANTS}
    vocabulary_copy_mb = args.rows * args.completion_tokens * runs["now"][0]["vocabulary"] * 4 / 2 ** 20
    result = {"settings": vars(args), "machine": machine(), "versions": our_versions(), "runs": runs,
              "median_peak_above_start_mb": peaks, "ratio_now_to_before": peaks["now"] / peaks["before"],
              "ratio_checkpointed_to_before": peaks["checkpointed"] / peaks["before"]}
    markdown = (f"## Memory of one PPO update pass ({args.rows} rollouts of {args.prompt_tokens} prompt + "
                f"{args.completion_tokens} completion tokens, default model, float32 CPU)\n\n"
                "| variant | peak above the start, MB (median of "
                f"{args.repetitions}) | runs |\n|---|---|---|\n"
                + "".join(f"| {variant} | {peaks[variant]:.0f} | {each(runs[variant])} |\n" for variant in VARIANTS)
                + f"\nNow / before: {result['ratio_now_to_before']:.2f}; checkpointed / before: "
                f"{result['ratio_checkpointed_to_before']:.2f}. One full-vocabulary float32 copy of "
                f"these logits is {vocabulary_copy_mb:.0f} MB.\n")
    write_results(NAME, result, markdown)


if __name__ == "__main__":
    main()
