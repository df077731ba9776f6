"""Does the reward model agree with the rule judge on the policy's own samples? The question behind a
default run whose rule pass rate rises while the reward model's win rate stays near a coin flip.

    python experiments/reward_rule_agreement.py --run-dir runs/seed0 [--samples 8] [--temperature 1.0] [--tuned]
        [--samples-file F] [--reward-model DIR]

For every eval post of a finished `rlhf run`, `--samples` completions are sampled from the base model (and
from the tuned policy, when `--tuned`) at the rollout temperature; each is scored by the run's reward model
and judged by the rule. Within a post, every pair of samples where one passes a check and the other fails it,
and the two agree on every other check, is a test of the reward model: it agrees when it scores the passing
one higher. For the whole rule, every pair where one passes more checks than the other. Printed per check (and
for the whole rule: more checks passed), as the share of such pairs the reward model orders as the rule does
(0.5 is chance), with the pair counts; and the mean score of each kind of sample (unended, ended, ended and
addressing the reader or not, passing the rule): what PPO can climb at that temperature.
`--samples-file` keeps the samples (written the first time, read after), so that other reward models
(`--reward-model`, e.g. one trained by `rlhf train-reward-model` with other settings) are judged on the
same completions.
"""

import argparse
import dataclasses
import json
from itertools import combinations
from pathlib import Path

import torch

from rlhf.data.datasets import read_jsonl
from rlhf.data.validation import user_input
from rlhf.evaluation.compare import completion_ids
from rlhf.evaluation.config import InferenceConfig
from rlhf.evaluation.inference import Generator
from rlhf.evaluation.rule_judge import CHECKS, rule_for_instruction
from rlhf.models.loading import pick_placement
from rlhf.models.reference import resolve_model_reference
from rlhf.rl.rewards import RewardModelReward


def stage_dir(run_dir: Path, stage: str, artifact: str) -> Path:
    return run_dir / "pipeline_root" / "rlhf-pipeline" / stage / artifact


def sampled(generator: Generator, rows: list[dict], samples: int, temperature: float, seed: int) -> list[list[dict]]:
    per_post = [[] for _ in rows]
    for draw in range(samples):
        config = dataclasses.replace(generator.config, sampling_strategy="temperature_sampling", temperature=temperature, seed=seed + draw)
        for index, output in enumerate(generator.complete(rows, config, seeded=True)):
            per_post[index].append(output)
    return per_post


def agreement(posts: list[list[dict]]) -> dict:
    """Per check and for the rule's count of passed checks: pairs within a post that the rule orders, and the
    share of them the reward model orders the same way."""
    found = {name: [0, 0] for name in (*CHECKS, "checks_passed")}
    for outputs in posts:
        for a, b in combinations(outputs, 2):
            for name in found:
                if name == "checks_passed":
                    left, right = (sum(o["checks"].values()) for o in (a, b))
                else:
                    left, right = a["checks"][name], b["checks"][name]
                    others_differ = any(a["checks"][c] != b["checks"][c] for c in CHECKS if c != name)
                    if others_differ:  # a check's own pairs differ in nothing else the rule sees
                        continue
                if left == right:
                    continue
                better, worse = (a, b) if left > right else (b, a)
                found[name][0] += 1
                found[name][1] += better["score"] > worse["score"]
    return {name: {"pairs": pairs, "agreement": agreed / pairs if pairs else None}
            for name, (pairs, agreed) in found.items()}


# The kinds of sample whose mean score tells what PPO climbs: whether ending pays, and whether, among the
# samples that end, the ones the rule passes score above the ones that address the reader.
SCORE_GROUPS = {
    "unended": lambda c: not c["ended"],
    "ended": lambda c: c["ended"],
    "ended, addresses the reader": lambda c: c["ended"] and not c["no_advice"],
    "ended, does not": lambda c: c["ended"] and c["no_advice"],
    "passes the rule": lambda c: all(c.values()),
}


def score_means(outputs: list[dict]) -> dict:
    """Per kind of sample: how many, and their mean reward-model score (normalised units)."""
    means = {}
    for name, belongs in SCORE_GROUPS.items():
        scores = [o["score"] for o in outputs if belongs(o["checks"])]
        means[name] = {"samples": len(scores), "mean": round(sum(scores) / len(scores), 3) if scores else None}
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=8, help="completions sampled per eval post")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tuned", action="store_true", help="also sample the tuned policy")
    parser.add_argument("--samples-file", type=Path, help="JSON of the samples: written when absent, else read")
    parser.add_argument("--reward-model", type=Path, help="the reward model to judge (default: the run's)")
    args = parser.parse_args()

    record = json.loads((args.run_dir / "run.json").read_text())
    parameters = record["parameters"]
    rows = read_jsonl(Path(parameters["eval_dataset"]))
    instruction = parameters["instruction"]
    rule = rule_for_instruction(instruction)
    model_path = resolve_model_reference(parameters["large_model_reference"])
    reward = RewardModelReward(args.reward_model or stage_dir(args.run_dir, "train-reward-model", "reward_model"),
                               pick_placement("cpu"), model_path)
    tokenizer, limit = reward.loaded.tokenizer, reward.loaded.spec.target_sequence_length
    if args.samples_file and args.samples_file.exists():
        samples = json.loads(args.samples_file.read_text())
    else:
        config = InferenceConfig(instruction=instruction, target_sequence_length=limit)
        sides = {"base": None}
        if args.tuned:
            sides["tuned"] = stage_dir(args.run_dir, "train-policy", "policy") / "adapter"
        samples = {side: sampled(Generator(model_path, config, adapter), rows, args.samples, args.temperature,
                                 args.seed) for side, adapter in sides.items()}
        if args.samples_file:
            args.samples_file.write_text(json.dumps(samples))
    report = {}
    for side, posts in samples.items():
        for row, outputs in zip(rows, posts):
            ids = [completion_ids(tokenizer, o["prediction"], o["ended"], limit) for o in outputs]
            scores = reward([row] * len(outputs), ids)
            for output, score in zip(outputs, scores.tolist()):
                output["score"] = score
                output["checks"] = rule.judge(user_input(row), output["prediction"], output["ended"]).checks
        ordered = agreement(posts)
        outputs = [o for p in posts for o in p]
        report[side] = {"agreement": {name: round(a["agreement"], 3) if a["agreement"] is not None else None
                                      for name, a in ordered.items()},
                        "pairs": {name: a["pairs"] for name, a in ordered.items()},
                        "mean_score": score_means(outputs),
                        "rule_pass_rate": sum(all(o["checks"].values()) for o in outputs) / len(outputs)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
