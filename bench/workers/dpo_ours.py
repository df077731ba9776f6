"""Our side of the DPO benchmark: `train_dpo` on the given pairs, timing every step.

Runs in the project's virtual environment: python dpo_ours.py SPEC.json RESULT.json
With `"packed": false` in the spec, every pair runs as two separate sequences (prompt + winner, prompt + loser),
as TRL runs them: the benchmark's measure of what the shared-prefix packing saves.
"""

import json
import shutil
import sys
import time
from pathlib import Path

from pair_result import write_pair_result

import rlhf.rl.dpo as dpo
from rlhf.reward.packing import pack
from rlhf.rl.config import BASE_LEARNING_RATE, PPOConfig

PACKED_LOG_PROBS = dpo.completion_log_probs


def two_sequences(pairs, pad_id, device):
    """Each pair as two rows, prompt + winner and prompt + loser: the prompt runs twice."""
    return pack([p.prompt for p in pairs for _ in range(2)], [[c] for p in pairs for c in (p.winner, p.loser)],
                pad_id).to(device)


def per_pair(model, batch):
    return PACKED_LOG_PROBS(model, batch).view(-1, 2)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    settings = spec["settings"]
    if not spec["packed"]:
        dpo._packed, dpo.completion_log_probs = two_sequences, per_pair
    output = Path(spec["output_dir"])
    shutil.rmtree(output, ignore_errors=True)  # a finished output directory would be returned as it is
    config = PPOConfig(
        tuning_method="dpo", train_steps=settings["steps"], batch_size=settings["batch_size"],
        micro_batch_size=settings["pairs_per_forward"], beta=settings["beta"],
        learning_rate_multiplier=settings["learning_rate"] / BASE_LEARNING_RATE,
        warmup_fraction=settings["warmup_fraction"], lora_dim=settings["lora_rank"],
        prompt_sequence_length=settings["prompt_length"], target_sequence_length=settings["target_length"],
        seed=settings["seed"], checkpoint_every=settings["steps"] + 1, device="cpu")
    step_ends, step_cpu_ends = [], []

    def step_finished() -> bool:  # polled once after every optimizer step
        step_ends.append(time.perf_counter())
        step_cpu_ends.append(time.process_time())
        return False

    metrics = dpo.train_dpo(config, spec["train_rows"], spec["held_out_rows"], spec["model_dir"], output,
                            base_model_path=spec["model_dir"], stop_requested=step_finished)
    write_pair_result(sys.argv[2], step_ends, step_cpu_ends, metrics["eval_accuracy"], metrics["eval_pairs"])


if __name__ == "__main__":
    main()
