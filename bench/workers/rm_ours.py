"""Our side of the reward-model benchmark: `train_reward_model` on the given pairs, timing every step.

Runs in the project's virtual environment: python rm_ours.py SPEC.json RESULT.json
"""

import json
import shutil
import sys
import time
from pathlib import Path

from pair_result import write_pair_result

from rlhf.reward.config import BASE_LEARNING_RATE, RewardTrainingConfig
from rlhf.reward.training import train_reward_model


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    settings = spec["settings"]
    output = Path(spec["output_dir"])
    shutil.rmtree(output, ignore_errors=True)  # a finished output directory would be returned as it is
    config = RewardTrainingConfig(
        train_steps=settings["steps"], batch_size=settings["batch_size"],
        micro_batch_tokens=settings["micro_batch_tokens"],
        learning_rate_multiplier=settings["learning_rate"] / BASE_LEARNING_RATE,
        warmup_fraction=settings["warmup_fraction"], lora_dim=settings["lora_rank"],
        prompt_sequence_length=settings["prompt_length"], target_sequence_length=settings["target_length"],
        seed=settings["seed"], checkpoint_every=settings["steps"] + 1, normalization_pairs=settings["batch_size"],
        device="cpu")
    step_ends, step_cpu_ends = [], []

    def step_finished() -> bool:  # polled once after every optimizer step
        step_ends.append(time.perf_counter())
        step_cpu_ends.append(time.process_time())
        return False

    metrics = train_reward_model(config, spec["train_rows"], spec["held_out_rows"], spec["model_dir"], output,
                                 base_model_path=spec["model_dir"], stop_requested=step_finished)
    write_pair_result(sys.argv[2], step_ends, step_cpu_ends, metrics["eval_accuracy"], metrics["eval_pairs"])


if __name__ == "__main__":
    main()
