"""Our side of the PPO, RLOO and GRPO benchmarks: `train_policy` on the given prompts, timing every step and
reading the per-phase times it logs.

Runs in the project's virtual environment: python ppo_ours.py SPEC.json RESULT.json
With `"packed": false` in the spec (rloo, grpo), every rollout runs as its own sequence in the policy and reward
passes, as TRL runs them: the benchmark's measure of what packing each prompt once with its k completions saves.
"""

import json
import resource
import shutil
import sys
import time
from pathlib import Path

from rlhf.models.artifacts import TENSORBOARD_DIR
from rlhf.models.loading import pick_placement
from rlhf.rl.config import BASE_LEARNING_RATE, PPOConfig
from rlhf.rl.policy import Policy
from rlhf.rl.ppo import train_policy
from rlhf.rl.rewards import RewardModelReward

PHASES = ("generation", "forward", "scoring", "update")


def logged(output: Path, name: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / TENSORBOARD_DIR))
    events.Reload()
    return [e.value for e in events.Scalars(name)]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    settings = spec["settings"]
    if not spec.get("packed", True):
        Policy.pack_prompt_groups = lambda policy, *sizes: False
        RewardModelReward._prompt_run = lambda reward, prompts, limit: 1
    output = Path(spec["output_dir"])
    shutil.rmtree(output, ignore_errors=True)  # a finished output directory would be returned as it is
    batch, k = settings["batch_size"], settings["samples_per_prompt"]
    config = PPOConfig(
        tuning_method=settings["tuning_method"], samples_per_prompt=k, train_steps=settings["steps"],
        batch_size=batch, micro_batch_size=batch * k, ppo_minibatch_size=batch * k,
        ppo_epochs=settings["ppo_epochs"], learning_rate_multiplier=settings["learning_rate"] / BASE_LEARNING_RATE,
        warmup_fraction=0.0, kl_coeff=settings["kl_coeff"], lora_dim=settings["lora_rank"],
        temperature=settings["temperature"], penalize_unfinished=False,
        prompt_sequence_length=settings["prompt_length"], target_sequence_length=settings["new_tokens"],
        seed=settings["seed"], checkpoint_every=settings["steps"] + 1, sample_every=settings["steps"] + 1,
        device="cpu")
    reward = RewardModelReward(Path(spec["reward_dir"]), pick_placement("cpu"), spec["model_dir"])
    step_ends, step_cpu_ends = [], []

    def step_finished() -> bool:  # polled once after every PPO step
        step_ends.append(time.perf_counter())
        step_cpu_ends.append(time.process_time())
        return False

    train_policy(config, spec["rows"], reward, spec["model_dir"], output, base_model_path=spec["model_dir"],
                 stop_requested=step_finished)
    result = {"step_seconds": [b - a for a, b in zip(step_ends, step_ends[1:])],
              "step_cpu_seconds": [b - a for a, b in zip(step_cpu_ends, step_cpu_ends[1:])],
              # per step, the first (warm-up) step included; the caller drops it
              "phase_seconds": {phase: logged(output, f"time/{phase}") for phase in PHASES},
              "response_length": logged(output, "response_length"),
              "self_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    Path(sys.argv[2]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
