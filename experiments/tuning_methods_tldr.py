"""One tuning method on the course's TL;DR data with the local run's policy settings, then base against tuned
on the course's 14 eval prompts, by a TL;DR reward model (experiments/reward_model_tldr.py) and the rule judge.

    python experiments/tuning_methods_tldr.py --reward-model RM --output-dir D [--method ppo|rloo|grpo|dpo]
        [--set NAME=VALUE ...]

PPO, RLOO and GRPO: `rlhf run`'s policy stage (its DPO warm-up on the TL;DR pairs whose posts are not eval
prompts, then the method on the 865 TL;DR prompts, scored by the reward model); RLOO and GRPO sample each of
`batch / samples_per_prompt` prompts `samples_per_prompt` times, so a step has as many rollouts as PPO's. DPO:
the same pairs, no warm-up (its reference is the base). `--set` changes one of the stage's settings by its
pipeline parameter name (values read as JSON where they parse, else as text). Writes `result.json` in D: the
training metrics and wall time, and the evaluation's metrics.
"""

import argparse
import json
import time
from pathlib import Path

from rlhf.data.datasets import read_jsonl
from rlhf.evaluation.compare import evaluate_outputs
from rlhf.evaluation.config import InferenceConfig
from rlhf.evaluation.inference import bulk_infer
from rlhf.models.loading import pick_placement
from rlhf.models.reference import DEFAULT_MODEL, resolve_model_reference
from rlhf.pipeline.local_run import LOCAL_DEFAULTS
from rlhf.rl.config import TUNING_METHODS, PPOConfig
from rlhf.rl.dpo import train_dpo
from rlhf.rl.policy import read_policy_spec
from rlhf.rl.ppo import train_policy
from rlhf.rl.rewards import RewardModelReward

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tldr"


def stage_settings(method: str, assignments: list[str]) -> PPOConfig:
    """The local run's policy settings for `method`, with `assignments` (pipeline parameter names) on top."""
    field_of = {name: field for field, name in PPOConfig.parameter_names.items()}
    values = {field: LOCAL_DEFAULTS[name] for name, field in field_of.items() if name in LOCAL_DEFAULTS}
    values.update(tuning_method=method, checkpoint_every=4)
    if method in ("rloo", "grpo"):
        values.update(samples_per_prompt=2, batch_size=values["batch_size"] // 2)
    if method == "dpo":
        values["dpo_warmup_steps"] = 0
    for assignment in assignments:
        name, _, text = assignment.partition("=")
        if name not in field_of:
            raise SystemExit(f"--set {assignment}: {name} is not a setting of the policy stage")
        try:
            values[field_of[name]] = json.loads(text)
        except json.JSONDecodeError:
            values[field_of[name]] = text
    return PPOConfig.from_values(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-model", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--method", choices=TUNING_METHODS, default="ppo")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    config = stage_settings(args.method, args.set)
    config.validate()

    base = resolve_model_reference(DEFAULT_MODEL)
    prompts = [{"input_text": r["input_text"]} for r in read_jsonl(args.data_dir / "prompts.jsonl")]
    eval_prompts = [{"input_text": r["input_text"]} for r in read_jsonl(args.data_dir / "eval_prompts.jsonl")]
    held_out = {r["input_text"] for r in eval_prompts}
    pairs = [r for r in read_jsonl(args.data_dir / "preference.jsonl") if r["input_text"] not in held_out]
    policy_dir = args.output_dir / "policy"
    started = time.monotonic()
    if args.method == "dpo":
        training = train_dpo(config, pairs, [], DEFAULT_MODEL, policy_dir, base)
    else:
        reward = RewardModelReward(args.reward_model, pick_placement("auto"), base)
        training = train_policy(config, prompts, reward, DEFAULT_MODEL, policy_dir, base,
                                train_pairs=pairs if config.warmup_steps() else [])
    training_seconds = time.monotonic() - started

    inference = InferenceConfig(target_sequence_length=config.target_sequence_length, instruction=config.instruction,
                                use_chat_template=config.use_chat_template)
    base_rows = bulk_infer(eval_prompts, base, inference)
    tuned_rows = bulk_infer(eval_prompts, base, inference, policy_dir / "adapter")
    evaluation, comparison = evaluate_outputs(base_rows, tuned_rows, args.reward_model, base, policy_dir / "adapter",
                                              read_policy_spec(policy_dir), seed=config.seed)
    result = {"method": args.method, "settings": args.set, "training_seconds": round(training_seconds, 1),
              "training": training, "evaluation": evaluation,
              "side_by_side": [{k: c[k] for k in ("base", "tuned", "base_reward", "tuned_reward")}
                               for c in comparison[:3]]}
    (args.output_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
