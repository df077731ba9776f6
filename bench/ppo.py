"""PPO, ours against TRL's last PPOTrainer (TRL 1.12, trl.experimental.ppo): episodes/s and peak memory.

    .venv/bin/python bench/ppo.py [--steps 4] [--rounds 2]

An episode is one prompt taken through a whole PPO step: sampling the completion, the log-prob, reference,
value and reward passes, and its share of the update. Both sides: the default model, LoRA on the policy
(same rank, alpha, targets), the reference = the policy with its adapter disabled, a reward model with the
same weights (the base backbone and one fixed linear head), the same prompts, prompts per step, new tokens,
sampling temperature, KL weight, learning rate and one PPO epoch of one minibatch per step. Each side runs in
its own child process, alternating (A B, B A, ...); the first step of every run is warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common import (
    OUR_PYTHON,
    SCRATCH,
    TRL_PYTHON,
    load_average,
    machine,
    model_dir,
    our_versions,
    run_child,
    spread_text,
    start_comparison,
    summary,
    trl_versions,
    write_results,
)
from data import prompt_slice

NAME = "ppo"


def settings_from(args) -> dict:
    return {
        "steps": args.steps, "batch_size": args.batch_size, "prompt_length": 256, "new_tokens": args.new_tokens,
        "ppo_epochs": 1, "lora_rank": 8, "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "learning_rate": 1e-4, "kl_coeff": 0.05, "temperature": 1.0, "seed": 0,
        "trl_pad_token": "<empty_output>",
    }


def make_reward_model(base: str, settings: dict, directory: Path) -> Path:
    """A reward model both sides load: the base backbone with a seeded linear head, saved in our format."""
    from rlhf.models.loading import load_backbone, pick_placement
    from rlhf.reward.model import HEAD_FILE, RewardModel, RewardModelSpec, save_reward_model

    if not (directory / HEAD_FILE).is_file():
        model = RewardModel.with_new_head(load_backbone(base, pick_placement("cpu")), settings["seed"])
        spec = RewardModelSpec(large_model_reference=base, lora_dim=0,
                               prompt_sequence_length=settings["prompt_length"],
                               target_sequence_length=settings["new_tokens"])
        save_reward_model(model, spec, directory)
    return directory / HEAD_FILE


def pooled_steps(side_runs) -> list[float]:
    return [s for run in side_runs for s in run.result["step_seconds"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="PPO steps per run (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts (episodes) per PPO step")
    parser.add_argument("--new-tokens", type=int, default=48, help="completion tokens sampled at most")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating sides")
    parser.add_argument("--results-name", default=NAME, help=f"bench/results/NAME.json and .md (default {NAME})")
    args = parser.parse_args()
    load_at_start = start_comparison(args.steps)

    from rlhf.models.loading import load_tokenizer

    settings = settings_from(args)
    base = model_dir()
    rows = prompt_slice(load_tokenizer(base), args.steps * args.batch_size, settings["prompt_length"])
    reward_dir = SCRATCH / "ppo-reward-model"
    head = make_reward_model(base, settings, reward_dir)
    spec = {"model_dir": base, "settings": settings, "rows": rows, "reward_dir": str(reward_dir),
            "reward_head": str(head)}
    sides = {"ours": (OUR_PYTHON, "ppo_ours.py", True), "trl": (TRL_PYTHON, "ppo_trl.py", False)}

    runs = {"ours": [], "trl": []}
    for round_index in range(args.rounds):
        order = ["ours", "trl"] if round_index % 2 == 0 else ["trl", "ours"]
        for side in order:
            python, worker, ours = sides[side]
            print(f"round {round_index + 1}/{args.rounds}: {side}", file=sys.stderr)
            runs[side].append(run_child(python, worker, {**spec, "output_dir": str(SCRATCH / f"ppo-{side}")},
                                        f"ppo-{side}", ours))

    sides_result = {}
    for side, side_runs in runs.items():
        step_seconds = pooled_steps(side_runs)
        sides_result[side] = {
            "step_seconds": summary(step_seconds),
            # CPU time of the child: with idle cores it is about threads x wall time; much less means
            # the child waited for cores that other processes held.
            "step_cpu_seconds": summary([s for run in side_runs for s in run.result["step_cpu_seconds"]]),
            "episodes_per_second": summary([args.batch_size / s for s in step_seconds]),
            "peak_rss_gb": max(run.peak_rss_gb for run in side_runs),
            "run_wall_seconds": [round(run.wall_seconds, 1) for run in side_runs],
        }
    sides_result["ours"]["mean_response_tokens"] = statistics.mean(
        t for run in runs["ours"] for t in run.result["response_length"])
    ours, trl = sides_result["ours"], sides_result["trl"]
    speedup = ours["episodes_per_second"]["median"] / trl["episodes_per_second"]["median"]
    memory_ratio = ours["peak_rss_gb"] / trl["peak_rss_gb"]
    result = {
        "benchmark": NAME, "settings": settings, "rounds": args.rounds, "prompts": len(rows),
        "mean_prompt_tokens": statistics.mean(len(r["prompt_ids"]) for r in rows),
        "ours": ours, "trl": trl, "speedup_episodes_per_second": speedup, "peak_memory_ratio": memory_ratio,
        "targets": {"speedup_at_least_2": speedup >= 2.0, "memory_not_higher": memory_ratio <= 1.0},
        "versions": {"ours": our_versions(), "trl_venv": trl_versions()}, "machine": machine(),
        "load_average_start": load_at_start, "load_average_end": load_average(),
    }
    write_results(args.results_name, result, markdown(result))


def markdown(r: dict) -> str:
    s = r["settings"]
    rows = []
    for side, label in (("ours", "ours (`train_policy`)"),
                        ("trl", f"TRL {r['versions']['trl_venv']['trl']} `experimental.ppo.PPOTrainer`")):
        x = r[side]
        rows.append(f"| {label} | {spread_text(x['episodes_per_second'], 3)} | {spread_text(x['step_seconds'], 1)} "
                    f"| {x['step_cpu_seconds']['median']:.1f} | {x['peak_rss_gb']:.2f} |")
    return "\n".join([
        "### PPO",
        "",
        f"{r['prompts']} prompts (mean {r['mean_prompt_tokens']:.0f} tokens, at most {s['prompt_length']}), "
        f"{s['steps']} steps of {s['batch_size']} prompts, up to {s['new_tokens']} new tokens sampled at "
        f"temperature {s['temperature']}, {s['ppo_epochs']} PPO epoch, LoRA r={s['lora_rank']} "
        f"({', '.join(s['lora_targets'])}) on the policy, KL weight {s['kl_coeff']}, {r['rounds']} runs per side "
        f"alternating; median [min–max] over {r['ours']['step_seconds']['n']} timed steps per side (first step of "
        f"each run is warm-up).",
        "",
        "| side | episodes/s | s/step | CPU-s/step | peak RSS (GB) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"**Ours / TRL episodes/s: {r['speedup_episodes_per_second']:.2f}x** (median ratio); peak memory ours / "
        f"TRL: {r['peak_memory_ratio']:.2f}. Our mean completion: {r['ours']['mean_response_tokens']:.1f} tokens. "
        f"Load average start {r['load_average_start']}, end {r['load_average_end']}.",
    ])


if __name__ == "__main__":
    main()
