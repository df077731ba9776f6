"""The default run (`rlhf run`, bundled sample, default model) for several seeds, one after the other, and
the table that says whether each shows learning by both judges.

    python experiments/default_run_seeds.py --output-dir runs/seeds [--seeds 0 1 2] [--set NAME=VALUE ...]

Each seed runs `rlhf run --set seed=S` in its own directory, exactly as a user runs the main job; the
table (`seeds.md`, `seeds.json` beside the runs) gives, per seed, the wall time, the reward model's held-out
accuracy, the tuned model's win rate under the reward model, the rule judge's pass rates on both sides,
the KL to base, words, ended shares, repeated n-grams and the share copied from the post, and whether each
target holds: tuned wins on at least 70% of the eval prompts, the rule passes at least 30 points more tuned
completions than base ones, the KL to base stays at most 10 nats per completion, and the tuned side repeats
its word 4-grams no more than the base does (no degenerate text).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"win_rate": 0.70, "rule_gain": 0.30, "kl": 10.0}


def run_seed(seed: int, output: Path, sets: list[str]) -> dict:
    command = [sys.executable, "-m", "rlhf.cli", "run", "--output-dir", str(output), "--set", f"seed={seed}"]
    for assignment in sets:
        command += ["--set", assignment]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    (output.parent / f"{output.name}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"seed {seed} failed (exit {result.returncode}); its log: {output.parent / output.name}.log")
    metrics = json.loads((output / "metrics.json").read_text())
    evaluation = metrics["evaluation"]
    row = {
        "seed": seed,
        "seconds": seconds,
        "reward_model_eval_accuracy": metrics["reward_model"].get("eval_accuracy"),
        "ppo_steps": metrics["policy"].get("steps"),
        "prompts": evaluation["prompts"],
        "win_rate": evaluation["win_rate_vs_base"],
        "base_mean_reward": evaluation["base_mean_reward"],
        "tuned_mean_reward": evaluation["tuned_mean_reward"],
        "rule_pass_base": evaluation.get("rule_pass_rate_base"),
        "rule_pass_tuned": evaluation.get("rule_pass_rate_tuned"),
        "kl_to_base": evaluation["kl_to_base"],
        "base_words": evaluation["base_mean_words"],
        "tuned_words": evaluation["tuned_mean_words"],
        "base_ended": evaluation["base_ended_share"],
        "tuned_ended": evaluation["tuned_ended_share"],
        "base_repeated_4grams": evaluation["base_repeated_ngram_share"],
        "tuned_repeated_4grams": evaluation["tuned_repeated_ngram_share"],
        "base_copied_5grams": evaluation["base_copied_ngram_share"],
        "tuned_copied_5grams": evaluation["tuned_copied_ngram_share"],
    }
    row["targets_met"] = targets_met(row)
    return row


def targets_met(row: dict) -> dict:
    """Each learning target of issue 14, met or not, for one seed's row. Degenerate text has no threshold of
    its own: the tuned side may repeat its word 4-grams no more than the base model does."""
    return {
        "win_rate": row["win_rate"] >= TARGETS["win_rate"],
        "rule_gain": row["rule_pass_tuned"] is not None
        and row["rule_pass_tuned"] - row["rule_pass_base"] >= TARGETS["rule_gain"] - 1e-9,
        "kl": row["kl_to_base"] is not None and row["kl_to_base"] <= TARGETS["kl"],
        "no_degenerate_text": row["tuned_repeated_4grams"] <= row["base_repeated_4grams"] + 1e-9,
    }


def table(rows: list[dict]) -> str:
    lines = ["| seed | wall time | RM held-out acc. | PPO steps | tuned wins (RM) | rule pass base → tuned | "
             "KL to base | words base / tuned | ended base / tuned | repeated 4-grams base / tuned | "
             "copied 5-grams base / tuned | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = r["targets_met"]
        verdict = "all met" if all(met.values()) else "missed: " + ", ".join(k for k, ok in met.items() if not ok)
        lines.append(
            f"| {r['seed']} | {r['seconds'] / 60:.1f} min | {r['reward_model_eval_accuracy']:.2f} | {r['ppo_steps']} | "
            f"{r['win_rate']:.0%} of {r['prompts']} | {r['rule_pass_base']:.0%} → {r['rule_pass_tuned']:.0%} | "
            f"{r['kl_to_base']:.2f} | {r['base_words']:.0f} / {r['tuned_words']:.0f} | "
            f"{r['base_ended']:.0%} / {r['tuned_ended']:.0%} | "
            f"{r['base_repeated_4grams']:.0%} / {r['tuned_repeated_4grams']:.0%} | "
            f"{r['base_copied_5grams']:.0%} / {r['tuned_copied_5grams']:.0%} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                        help="a pipeline parameter for every seed's run")
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        print(f"seed {seed}: running", flush=True)
        rows.append(run_seed(seed, args.output_dir / f"seed-{seed}", args.sets))
        print(table(rows[-1:]), flush=True)
    (args.output_dir / "seeds.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.output_dir / "seeds.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
