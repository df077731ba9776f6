"""Train the reward model on the course's TL;DR preference set with the default model, and report
held-out accuracy against the length baseline on the same pairs, plus training throughput.

    python experiments/reward_model_tldr.py --output-dir /tmp/rm-tldr [--epochs 1] [--batch-size 32]

The data is read from ../shared/data/tldr (not part of the repository); pairs are split by post, so no
post is in both training and held-out pairs.
"""

import argparse
import json
import time
from pathlib import Path

from rlhf.data.config import DataConfig
from rlhf.data.datasets import prepare_datasets
from rlhf.models.reference import DEFAULT_MODEL, resolve_model_reference
from rlhf.reward.config import RewardTrainingConfig
from rlhf.reward.evaluation import evaluate_reward_model
from rlhf.reward.training import length_balanced, train_reward_model
from rlhf.training.steps import steps_from_epochs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tldr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate-multiplier", type=float, default=10.0)
    parser.add_argument("--lora-dim", type=int, default=4)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balance-lengths", action="store_true",
                        help="train on a subset where the longer candidate wins half the pairs")
    args = parser.parse_args()

    data = prepare_datasets(str(args.data_dir / "preference.jsonl"), data=DataConfig(seed=args.seed))
    trained_on = length_balanced(data.train_pairs, args.seed) if args.balance_lengths else data.train_pairs
    steps = steps_from_epochs(len(trained_on), args.epochs, args.batch_size)
    config = RewardTrainingConfig(train_steps=steps, batch_size=args.batch_size,
                                  micro_batch_tokens=args.micro_batch_tokens,
                                  learning_rate_multiplier=args.learning_rate_multiplier, lora_dim=args.lora_dim,
                                  seed=args.seed, checkpoint_every=10, normalization_pairs=256,
                                  balance_lengths=args.balance_lengths)
    base = resolve_model_reference(DEFAULT_MODEL)
    started = time.monotonic()
    training = train_reward_model(config, data.train_pairs, data.held_out_pairs, DEFAULT_MODEL, args.output_dir, base)
    train_seconds = time.monotonic() - started
    held_out = evaluate_reward_model(args.output_dir, data.held_out_pairs, base_model_path=base)
    result = {"train_pairs": len(trained_on), "held_out_pairs": len(data.held_out_pairs), "steps": steps,
              "batch_size": args.batch_size, "learning_rate_multiplier": args.learning_rate_multiplier,
              "lora_dim": args.lora_dim, "balance_lengths": args.balance_lengths,
              "train_seconds_including_scoring": round(train_seconds, 1),
              "train_pairs_per_second": training["pairs_per_second"], "held_out": held_out}
    (args.output_dir / "tldr_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
