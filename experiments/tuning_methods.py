"""PPO, RLOO, GRPO and DPO on equal terms: the same reward model (the judge), data, steps and settings, taken
from a finished `rlhf run`, judged on its eval prompts against its own base completions.

    python experiments/tuning_methods.py --run-dir RUN --output-dir D [--methods rloo grpo dpo]
        [--samples-per-prompt 4] [--set NAME=VALUE ...] [--dpo-set NAME=VALUE ...]

For each method, `rlhf train-policy` with the run's settings (RLOO and GRPO sample each of
`batch / k` prompts k times, so a step has as many rollouts as the run's PPO step; DPO trains on the run's
training pairs, held-out pairs for its accuracy, with the run's settings and `--dpo-set`'s), then `rlhf infer`
and `rlhf evaluate` with the run's reward model and its base completions. `ppo` retrains PPO with the run's
settings (the run's own policy was trained that way). Writes `methods.md` and `methods.json` in D: per method
the wall time of training, the tuned model's win rate under the reward model, the rule's pass rates, KL to
base, words and ended shares. `--set` changes one of the run's settings for every method.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Run settings handed to `rlhf train-policy` as they are (pipeline parameter names are its flags).
POLICY_PARAMETERS = ("reinforcement_learning_train_steps", "reinforcement_learning_micro_batch_size",
                     "reinforcement_learning_minibatch_size", "reinforcement_learning_ppo_epochs",
                     "reinforcement_learning_rate_multiplier", "kl_coeff", "target_sequence_length", "instruction",
                     "seed", "reinforcement_learning_rollout_micro_batch_size", "temperature", "top_p",
                     "unfinished_reward", "sft_steps", "dpo_warmup_steps", "dpo_beta", "kl_target", "kl_horizon",
                     "reinforcement_learning_warmup_fraction")


def rlhf(*args: str, log: Path) -> None:
    """One `rlhf` command, its output (progress lines included) appended to `log` as it comes."""
    with log.open("a") as out:
        result = subprocess.run([sys.executable, "-m", "rlhf.cli", *args], stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"rlhf {args[0]} failed (exit {result.returncode}); its log: {log}")


# DPO's own settings, and the run's that it reads as they are (its steps come from `--dpo-set`).
DPO_PARAMETERS = ("dpo_beta", "reinforcement_learning_train_epochs", "reinforcement_learning_train_steps",
                  "reinforcement_learning_batch_size", "reinforcement_learning_rate_multiplier",
                  "reinforcement_learning_micro_batch_size", "policy_lora_dim", "target_sequence_length",
                  "instruction", "seed")


def judge_against_run(run: Path, policy: Path, output: Path, seed: int, log: Path) -> dict:
    """`rlhf infer` of the tuned `policy` on the run's eval prompts, then `rlhf evaluate` against the run's base
    completions by the run's reward model; the evaluation's metrics."""
    stages = run / "pipeline_root" / "rlhf-pipeline"
    rlhf("infer", "--eval-dataset", str(stages / "validate-datasets" / "eval_prompts"), "--policy", str(policy),
         "--output", str(output / "tuned.jsonl"), log=log)
    rlhf("evaluate", "--base-outputs", str(stages / "bulk-inference" / "predictions"), "--tuned-outputs",
         str(output / "tuned.jsonl"), "--reward-model", str(stages / "train-reward-model" / "reward_model"),
         "--policy", str(policy), "--output-dir", str(output / "evaluation"), "--seed", str(seed), log=log)
    return json.loads((output / "evaluation" / "metrics.json").read_text())["evaluation"]


def train_and_judge(method: str, run: Path, parameters: dict, k: int, output: Path, dpo: dict) -> dict:
    stages = run / "pipeline_root" / "rlhf-pipeline"
    reward_model = stages / "train-reward-model" / "reward_model"
    output.mkdir(parents=True, exist_ok=True)
    log = output / "log.txt"
    batch = parameters["reinforcement_learning_batch_size"]
    samples = 1 if method == "ppo" else k
    if batch % samples:
        raise SystemExit(f"the run's batch of {batch} prompts is not a whole number of groups of {samples}")
    pairs = ["--preference-dataset", str(stages / "validate-datasets" / "train_pairs"),
             "--eval-dataset", str(stages / "validate-datasets" / "held_out_pairs")]
    if method == "dpo":
        given = {**{name: parameters[name] for name in DPO_PARAMETERS if name in parameters}, **dpo}
        if "reinforcement_learning_train_epochs" in dpo:
            given.pop("reinforcement_learning_train_steps", None)
        data = pairs
        flags = ["--tuning-method", "dpo", *[f for name, value in given.items()
                                             for f in (f"--{name.replace('_', '-')}", str(value))]]
    else:
        data = ["--prompt-dataset", str(stages / "validate-datasets" / "prompts"), "--reward-model", str(reward_model),
                *(pairs if int(parameters.get("sft_steps", 0)) or int(parameters.get("dpo_warmup_steps", 0)) else [])]
        flags = ["--tuning-method", method, "--samples-per-prompt", str(samples),
                 "--reinforcement-learning-batch-size", str(batch // samples)]
        for name in POLICY_PARAMETERS:
            if name in parameters:
                flags += [f"--{name.replace('_', '-')}", str(parameters[name])]
    started = time.monotonic()
    rlhf("train-policy", *data, "--output-dir", str(output / "policy"), *flags, log=log)
    seconds = time.monotonic() - started
    evaluation = judge_against_run(run, output / "policy", output, int(parameters.get("seed", 0)), log)
    if method == "dpo":
        samples, batch = 1, int(dpo.get("reinforcement_learning_batch_size", batch))  # pairs per step
    return {"method": method, "samples_per_prompt": samples, "prompts_per_step": batch // samples,
            "training_seconds": seconds, **{name: evaluation[name] for name in (
                "win_rate_vs_base", "rule_pass_rate_base", "rule_pass_rate_tuned", "kl_to_base", "base_mean_words",
                "tuned_mean_words", "base_ended_share", "tuned_ended_share", "tuned_repeated_ngram_share")}}


def table(rows: list[dict]) -> str:
    lines = ["| method | per step: prompts x samples (dpo: pairs) | training time | tuned wins (RM) | rule pass base → tuned | "
             "KL to base | words base / tuned | ended base / tuned | repeated 4-grams tuned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['prompts_per_step']} x {r['samples_per_prompt']} | "
            f"{r['training_seconds'] / 60:.1f} min | {r['win_rate_vs_base']:.0%} | "
            f"{r['rule_pass_rate_base']:.0%} → {r['rule_pass_rate_tuned']:.0%} | {r['kl_to_base']:.2f} | "
            f"{r['base_mean_words']:.0f} / {r['tuned_mean_words']:.0f} | "
            f"{r['base_ended_share']:.0%} / {r['tuned_ended_share']:.0%} | {r['tuned_repeated_ngram_share']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished `rlhf run` output directory")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--methods", nargs="+", default=["rloo", "grpo"], choices=["ppo", "rloo", "grpo", "dpo"])
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="k of RLOO and GRPO (default 4)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help=f"one of the run's settings, for every method: {', '.join(POLICY_PARAMETERS)}")
    parser.add_argument("--dpo-set", action="append", default=[], metavar="NAME=VALUE",
                        help=f"a setting of DPO's alone: {', '.join(DPO_PARAMETERS)}")
    args = parser.parse_args()
    dpo = {}
    for assignment in args.dpo_set:
        name, _, value = assignment.partition("=")
        if name not in DPO_PARAMETERS:
            raise SystemExit(f"--dpo-set {assignment}: not one of {', '.join(DPO_PARAMETERS)}")
        dpo[name] = value
    parameters = json.loads((args.run_dir / "run.json").read_text())["parameters"]
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        if name not in POLICY_PARAMETERS:
            raise SystemExit(f"--set {assignment}: not one of {', '.join(POLICY_PARAMETERS)}")
        parameters[name] = value
    if args.output_dir.exists() and any(args.output_dir.iterdir()):
        raise SystemExit(f"--output-dir {args.output_dir} is not empty; choose a new directory")
    rows = []
    for method in args.methods:
        rows.append(train_and_judge(method, args.run_dir, parameters, args.samples_per_prompt,
                                    args.output_dir / method, dpo))
        (args.output_dir / "methods.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.output_dir / "methods.md").write_text(table(rows))
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
