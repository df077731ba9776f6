"""A training stage on the tiny model for the data-parallel tests, started the way `rlhf --nproc-per-node N`
starts one: `python -m tests.distributed_stage STAGE MODEL OUTPUT PROCESSES [--rank R --signal S --at K]`, STAGE
one of reward, sharded-reward, policy, sharded-policy (with --reward-model), group, sharded-group, dpo,
sharded-dpo, shards and inference-shards (what each rank holds of a sharded reward model's backbone, or of
bulk inference's sharded model), or turns (when each rank loads a model it shards). The parent process
launches PROCESSES processes of itself through `rlhf.training.distributed.launch`; each trains on its share.
With `--signal`, rank R sends itself signal S (SIGKILL: a crashed machine; SIGTERM: a preempted one) when the
trainer polls for a stop request for the K-th time, i.e. after step K."""

import argparse
import json
import os
import sys
from pathlib import Path

from rlhf.reward.training import train_reward_model
from rlhf.rl.dpo import train_dpo
from rlhf.rl.ppo import train_policy
from rlhf.rl.rewards import RewardModelReward
from rlhf.training.distributed import join, launch, leave
from rlhf.training.stopping import StopFlag
from tests.conftest import PROMPTS, TargetTokenShare, marker_pairs, ppo_config, reward_config

REWARD_SETTINGS = dict(train_steps=20, batch_size=8, checkpoint_every=2, micro_batch_tokens=256)
# The backbone's weights sharded over the processes; batches of 7 pairs, so one rank's share of 4 takes two
# micro-batches and the other's of 3 one, and the second makes an idle pass to keep in step.
SHARDED_REWARD_SETTINGS = {**REWARD_SETTINGS, "batch_size": 7, "shard_weights": True}
POLICY_SETTINGS = dict(train_steps=6, batch_size=16, micro_batch_size=4, ppo_minibatch_size=8, ppo_epochs=2,
                       target_sequence_length=6, checkpoint_every=2)
# PPO with the policy's and the reward model's weights sharded, after 2 DPO warm-up steps: 3 micro-batches of 4
# a step (2 on one rank, 1 on the other, which samples, scores and trains an idle pass to keep in step), one
# micro-batch a minibatch. Completions of up to 32 tokens, so the pairs' winners and losers (which differ in their
# last word) differ within the limit.
SHARDED_POLICY_SETTINGS = {**POLICY_SETTINGS, "train_steps": 4, "batch_size": 12, "ppo_minibatch_size": 4,
                           "dpo_warmup_steps": 2, "beta": 0.5, "prompt_sequence_length": 64,
                           "target_sequence_length": 32, "shard_weights": True}
# RLOO with groups of 4 over micro-batches of 2: every group's baseline needs rollouts of both ranks; after a
# supervised warm-up of 2 steps of 16 pairs (a step's 16 rollouts), whose micro-batches of 2 the ranks share too.
GROUP_SETTINGS = {**POLICY_SETTINGS, "tuning_method": "rloo", "batch_size": 4, "samples_per_prompt": 4,
                  "micro_batch_size": 2, "sft_steps": 2, "prompt_sequence_length": 64}
# The same RLOO with the policy's weights sharded: 3 prompts of 4 samples, 3 micro-batches of 4 a step and of the
# supervised warm-up's 12 pairs (2 on one rank, 1 on the other, which makes idle passes), one a minibatch.
SHARDED_GROUP_SETTINGS = {**GROUP_SETTINGS, "batch_size": 3, "micro_batch_size": 4, "ppo_minibatch_size": 4,
                          "shard_weights": True}
# DPO with batches of 8 pairs in micro-batches of 2: each rank trains on 4 pairs of every batch.
DPO_SETTINGS = dict(tuning_method="dpo", train_steps=8, batch_size=8, micro_batch_size=2, beta=0.5,
                    learning_rate_multiplier=30.0, warmup_fraction=0.0, prompt_sequence_length=64,
                    target_sequence_length=32, checkpoint_every=2)
# The same with the policy's weights sharded: batches of 5 pairs, 3 on one rank (2 micro-batches) and 2 on the
# other (1, and an idle pass).
SHARDED_DPO_SETTINGS = {**DPO_SETTINGS, "batch_size": 5, "shard_weights": True}


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


def held_weights(model: str, generator: bool) -> dict:
    """How many elements each rank holds of the decoder layers' frozen weights, of the other frozen weights
    (embeddings, final norm, head) and of the trained ones (LoRA) once the reward model's backbone is sharded,
    or with `generator`, bulk inference's model (`load_generator`), with the totals."""
    import torch

    from rlhf.evaluation.inference import load_generator
    from rlhf.models.loading import Placement, add_lora, load_backbone
    from rlhf.training.sharding import shard_frozen_weights

    ranks = join()
    placement = Placement(torch.device("cpu"), torch.float32)
    if generator:
        whole = load_generator(model, None, placement)
        backbone = load_generator(model, None, placement, in_step=ranks)
    else:
        whole = backbone = add_lora(load_backbone(model, placement), 4)

    def kind(name, parameter):
        return "trained" if parameter.requires_grad else "layers" if ".layers." in name else "rest"

    def count(model: torch.nn.Module, local: bool) -> dict:
        counts = dict.fromkeys(("layers", "rest", "trained"), 0)
        for name, parameter in model.named_parameters():
            counts[kind(name, parameter)] += (parameter.to_local() if local and hasattr(parameter, "to_local")
                                              else parameter).numel()
        return counts

    totals = count(whole, local=False)
    if not generator:
        shard_frozen_weights(backbone, ranks, torch.device("cpu"))
    held = ranks.gather(count(backbone, local=True))
    return {name: {"held": [h[name] for h in held], "total": totals[name]} for name in totals}


def loading_times(model: str) -> list:
    """When each rank's turn to load a sharded model began and ended (a half-second stand-in for the loading)."""
    import time

    import torch

    from rlhf.training.sharding import loading_turn

    ranks = join()
    with loading_turn(ranks, True, model, torch.float32):
        began = time.monotonic()
        time.sleep(0.5)
        ended = time.monotonic()
    return ranks.gather([began, ended])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=("reward", "sharded-reward", "shards", "inference-shards", "turns", "policy",
                                          "sharded-policy", "group", "sharded-group", "dpo", "sharded-dpo"))
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("processes", type=int)
    parser.add_argument("--reward-model", help="sharded-policy: the reward model it is scored by")
    parser.add_argument("--batch-size", type=int, help="sharded-group: prompts a step instead of 3")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--signal", type=int, default=0)
    parser.add_argument("--at", type=int, default=0)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:
        return launch(args.processes, sys.argv[1:], module="tests.distributed_stage")
    stop = stop_requests(args.rank, args.signal, args.at)
    if args.stage in ("shards", "inference-shards"):
        result = held_weights(args.model, generator=args.stage == "inference-shards")
    elif args.stage == "turns":
        result = {"times": loading_times(args.model)}
    elif args.stage in ("reward", "sharded-reward"):
        rows = marker_pairs(48)
        config = reward_config(**(SHARDED_REWARD_SETTINGS if args.stage == "sharded-reward" else REWARD_SETTINGS))
        result = train_reward_model(config, rows[:40], rows[40:], args.model,
                                    Path(args.output), base_model_path=args.model, stop_requested=stop)
    elif args.stage in ("dpo", "sharded-dpo"):
        rows = marker_pairs(48)
        result = train_dpo(ppo_config(**(SHARDED_DPO_SETTINGS if args.stage == "sharded-dpo" else DPO_SETTINGS)),
                           rows[:40], rows[40:], args.model, Path(args.output),
                           base_model_path=args.model, stop_requested=stop)
    elif args.stage == "sharded-policy":
        config = ppo_config(**SHARDED_POLICY_SETTINGS)
        result = train_policy(config, PROMPTS, RewardModelReward.for_stage(Path(args.reward_model), config),
                              args.model, Path(args.output), base_model_path=args.model, stop_requested=stop,
                              train_pairs=marker_pairs(48))
    else:
        settings = {"policy": POLICY_SETTINGS, "group": GROUP_SETTINGS, "sharded-group": SHARDED_GROUP_SETTINGS}
        changed = {"batch_size": args.batch_size} if args.batch_size else {}
        result = train_policy(ppo_config(**{**settings[args.stage], **changed}), PROMPTS, TargetTokenShare(), args.model,
                              Path(args.output), base_model_path=args.model, stop_requested=stop,
                              train_pairs=marker_pairs(48))
    if join().main:
        print(json.dumps(result))
    leave()
    return 75 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
