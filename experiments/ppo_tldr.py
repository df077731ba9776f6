"""PPO on the course's TL;DR prompts with the default model against a reward model trained on TL;DR
pairs (experiments/reward_model_tldr.py), then base vs tuned on the held-out eval prompts: mean reward,
KL, mean length, and a few side-by-side completions.

    python experiments/ppo_tldr.py --reward-model /tmp/rm-tldr --output-dir /tmp/ppo-tldr [--steps 8]
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
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate-multiplier", type=float, default=5.0)
    parser.add_argument("--kl-coeff", type=float, default=0.1)
    parser.add_argument("--target-sequence-length", type=int, default=64)
    parser.add_argument("--instruction", default="Summarize in less than 50 words.")
    args = parser.parse_args()

    base = resolve_model_reference(DEFAULT_MODEL)
    prompts = [{"input_text": r["input_text"]} for r in read_jsonl(args.data_dir / "prompts.jsonl")]
    eval_prompts = [{"input_text": r["input_text"]} for r in read_jsonl(args.data_dir / "eval_prompts.jsonl")]
    config = PPOConfig(train_steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                       ppo_minibatch_size=args.batch_size, learning_rate_multiplier=args.learning_rate_multiplier,
                       kl_coeff=args.kl_coeff, target_sequence_length=args.target_sequence_length,
                       instruction=args.instruction, checkpoint_every=4)
    reward = RewardModelReward(args.reward_model, pick_placement("auto"), base)
    training = train_policy(config, prompts, reward, DEFAULT_MODEL, args.output_dir / "policy", base)

    inference = InferenceConfig(target_sequence_length=args.target_sequence_length, instruction=args.instruction)
    base_rows = bulk_infer(eval_prompts, base, inference)
    tuned_rows = bulk_infer(eval_prompts, base, inference, args.output_dir / "policy" / "adapter")
    evaluation, comparison = evaluate_outputs(base_rows, tuned_rows, args.reward_model, base,
                                              args.output_dir / "policy" / "adapter",
                                              read_policy_spec(args.output_dir / "policy"))
    result = {"training": training, "evaluation": evaluation,
              "side_by_side": [{k: c[k] for k in ("base", "tuned", "base_reward", "tuned_reward")}
                               for c in comparison[:3]]}
    (args.output_dir / "ppo_tldr_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
