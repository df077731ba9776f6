"""Where a PPO step of ours goes: generation, the log-prob/value/reference passes, reward scoring, update.

    .venv/bin/python bench/generation_share.py [--steps 6]

Runs our `train_policy` with the PPO benchmark's settings and reads the per-phase times it logs
(`time/generation`, `time/forward`, `time/scoring`, `time/update` in TensorBoard) next to the wall time of
each step; "other" is the rest of the step (advantages, logging). The first step is warm-up.
"""

from __future__ import annotations

import argparse
import sys

from common import (
    OUR_PYTHON,
    SCRATCH,
    load_average,
    machine,
    model_dir,
    our_versions,
    require_data,
    run_child,
    summary,
    write_results,
)
from data import prompt_slice
from ppo import make_reward_model, settings_from

NAME = "generation_share"
PHASES = ("generation", "forward", "scoring", "update")
LABELS = {"generation": "generation (sampling with the KV cache; the policy's log-probs and values on the way)",
          "forward": "reference log-probs (no grad)",
          "scoring": "reward model", "update": "PPO update (forward, backward, AdamW)",
          "other": "other (advantages, logging)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="PPO steps (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.steps < 2:
        sys.exit("--steps must be at least 2: the first step is warm-up")
    require_data()
    load_at_start = load_average()

    from rlhf.models.loading import load_tokenizer

    settings = settings_from(argparse.Namespace(steps=args.steps, batch_size=args.batch_size,
                                                new_tokens=args.new_tokens))
    base = model_dir()
    rows = prompt_slice(load_tokenizer(base), args.steps * args.batch_size, settings["prompt_length"])
    reward_dir = SCRATCH / "ppo-reward-model"
    make_reward_model(base, settings, reward_dir)
    spec = {"model_dir": base, "settings": settings, "rows": rows, "reward_dir": str(reward_dir)}
    run = run_child(OUR_PYTHON, "ppo_ours.py", {**spec, "output_dir": str(SCRATCH / "share-ours")}, "share-ours", True)

    step_seconds = run.result["step_seconds"]  # from the end of step 1 on: steps 2, 3, ...
    phases = {p: run.result["phase_seconds"][p][1:] for p in PHASES}
    phases["other"] = [total - sum(phases[p][i] for p in PHASES) for i, total in enumerate(step_seconds)]
    shares = {p: summary([seconds[i] / step_seconds[i] for i in range(len(step_seconds))])
              for p, seconds in phases.items()}
    result = {"benchmark": NAME, "settings": settings, "step_seconds": summary(step_seconds),
              "phase_seconds": {p: summary(v) for p, v in phases.items()}, "share": shares,
              "mean_response_tokens": sum(run.result["response_length"]) / len(run.result["response_length"]),
              "peak_rss_gb": run.peak_rss_gb, "versions": our_versions(), "machine": machine(),
              "load_average_start": load_at_start, "load_average_end": load_average()}
    write_results(NAME, result, markdown(result))


def markdown(r: dict) -> str:
    s = r["settings"]
    rows = [f"| {LABELS[p]} | {r['phase_seconds'][p]['median']:.2f} | {r['share'][p]['median']:.1%} "
            f"[{r['share'][p]['min']:.1%}–{r['share'][p]['max']:.1%}] |" for p in (*PHASES, "other")]
    return "\n".join([
        "### Where a PPO step goes (ours)",
        "",
        f"{s['batch_size']} prompts per step, up to {s['new_tokens']} new tokens (mean "
        f"{r['mean_response_tokens']:.1f}), {s['ppo_epochs']} PPO epoch; median [min–max] over "
        f"{r['step_seconds']['n']} steps after a warm-up step; median step {r['step_seconds']['median']:.1f} s.",
        "",
        "| phase | s/step | share of the step |",
        "|---|---|---|",
        *rows,
        "",
        f"Load average start {r['load_average_start']}, end {r['load_average_end']}.",
    ])


if __name__ == "__main__":
    main()
