"""What a bigger rollout pass saves: PPO's rollout (sampling, reference log-probs, reward) of the same 16
bundled prompts at `reinforcement_learning_rollout_micro_batch_size` 8 and 16, interleaved in one process.

    .venv/bin/python bench/rollout_pass.py [--repeats 3]

Every row decodes the full `--new-tokens` (no stop token is honoured), so both sizes do the same work; the
time is that of `rlhf.rl.ppo.collect` for all 16 rollouts, split by phase. The reward model is the default
model's backbone with a seeded head (its scores do not matter here).
"""

from __future__ import annotations

import argparse

from common import (
    INSTRUCTION,
    SCRATCH,
    bundled_prompts,
    load_average,
    machine,
    model_dir,
    our_versions,
    summary,
    write_results,
)
from ppo import make_reward_model

NAME = "rollout_pass"
SIZES = (8, 16)
PHASES = ("generation", "forward", "scoring")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each size, after one warm-up")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_placement
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.policy import Policy
    from rlhf.rl.ppo import collect
    from rlhf.rl.rewards import RewardModelReward

    load_at_start = load_average()
    base = model_dir()
    settings = {"prompt_length": 512, "new_tokens": args.new_tokens, "seed": 0}
    reward_dir = SCRATCH / "rollout-pass-reward-model"
    make_reward_model(base, settings, reward_dir)
    placement = pick_placement("cpu")
    tokenizer = load_tokenizer(base)
    rows, prompts = bundled_prompts(tokenizer, args.new_tokens, 16)
    torch.manual_seed(0)
    policy = Policy.create(load_causal_lm(base, placement), 8, [-1], tokenizer.pad_token_id)  # never stops
    reward_fn = RewardModelReward(reward_dir, placement, base)
    config = PPOConfig(target_sequence_length=args.new_tokens, kl_coeff=0.05, instruction=INSTRUCTION)

    seconds = {size: {phase: [] for phase in (*PHASES, "total")} for size in SIZES}
    for round_ in range(args.repeats + 1):
        for size in SIZES:
            phases = dict.fromkeys(PHASES, 0.0)
            for first in range(0, len(rows), size):
                experience = collect(policy, rows[first:first + size], prompts[first:first + size], reward_fn, config)
                for phase in PHASES:
                    phases[phase] += experience.seconds[phase]
            if round_:  # the first round warms up
                for phase in PHASES:
                    seconds[size][phase].append(phases[phase])
                seconds[size]["total"].append(sum(phases.values()))
    result = {"benchmark": NAME, "new_tokens": args.new_tokens, "rollouts": len(rows),
              "seconds": {size: {phase: summary(v) for phase, v in by.items()} for size, by in seconds.items()},
              "versions": our_versions(), "machine": machine(),
              "load_average_start": load_at_start, "load_average_end": load_average()}
    write_results(NAME, result, markdown(result))


def markdown(r: dict) -> str:
    by = r["seconds"]
    lines = ["### A rollout pass of 16 against two of 8 (ours)", "",
             f"{r['rollouts']} bundled prompts, {r['new_tokens']} new tokens each; median over "
             f"{by[SIZES[0]]['total']['n']} rounds after a warm-up, both sizes in one process.", "",
             "| phase | 2 passes of 8 (s) | 1 pass of 16 (s) | ratio |", "|---|---|---|---|"]
    for phase in (*PHASES, "total"):
        small, large = by[8][phase]["median"], by[16][phase]["median"]
        lines.append(f"| {phase} | {small:.2f} | {large:.2f} | {small / large:.2f}x |")
    lines += ["", f"Load average start {r['load_average_start']}, end {r['load_average_end']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
