"""Supervised warm-up: before the first rollout (DPO: before its first step), `sft_steps` steps of next-token
loss on the training pairs' winners given their prompts, on the policy's own adapter.

Why: reinforcement learning improves only what the policy samples. The best RLHF pipelines start PPO from a
supervised model of the task (InstructGPT; the N+ scripts' SFT -> reward model -> PPO; OpenRLHF's and TRL's
examples), and the preference data's winners are this pipeline's demonstrations of it. Without them a small
chat model asked to summarise answers the poster with advice, samples a summary the reward model pays for
about once in a hundred tries, and PPO's steps go into what it does sample (LEARNING.md). The warm-up runs in
the policy stage, so the pipeline's stages and artifacts stay as they are. PPO's KL penalty is to the
warmed-up policy (rlhf/rl/ppo.py); the report's KL is to the base model, so the warm-up's distance from it is
counted.

A step: `PPOConfig.pairs_per_step()` pairs in a seeded order, in micro-batches of `micro_batch_size`, each
winner packed after its prompt; the loss is the mean over the batch's winner tokens (EOS included, so the
policy learns to end), one optimizer step on the run's schedule.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.reward.packing import pack
from rlhf.reward.training import EncodedPair
from rlhf.rl.config import PPOConfig
from rlhf.rl.policy import Policy, completion_log_probs
from rlhf.training.batching import batch_indices
from rlhf.training.distributed import Ranks
from rlhf.training.loop import clock, optimizer_step, require_finite
from rlhf.training.sharding import lockstep


def sft_gradients(policy: Policy, pairs: list[EncodedPair], indices: list[int], micro_batch_size: int,
                  ranks: Ranks) -> tuple[float, float]:
    """Gradients of the batch's token-mean winner loss, this rank's share of its micro-batches; returns the
    batch's summed loss and its winner tokens, over all ranks."""
    batch_tokens = sum(len(pairs[i].winner) for i in indices)
    micro_batches = [indices[start:start + micro_batch_size] for start in range(0, len(indices), micro_batch_size)]
    summed = 0.0
    for micro in lockstep(ranks.share(micro_batches), policy.in_step):
        batch = pack([pairs[i].prompt for i in micro or micro_batches[0]],
                     [[pairs[i].winner] for i in micro or micro_batches[0]], policy.pad_id)
        loss = -completion_log_probs(policy.model, batch.to(policy.device)).sum()
        if micro is None:  # a pass the ranks sharing the weights owe each other: it counts 0
            (loss * 0.0).backward()
            continue
        (loss / batch_tokens).backward()
        summed += float(loss.detach())
    total, = ranks.total([summed])
    return total, float(batch_tokens)


def sft_step(policy: Policy, pairs: list[EncodedPair], step: int, config: PPOConfig, optimizer, scheduler,
             checkpoint_dir: Path, ranks: Ranks) -> dict:
    """One warm-up step: the step's pairs, their gradients summed over the ranks, one optimizer step; returns
    what the step logs (the token-mean loss on the winners, in nats)."""
    started = clock(policy.device)
    indices = batch_indices(step, config.pairs_per_step(), len(pairs), config.seed)
    loss, tokens = sft_gradients(policy, pairs, indices, config.micro_batch_size, ranks)
    require_finite(loss, "reinforcement learning", step, checkpoint_dir)
    adapter = [p for p in policy.model.parameters() if p.requires_grad]  # the value head has no part in it
    ranks.sum_gradients(adapter)
    optimizer_step(optimizer, scheduler, [adapter], config.max_grad_norm)
    return {"step": step + 1, "sft_loss": loss / tokens, "learning_rate": scheduler.get_last_lr()[0],
            "time/update": clock(policy.device) - started}


def final_sft_loss(history: list[dict], sft_steps: int) -> float | None:
    """The last warm-up step's loss, from a run's history (None without a warm-up)."""
    return history[sft_steps - 1]["sft_loss"] if sft_steps else None
