"""The local run's policy stage on the course's TL;DR data: the default model, the local defaults' PPO
settings (`rlhf run`'s: a warm-up on the TL;DR pairs whose posts are not eval prompts, then
PPO on the TL;DR prompts), against a reward model trained on TL;DR pairs (experiments/reward_model_tldr.py);
then base vs tuned on the course's 14 eval prompts, by the reward model and the rule judge.

    python experiments/ppo_tldr.py --reward-model /tmp/rm-tldr --output-dir /tmp/ppo-tldr [--steps 20]
"""

import argparse
import json
from pathlib import Path

from rlhf.data.datasets import read_jsonl
from rlhf.evaluation.compare import evaluate_outputs
from rlhf.evaluation.config import InferenceConfig
from rlhf.evaluation.inference import bulk_infer
from rlhf.models.loading import pick_placement
from rlhf.models.reference import DEFAULT_MODEL, resolve_model_reference
from rlhf.pipeline.local_run import LOCAL_DEFAULTS
from rlhf.rl.config import PPOConfig
from rlhf.rl.policy import read_policy_spec
from rlhf.rl.ppo import train_policy
from rlhf.rl.rewards import RewardModelReward

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tldr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward-model", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--steps", type=int, default=LOCAL_DEFAULTS["reinforcement_learning_train_steps"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    base = resolve_model_reference(DEFAULT_MODEL)
    prompts = [{"input_text": r["input_text"]} for r in read_jsonl(args.data_dir / "prompts.jsonl")]
    eval_prompts = [{"input_text": r["input_text"]} for r in read_jsonl(args.data_dir / "eval_prompts.jsonl")]
    held_out = {r["input_text"] for r in eval_prompts}
    pairs = [r for r in read_jsonl(args.data_dir / "preference.jsonl") if r["input_text"] not in held_out]
    local = {field: LOCAL_DEFAULTS[name] for field, name in PPOConfig.parameter_names.items() if name in LOCAL_DEFAULTS}
    config = PPOConfig.from_values({**local, "train_steps": args.steps, "seed": args.seed, "checkpoint_every": 4})
    reward = RewardModelReward(args.reward_model, pick_placement("auto"), base)
    training = train_policy(config, prompts, reward, DEFAULT_MODEL, args.output_dir / "policy", base,
                            train_pairs=pairs if config.warmup_steps() else [])

    inference = InferenceConfig(target_sequence_length=config.target_sequence_length, instruction=config.instruction,
                                use_chat_template=config.use_chat_template)
    base_rows = bulk_infer(eval_prompts, base, inference)
    tuned_rows = bulk_infer(eval_prompts, base, inference, args.output_dir / "policy" / "adapter")
    evaluation, comparison = evaluate_outputs(base_rows, tuned_rows, args.reward_model, base,
                                              args.output_dir / "policy" / "adapter",
                                              read_policy_spec(args.output_dir / "policy"), seed=args.seed)
    result = {"training": training, "evaluation": evaluation,
              "side_by_side": [{k: c[k] for k in ("base", "tuned", "base_reward", "tuned_reward")}
                               for c in comparison[:3]]}
    (args.output_dir / "ppo_tldr_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
