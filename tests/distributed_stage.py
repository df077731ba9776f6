"""A training stage on the tiny model for the data-parallel tests, started the way `rlhf --nproc-per-node N`
starts one: `python -m tests.distributed_stage STAGE MODEL OUTPUT PROCESSES [--rank R --signal S --at K]`, STAGE
one of reward, sharded-reward, policy, group, dpo, or shards (what each rank holds of sharded weights). The parent process launches PROCESSES processes of itself through `rlhf.training.distributed.launch`; each
trains on its share. With `--signal`, rank R sends itself signal S (SIGKILL: a crashed machine; SIGTERM: a
preempted one) when the trainer polls for a stop request for the K-th time, i.e. after step K."""

import argparse
import json
import os
import sys
from pathlib import Path

from rlhf.reward.training import train_reward_model
from rlhf.rl.dpo import train_dpo
from rlhf.rl.ppo import train_policy
from rlhf.training.distributed import join, launch, leave
from rlhf.training.stopping import StopFlag
from tests.conftest import PROMPTS, TargetTokenShare, marker_pairs, ppo_config, reward_config

REWARD_SETTINGS = dict(train_steps=20, batch_size=8, checkpoint_every=2, micro_batch_tokens=256)
# The backbone's weights sharded over the processes; batches of 7 pairs, so one rank's share of 4 takes two
# micro-batches and the other's of 3 one, and the second makes an idle pass to keep in step.
SHARDED_REWARD_SETTINGS = {**REWARD_SETTINGS, "batch_size": 7, "shard_weights": True}
POLICY_SETTINGS = dict(train_steps=6, batch_size=16, micro_batch_size=4, ppo_minibatch_size=8, ppo_epochs=2,
                       target_sequence_length=6, checkpoint_every=2)
# RLOO with groups of 4 over micro-batches of 2: every group's baseline needs rollouts of both ranks; after a
# supervised warm-up of 2 steps of 16 pairs (a step's 16 rollouts), whose micro-batches of 2 the ranks share too.
GROUP_SETTINGS = {**POLICY_SETTINGS, "tuning_method": "rloo", "batch_size": 4, "samples_per_prompt": 4,
                  "micro_batch_size": 2, "sft_steps": 2, "prompt_sequence_length": 64}
# DPO with batches of 8 pairs in micro-batches of 2: each rank trains on 4 pairs of every batch.
DPO_SETTINGS = dict(tuning_method="dpo", train_steps=8, batch_size=8, micro_batch_size=2, beta=0.5,
                    learning_rate_multiplier=30.0, warmup_fraction=0.0, prompt_sequence_length=64,
                    target_sequence_length=32, checkpoint_every=2)


def stop_requests(rank: int, number: int, at: int):
    """The trainer's stop-request poll, which on rank `rank` sends the signal `number` at the `at`-th call."""
    flag = StopFlag().install()
    calls = 0

    def requested() -> bool:
        nonlocal calls
        calls += 1
        if number and join().rank == rank and calls == at:
            os.kill(os.getpid(), number)
        return flag()

    return requested


def held_weights(model: str) -> dict:
    """How many elements of the frozen and of the trained weights each rank holds once the reward model's
    backbone (with a LoRA adapter) is sharded, and the totals."""
    import torch

    from rlhf.models.loading import Placement, add_lora, load_backbone
    from rlhf.training.sharding import shard_frozen_weights

    ranks = join()
    backbone = add_lora(load_backbone(model, Placement(torch.device("cpu"), torch.float32)), 4)
    totals = {kind: sum(p.numel() for p in backbone.parameters() if p.requires_grad == (kind == "trained"))
              for kind in ("frozen", "trained")}
    shard_frozen_weights(backbone, ranks, torch.device("cpu"))
    held = {kind: sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in backbone.parameters()
                      if p.requires_grad == (kind == "trained")) for kind in totals}
    return {kind: {"held": [h[kind] for h in ranks.gather(held)], "total": totals[kind]} for kind in totals}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=("reward", "sharded-reward", "shards", "policy", "group", "dpo"))
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("processes", type=int)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--signal", type=int, default=0)
    parser.add_argument("--at", type=int, default=0)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        return launch(args.processes, sys.argv[1:], module="tests.distributed_stage")
    stop = stop_requests(args.rank, args.signal, args.at)
    if args.stage == "shards":
        result = held_weights(args.model)
    elif args.stage in ("reward", "sharded-reward"):
        rows = marker_pairs(48)
        config = reward_config(**(SHARDED_REWARD_SETTINGS if args.stage == "sharded-reward" else REWARD_SETTINGS))
        result = train_reward_model(config, rows[:40], rows[40:], args.model,
                                    Path(args.output), base_model_path=args.model, stop_requested=stop)
    elif args.stage == "dpo":
        rows = marker_pairs(48)
        result = train_dpo(ppo_config(**DPO_SETTINGS), rows[:40], rows[40:], args.model, Path(args.output),
                           base_model_path=args.model, stop_requested=stop)
    else:
        settings = POLICY_SETTINGS if args.stage == "policy" else GROUP_SETTINGS
        result = train_policy(ppo_config(**settings), PROMPTS, TargetTokenShare(), args.model,
                              Path(args.output), base_model_path=args.model, stop_requested=stop,
                              train_pairs=marker_pairs(48))
    if join().main:
        print(json.dumps(result))
    leave()
    return 75 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
