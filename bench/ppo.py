"""PPO, RLOO and GRPO, ours against TRL's trainers: episodes/s and peak memory.

    .venv/bin/python bench/ppo.py [--method ppo] [--steps 6] [--rounds 2]
    .venv/bin/python bench/ppo.py --method rloo   # or grpo; --samples-per-prompt 2 by default

PPO runs against TRL's last PPOTrainer (TRL 1.12, trl.experimental.ppo); RLOO and GRPO against TRL 1.16's
RLOOTrainer and GRPOTrainer (bench/.venv-trl-1.16.0). An episode is one sampled completion taken through a
whole step: sampling, the log-prob, reference, value (PPO) and reward passes, and its share of the update;
PPO samples one completion per prompt, RLOO and GRPO `--samples-per-prompt` (k). Both sides: the default
model, LoRA on the policy
(same rank, alpha, targets), the reference = the policy with its adapter disabled, a reward model with the
same weights (the base backbone and one fixed linear head), the same prompts, prompts per step, new tokens,
sampling temperature, KL weight (RLOO: in the reward; GRPO: a loss term; on both sides), learning rate and one
epoch of one minibatch per step. Each side runs in
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
    TRL_PREFERENCE_VERSION,
    TRL_VERSION,
    load_average,
    machine,
    model_dir,
    our_versions,
    run_child,
    spread_text,
    start_comparison,
    summary,
    trl_python,
    trl_versions,
    write_results,
)
from data import prompt_slice

# Per method: TRL's release, its worker and its trainer's name.
TRL_SIDES = {"ppo": (TRL_VERSION, "ppo_trl.py", "experimental.ppo.PPOTrainer"),
             "rloo": (TRL_PREFERENCE_VERSION, "group_trl.py", "RLOOTrainer"),
             "grpo": (TRL_PREFERENCE_VERSION, "group_trl.py", "GRPOTrainer")}


def settings_from(args) -> dict:
    return {
        "tuning_method": args.method,
        "samples_per_prompt": args.samples_per_prompt or (1 if args.method == "ppo" else 2),
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


def speedup_of(side: dict, baseline: dict) -> float:
    return side["episodes_per_second"]["median"] / baseline["episodes_per_second"]["median"]


def pooled_steps(side_runs) -> list[float]:
    return [s for run in side_runs for s in run.result["step_seconds"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(TRL_SIDES), default="ppo", help="the tuning method")
    parser.add_argument("--samples-per-prompt", type=int, default=0,
                        help="completions per prompt (default: 1 for ppo, 2 for rloo and grpo)")
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--new-tokens", type=int, default=48, help="completion tokens sampled at most")
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating sides")
    parser.add_argument("--results-name", help="bench/results/NAME.json and .md (default: the method)")
    args = parser.parse_args()
    trl_version, trl_worker, _ = TRL_SIDES[args.method]
    if args.method != "ppo" and args.samples_per_prompt == 1:
        sys.exit(f"--samples-per-prompt must be at least 2 for {args.method}")
    load_at_start = start_comparison(args.steps, trl_version)

    from rlhf.models.loading import load_tokenizer

    settings = settings_from(args)
    base = model_dir()
    rows = prompt_slice(load_tokenizer(base), args.steps * args.batch_size, settings["prompt_length"])
    reward_dir = SCRATCH / "ppo-reward-model"
    head = make_reward_model(base, settings, reward_dir)
    spec = {"model_dir": base, "settings": settings, "rows": rows, "reward_dir": str(reward_dir),
            "reward_head": str(head)}
    sides = {"ours": (OUR_PYTHON, "ppo_ours.py", True, {"packed": True}),
             "trl": (trl_python(trl_version), trl_worker, False, {})}
    if args.method != "ppo":  # what packing each prompt once with its k completions saves
        sides["ours_unpacked"] = (OUR_PYTHON, "ppo_ours.py", True, {"packed": False})
    name = args.method

    runs = {side: [] for side in sides}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for side in order:
            python, worker, ours, extra = sides[side]
            print(f"round {round_index + 1}/{args.rounds}: {side}", file=sys.stderr)
            runs[side].append(run_child(python, worker,
                                        {**spec, **extra, "output_dir": str(SCRATCH / f"{name}-{side}")},
                                        f"{name}-{side}", ours))

    episodes_per_step = args.batch_size * settings["samples_per_prompt"]
    sides_result = {}
    for side, side_runs in runs.items():
        step_seconds = pooled_steps(side_runs)
        sides_result[side] = {
            "step_seconds": summary(step_seconds),
            # CPU time of the child: with idle cores it is about threads x wall time; much less means
            # the child waited for cores that other processes held.
            "step_cpu_seconds": summary([s for run in side_runs for s in run.result["step_cpu_seconds"]]),
            "episodes_per_second": summary([episodes_per_step / s for s in step_seconds]),
            "peak_rss_gb": max(run.peak_rss_gb for run in side_runs),
            "run_wall_seconds": [round(run.wall_seconds, 1) for run in side_runs],
        }
    for side, side_runs in runs.items():
        lengths = [t for run in side_runs for t in run.result.get("response_length", [])]
        if lengths:  # TRL's PPOTrainer does not log it
            sides_result[side]["mean_response_tokens"] = statistics.mean(lengths)
    ours, trl = sides_result["ours"], sides_result["trl"]
    speedup = speedup_of(ours, trl)
    memory_ratio = ours["peak_rss_gb"] / trl["peak_rss_gb"]
    packing = {}
    if "ours_unpacked" in sides_result:
        packing = {"packing_speedup": speedup_of(ours, sides_result["ours_unpacked"])}
    result = {
        "benchmark": name, "settings": settings, "rounds": args.rounds, "prompts": len(rows),
        "mean_prompt_tokens": statistics.mean(len(r["prompt_ids"]) for r in rows),
        **sides_result, "speedup_episodes_per_second": speedup, "peak_memory_ratio": memory_ratio, **packing,
        "targets": {"speedup_at_least_2": speedup >= 2.0, "memory_not_higher": memory_ratio <= 1.0},
        "versions": {"ours": our_versions(), "trl_venv": trl_versions(trl_version)}, "machine": machine(),
        "load_average_start": load_at_start, "load_average_end": load_average(),
    }
    write_results(args.results_name or name, result, markdown(result))


def markdown(r: dict) -> str:
    s = r["settings"]
    method, k = s.get("tuning_method", "ppo"), s.get("samples_per_prompt", 1)
    rows = []
    labels = {"ours": "ours (`train_policy`)" + (", each prompt packed once with its completions" if k > 1 else ""),
              "ours_unpacked": "ours, each completion with its own copy of the prompt",
              "trl": f"TRL {r['versions']['trl_venv']['trl']} `{TRL_SIDES[method][2]}`"}
    for side, label in labels.items():
        if side not in r:
            continue
        x = r[side]
        rows.append(f"| {label} | {spread_text(x['episodes_per_second'], 3)} | {spread_text(x['step_seconds'], 1)} "
                    f"| {x['step_cpu_seconds']['median']:.1f} | {x['peak_rss_gb']:.2f} |")
    return "\n".join([
        f"### {method.upper()}",
        "",
        f"{r['prompts']} prompts (mean {r['mean_prompt_tokens']:.0f} tokens, at most {s['prompt_length']}), "
        f"{s['steps']} steps of {s['batch_size']} prompts, {k} completion{'s' if k > 1 else ''} per prompt "
        f"(an episode is one completion), up to {s['new_tokens']} new tokens sampled at "
        f"temperature {s['temperature']}, {s['ppo_epochs']} epoch, LoRA r={s['lora_rank']} "
        f"({', '.join(s['lora_targets'])}) on the policy, KL weight {s['kl_coeff']}, {r['rounds']} runs per side "
        f"alternating; median [min–max] over {r['ours']['step_seconds']['n']} timed steps per side (first step of "
        f"each run is warm-up).",
        "",
        "| side | episodes/s | s/step | CPU-s/step | peak RSS (GB) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"**Ours / TRL episodes/s: {r['speedup_episodes_per_second']:.2f}x** (median ratio); peak memory ours / "
        f"TRL: {r['peak_memory_ratio']:.2f}."
        + (f" Packed / unpacked episodes/s: {r['packing_speedup']:.2f}x." if "packing_speedup" in r else "")
        + " Mean completion (tokens): "
        + ", ".join(f"{side} {r[side]['mean_response_tokens']:.1f}" for side in labels
                    if "mean_response_tokens" in r.get(side, {})) + ". "
        f"Load average start {r['load_average_start']}, end {r['load_average_end']}.",
    ])


if __name__ == "__main__":
    main()
