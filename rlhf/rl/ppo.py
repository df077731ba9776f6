"""PPO: tune the policy (base model + LoRA) to raise the reward while a KL penalty keeps it near its reference
(the base, or after a warm-up the warmed-up policy).

Read `train_policy` top to bottom. Each step:
1. take `batch_size` prompts in a seeded order;
2. roll out, `rollout_micro_batch_size` prompts at a time: sample completions with the KV cache, keeping the
   policy's log-prob of each sampled token and the value of the state before it from that same pass; with
   no gradient, the reference log-probs (the same model with the adapter switched off, or set to the
   weights the warm-up left; skipped when kl_coeff is 0) and the reward of each completion (a completion that
   never emits EOS gets `unfinished_reward` instead of its score, unless that is turned off). Both frozen
   passes keep each prompt's keys and values the first time they meet it and afterwards run only the
   completions over them (rlhf/rl/prefix_cache.py): the run's prompts come back step after step, and are most
   of the tokens;
3. per-token rewards: `-kl_coeff * (log p_policy - log p_reference)` on every token, plus the score on the
   last one; advantages with GAE(gamma, lambda), whitened over the batch (with `kl_target`, the step's
   kl_coeff comes from the adaptive controller, `kl_coefficient`);
4. `ppo_epochs` passes over the rollouts in minibatches (`micro_batch_size` rollouts to a forward and
   backward pass): the clipped policy objective plus
   `value_loss_coeff` times the clipped value loss, one optimizer step per minibatch;
5. log (TensorBoard names as Vertex's: reward, kl_loss, rl_loss, entropy, value_loss, clip_fraction,
   approx_kl, response_length, plus sample completions as text) and checkpoint.

`tuning_method` picks how step 3 estimates advantages, all else (sampling, scoring, the unfinished penalty,
the clipped objective, checkpoints) being the same, as OpenRLHF's and verl's advantage estimators do:
- ppo: GAE over a value head (below), whitened over the batch;
- rloo: each prompt is sampled `samples_per_prompt` (k) times; a completion's advantage, on each of its
  tokens, is its reward minus the mean reward of the prompt's other k - 1 completions, the reward carrying the
  KL penalty (`score - kl_coeff * KL`), as in TRL's RLOOTrainer;
- grpo: the same k samples; the advantage is the reward minus the group mean, over the group's standard
  deviation, and the KL to the reference is a loss term (`kl_coeff` times the k3 estimator per token), as in
  the GRPO paper and TRL's GRPOTrainer.
Neither learns a value: the value head is left as it starts and the value loss is 0. Every loss is a token
mean over the minibatch. When each micro-batch holds whole groups (`micro_batch_size` a multiple of k), the
reference pass and the update pack each group's prompt once with its k completions (`Policy.evaluate`),
and the reward model scores them packed the same way: the prompt, most of the tokens, runs once, not k times.

Value function (ppo): a linear head on the policy's own last hidden state. It comes out of the same forward
passes that give the log-probs (while sampling, and in the update), so it costs almost nothing. It starts
at zero (the first advantages are the rewards themselves, not a random head's error) and reads the
hidden state detached, so the value loss trains the head alone and never moves the policy; the two
gradients are clipped and logged apart (`policy_grad_norm`, `value_grad_norm`). GAE's lambda defaults to 1
(TRL and the N+ scripts use 0.95 beside a separate critic initialised from the reward model): with a
value that starts at 0 and learns slowly, lambda 0.95 would hand a completion's first token only
0.95^(length) of its score (0.13 at 40 tokens), and the first words, where an answer decides to
summarise or to advise, would hardly learn. Measured on the bundled sample, one seed: at 0.95 the tuned model learned
to end and to be short, at 1 also to stay on the post's topic (see LEARNING.md).
A separate critic (a second backbone with its own LoRA and head, e.g. initialised from the reward
model) needs its own forward pass in the rollout and its own forward and backward pass in every update.
Measured on the default model, CPU, 8 rollouts of 160 prompt + 48 completion tokens
(`experiments/value_head_cost.py`, medians of 3): rollout forward 2.87 s with the head against 5.38 s
with a separate critic (1.87x); update forward + backward 6.13 s against 11.29 s (1.84x). On a machine
where the policy update dominates, the head keeps PPO's cost close to that of the policy alone.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rlhf.data.validation import user_input
from rlhf.errors import UserError
from rlhf.models.loading import load_causal_lm, machine, recompute_activations, stop_token_ids
from rlhf.reward.training import encode_pairs
from rlhf.rl.config import PPOConfig
from rlhf.rl.dpo import ReferenceLogProbs, dpo_step
from rlhf.rl.policy import Policy, PolicySpec, save_policy
from rlhf.rl.rewards import RewardFunction, RewardModelReward
from rlhf.rl.rollouts import Rollout
from rlhf.rl.sft import final_sft_loss, sft_step
from rlhf.training.batching import batch_indices, warmup_cosine
from rlhf.training.checkpoints import finished_result
from rlhf.training.distributed import Ranks, seed_of
from rlhf.training.loop import (
    METRICS_FILE,
    TrainingLoop,
    clock,
    final_mean,
    optimizer_step,
    require_finite,
    run_fingerprint,
)
from rlhf.training.sharding import loading_placement, loading_turn, lockstep
from rlhf.training.stage import start_stage


@dataclass
class Experience:
    """One micro-batch of rollouts with everything the PPO update needs."""

    rollout: Rollout
    old_log_probs: torch.Tensor  # [batch, completion]
    old_values: torch.Tensor  # [batch, completion]
    advantages: torch.Tensor  # [batch, completion]
    returns: torch.Tensor  # [batch, completion]
    scores: torch.Tensor  # [batch]: reward-model score, or the unfinished penalty
    raw_scores: torch.Tensor  # [batch]: the reward-model score of every completion, ended or not
    kl: torch.Tensor | None  # [batch]: summed per-token log-ratio policy/reference; None when kl_coeff is 0
    reference_log_probs: torch.Tensor | None  # [batch, completion]: the adapter-off model's; None when kl_coeff is 0
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of generation, forward, scoring


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over completion tokens; masked positions get 0."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


@torch.no_grad()
def collect(policy: Policy, rows: list[dict], prompts: list[list[int]], reward_fn: RewardFunction,
            config: PPOConfig) -> Experience:
    started = clock(policy.device)
    rollout, log_probs, values = policy.roll_out(prompts, config.target_sequence_length, config.temperature,
                                                 config.top_p)
    generated = clock(policy.device)
    mask = rollout.completion_mask.float()
    kl = reference_log_probs = None
    rewards = torch.zeros_like(log_probs)
    if config.kl_coeff > 0:
        reference_log_probs, _, _ = policy.evaluate(rollout, config.temperature, with_values=False, reference=True)
        per_token_kl = (log_probs - reference_log_probs) * mask
        kl = per_token_kl.sum(dim=1)
        rewards -= config.kl_coeff * per_token_kl
    forwarded = clock(policy.device)
    scores = reward_fn(rows, rollout.completions()).to(mask.device).float()
    scored = clock(policy.device)
    raw_scores = scores
    if config.penalize_unfinished:
        scores = torch.where(rollout.ended, scores, torch.full_like(scores, config.unfinished_reward))
    seconds = {"generation": generated - started, "forward": forwarded - generated, "scoring": scored - forwarded}
    if config.tuning_method == "ppo":
        last = mask.sum(dim=1).long() - 1
        rewards[torch.arange(len(rows)), last] += scores
        advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    else:  # filled in by `group_advantages` once the whole batch is scored; no value is learned
        advantages, returns = torch.zeros_like(mask), torch.zeros_like(mask)
    return Experience(rollout, log_probs, values * mask, advantages, returns, scores, raw_scores, kl,
                      reference_log_probs, seconds)


def kl_coefficient(config: PPOConfig, rl_history: list[dict]) -> float:
    """The KL weight of the next step: `kl_coeff`, or with `kl_target` the adaptive controller of Ziegler et al.
    (2019), as TRL's AdaptiveKLController: after each step the weight is multiplied by 1 + e * rollouts /
    `kl_horizon`, where e is the step's mean KL per completion relative to the target, minus 1, clipped to
    [-0.2, 0.2]. Replayed from the KL each step logged, so a resumed run goes on with the weight an
    uninterrupted one has."""
    coefficient = config.kl_coeff
    if config.kl_target > 0:
        for record in rl_history:
            error = min(max(record["kl"] / config.kl_target - 1, -0.2), 0.2)
            coefficient *= 1 + error * config.rollouts_per_step() / config.kl_horizon
    return coefficient


def group_baseline(rewards: torch.Tensor, method: str) -> torch.Tensor:
    """Advantages of [prompts, samples_per_prompt] sequence rewards against the other samples of the same
    prompt: RLOO subtracts the mean of the other k - 1 (Ahmadian et al. 2024; TRL's RLOOTrainer); GRPO
    subtracts the group's mean and divides by its standard deviation (Shao et al. 2024; TRL's GRPOTrainer,
    with its 1e-4 so a group of equal rewards gets advantages of 0)."""
    k = rewards.shape[1]
    if method == "rloo":
        return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + 1e-4)


def group_advantages(experiences: list[Experience], numbers: list[int], config: PPOConfig, ranks: Ranks) -> None:
    """Step 3 for rloo and grpo: one advantage per completion, on each of its tokens, from the sequence rewards
    of its prompt's group, gathered from every rank (a group may span micro-batches and ranks). RLOO's reward
    carries the KL penalty (`score - kl_coeff * KL`, as TRL's RLOO); GRPO's KL is a loss term instead."""
    penalised = config.tuning_method == "rloo" and config.kl_coeff > 0
    local = [(number, (e.scores - config.kl_coeff * e.kl if penalised else e.scores).tolist())
             for number, e in zip(numbers, experiences)]
    batches = sorted((item for part in ranks.gather(local) for item in part), key=lambda item: item[0])
    rewards = torch.tensor([r for _, batch in batches for r in batch], dtype=torch.float64)
    advantages = group_baseline(rewards.view(-1, config.samples_per_prompt), config.tuning_method).flatten()
    for number, experience in zip(numbers, experiences):
        rows = advantages[number * config.micro_batch_size:(number + 1) * config.micro_batch_size]
        mask = experience.rollout.completion_mask.float()
        experience.advantages = rows.to(mask)[:, None] * mask


def whiten(experiences: list[Experience], ranks: Ranks) -> None:
    """Advantages to zero mean and unit variance over every real token of the batch, on all ranks."""
    flat = torch.cat([e.advantages[e.rollout.completion_mask.bool()].double() for e in experiences]
                     or [torch.zeros(0, dtype=torch.float64)])
    count, total = ranks.total([flat.numel(), float(flat.sum())])
    mean = total / count
    squares, = ranks.total([float(((flat - mean) ** 2).sum())])
    std = max(math.sqrt(squares / (count - 1)), 1e-8) if count > 1 else 1.0
    for experience in experiences:
        experience.advantages = (experience.advantages - mean) / std * experience.rollout.completion_mask


def micro_batches(experience: Experience, size: int) -> list[Experience]:
    """A rollout pass's experience cut into the update's micro-batches of `size` rows, each without the columns
    that are padding in all of its rows; a phase's time goes to the pieces by their share of rows."""
    count = len(experience.scores)
    pieces = []
    for start in range(0, count, size):
        stop = min(start + size, count)
        rollout = experience.rollout.rows(start, stop)
        cells = (slice(start, stop), slice(0, rollout.completion_mask.shape[1]))
        pieces.append(Experience(
            rollout, experience.old_log_probs[cells], experience.old_values[cells], experience.advantages[cells],
            experience.returns[cells], experience.scores[start:stop], experience.raw_scores[start:stop],
            None if experience.kl is None else experience.kl[start:stop],
            None if experience.reference_log_probs is None else experience.reference_log_probs[cells],
            {phase: seconds * (stop - start) / count for phase, seconds in experience.seconds.items()}))
    return pieces


def roll_out(policy: Policy, prompt_rows: list[dict], prompts: list[list[int]], chosen: list[int],
             reward_fn: RewardFunction, config: PPOConfig, step: int,
             ranks: Ranks) -> tuple[list[Experience], list[list[dict]], list[int]]:
    """Steps 2 and 3 for the chosen prompts: the batch is numbered in micro-batches of `micro_batch_size`, each
    rank takes its share, and samples and scores them `rollout_micro_batch_size` rollouts to a pass (one pass
    per micro-batch when it is 0), each pass from its own seed; the advantages whitened over the whole batch.
    `chosen` holds each prompt `samples_per_prompt` times in a row, so a prompt's group is consecutive rollouts.
    Returns the experiences, their rows and their micro-batches' numbers in the step, a micro-batch each."""
    experiences, batch_rows, numbers = [], [], []
    mine = ranks.share(list(enumerate(range(0, len(chosen), config.micro_batch_size))))
    per_pass = config.micro_batches_per_rollout_pass()
    for first_group in lockstep(list(range(0, len(mine), per_pass)), policy.in_step):
        if first_group is None:  # a pass the ranks sharing the weights owe each other: the first prompts, unused
            prompt_indices = chosen[:config.micro_batch_size]
            collect(policy, [prompt_rows[i] for i in prompt_indices], [prompts[i] for i in prompt_indices],
                    reward_fn, config)
            continue
        groups = mine[first_group:first_group + per_pass]
        indices = [i for _, first in groups for i in chosen[first:first + config.micro_batch_size]]
        rows = [prompt_rows[i] for i in indices]
        torch.manual_seed(seed_of(config.seed, step, groups[0][0]))
        experience = collect(policy, rows, [prompts[i] for i in indices], reward_fn, config)
        pieces = micro_batches(experience, config.micro_batch_size) if per_pass > 1 else [experience]
        for (number, _), piece, start in zip(groups, pieces, range(0, len(rows), config.micro_batch_size)):
            experiences.append(piece)
            batch_rows.append(rows[start:start + config.micro_batch_size])
            numbers.append(number)
    if config.tuning_method == "ppo":
        whiten(experiences, ranks)
    else:
        group_advantages(experiences, numbers, config, ranks)
    return experiences, batch_rows, numbers


PHASES = ("generation", "forward", "scoring")


def batch_statistics(experiences: list[Experience], numbers: list[int], ranks: Ranks) -> dict:
    """The step's per-completion numbers from every rank, in micro-batch order; each micro-batch's completion
    tokens; each phase's wall time on the slowest rank."""
    local = [(number, {"scores": e.scores.tolist(), "raw_scores": e.raw_scores.tolist(),
                       "kl": None if e.kl is None else e.kl.tolist(),
                       "lengths": e.rollout.completion_mask.sum(dim=1).tolist(),
                       "ended": e.rollout.ended.float().tolist()}) for number, e in zip(numbers, experiences)]
    seconds = {phase: sum(e.seconds[phase] for e in experiences) for phase in PHASES}
    gathered = ranks.gather((local, seconds))
    batches = [batch for _, batch in sorted((item for part, _ in gathered for item in part), key=lambda i: i[0])]
    statistics = {name: torch.tensor([value for batch in batches for value in batch[name]], dtype=torch.float64)
                  for name in ("scores", "raw_scores", "lengths", "ended")}
    statistics["kl"] = None if batches[0]["kl"] is None else torch.tensor(
        [value for batch in batches for value in batch["kl"]], dtype=torch.float64)
    statistics["tokens"] = [float(sum(batch["lengths"])) for batch in batches]
    statistics["seconds"] = {phase: max(part[phase] for _, part in gathered) for phase in PHASES}
    return statistics


def ppo_losses(policy: Policy, experience: Experience, config: PPOConfig) -> dict[str, torch.Tensor]:
    """Token sums (not means) of the losses and statistics for one micro-batch, with gradients on the losses."""
    mask = experience.rollout.completion_mask.float()
    learns_value = config.tuning_method == "ppo"
    log_probs, entropy, values = policy.evaluate(experience.rollout, config.temperature, with_values=learns_value,
                                                 with_entropy=True)
    # Zero outside the completions: there the old log-probs are those of padding and say nothing.
    log_ratio = (log_probs - experience.old_log_probs) * mask
    ratio = torch.exp(log_ratio)
    advantages = experience.advantages
    policy_loss = torch.max(-advantages * ratio,
                            -advantages * ratio.clamp(1 - config.clip_range, 1 + config.clip_range))
    if config.tuning_method == "grpo" and experience.reference_log_probs is not None:
        # GRPO's KL term (Shao et al. 2024): the k3 estimator exp(r) - r - 1 of KL(policy || reference), with
        # r = log p_reference - log p_policy per token; unbiased, never negative.
        reference_ratio = experience.reference_log_probs - log_probs
        policy_loss = policy_loss + config.kl_coeff * (torch.exp(reference_ratio) - reference_ratio - 1)
    if learns_value:
        clipped_values = experience.old_values + (values - experience.old_values).clamp(
            -config.value_clip_range, config.value_clip_range)
        value_loss = 0.5 * torch.max((values - experience.returns) ** 2, (clipped_values - experience.returns) ** 2)
    else:
        value_loss = torch.zeros_like(mask)
    log_ratio = log_ratio.detach()
    return {
        "policy_loss": (policy_loss * mask).sum(),
        "value_loss": (value_loss * mask).sum(),
        "entropy": (entropy * mask).sum(),
        "approx_kl": (((ratio.detach() - 1) - log_ratio) * mask).sum(),
        "clip_fraction": (((ratio.detach() - 1).abs() > config.clip_range).float() * mask).sum(),
    }


LOGGED_LOSSES = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")


def minibatch_gradients(policy: Policy, group: list[Experience], tokens: float, config: PPOConfig, step: int,
                        checkpoint_dir: Path, totals: dict[str, float], idle: Experience) -> None:
    """Accumulate the gradients of this rank's part of one minibatch's joint loss (token mean over the
    minibatch's `tokens` on all ranks), a micro-batch at a time; adds each micro-batch's token sums to
    `totals`. With the weights sharded, the passes this rank owes the others are made on `idle`."""
    for experience in lockstep(group, policy.in_step):
        if experience is None:  # a pass the ranks sharing the weights owe each other: it counts 0
            losses = ppo_losses(policy, idle, config)
            ((losses["policy_loss"] + losses["value_loss"]) * 0.0).backward()
            continue
        losses = ppo_losses(policy, experience, config)
        loss = (losses["policy_loss"] + config.value_loss_coeff * losses["value_loss"]) / tokens
        require_finite(float(loss.detach()), "reinforcement learning", step, checkpoint_dir)
        loss.backward()
        for name in LOGGED_LOSSES:
            totals[name] += float(losses[name].detach())


def ppo_update(policy: Policy, experiences: list[Experience], numbers: list[int], tokens: list[float], optimizer,
               scheduler, config: PPOConfig, step: int, checkpoint_dir: Path, ranks: Ranks) -> dict[str, float]:
    """Step 4: `ppo_epochs` passes over the step's rollouts in minibatches of `ppo_minibatch_size`, one
    optimizer step each. A minibatch is a seeded draw of the step's micro-batches (numbered, with their
    completion `tokens`, over all ranks); each rank takes the gradients of those it holds, and the ranks sum
    them before the step. Returns the token means of the losses and statistics, and the mean gradient norms
    before clipping.

    The value head reads detached hidden states, so the value loss trains the head alone and the policy
    loss the adapter alone: each has its own gradient norm and its own clip, and value error never moves
    the policy."""
    clipped = [[p for p in policy.model.parameters() if p.requires_grad], list(policy.value_head.parameters())]
    micro_per_minibatch = config.ppo_minibatch_size // config.micro_batch_size
    held = dict(zip(numbers, experiences))
    totals = dict.fromkeys(LOGGED_LOSSES, 0.0)
    norms = [0.0, 0.0]
    token_count, updates = 0.0, 0
    for epoch in range(config.ppo_epochs):
        order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed_of(config.seed, step, epoch)))
        for first in range(0, len(order), micro_per_minibatch):
            minibatch = order[first:first + micro_per_minibatch].tolist()
            minibatch_tokens = sum(tokens[number] for number in minibatch)
            minibatch_gradients(policy, [held[n] for n in minibatch if n in held], minibatch_tokens, config, step,
                                checkpoint_dir, totals, experiences[0] if experiences else None)
            ranks.sum_gradients([p for group in clipped for p in group])
            token_count += minibatch_tokens
            norms = [total + norm for total, norm in
                     zip(norms, optimizer_step(optimizer, scheduler, clipped, config.max_grad_norm), strict=True)]
            updates += 1
    summed = dict(zip(LOGGED_LOSSES, ranks.total([totals[name] for name in LOGGED_LOSSES]), strict=True))
    policy_norm, value_norm = (total / updates for total in norms)
    return {**{name: value / token_count for name, value in summed.items()},
            "policy_grad_norm": policy_norm, "value_grad_norm": value_norm}


def step_record(step: int, batch: dict, totals: dict[str, float], update_seconds: float, learning_rate: float,
                config: PPOConfig) -> dict:
    """Step 5: what a step logs (TensorBoard names as Vertex's), from the whole batch's `batch_statistics`."""
    scores, raw_scores, lengths, ended = (batch[name] for name in ("scores", "raw_scores", "lengths", "ended"))
    kl = float(batch["kl"].mean()) if batch["kl"] is not None else None
    return {
        "step": step + 1,
        "reward": float(scores.mean()),
        "kl": kl,
        "kl_loss": config.kl_coeff * kl if kl is not None else None,
        "kl_coeff": config.kl_coeff,
        "rl_loss": totals["policy_loss"],
        "value_loss": totals["value_loss"],
        "entropy": totals["entropy"],
        "approx_kl": totals["approx_kl"],
        "clip_fraction": totals["clip_fraction"],
        "policy_grad_norm": totals["policy_grad_norm"],
        "value_grad_norm": totals["value_grad_norm"],
        # Raw reward-model scores of the completions that ended and of those the limit cut: the unfinished
        # penalty only works while it stays below the first.
        "score_finished": _mean_where(raw_scores, ended > 0),
        "score_unfinished": _mean_where(raw_scores, ended == 0),
        "response_length": float(lengths.mean()),
        "ended_share": float(ended.mean()),
        "learning_rate": learning_rate,
        # Where the step's time went: sampling (with the policy's log-probs and values), the reference log-prob
        # pass, the reward function, and the PPO epochs (forward, backward, optimizer).
        **{f"time/{phase}": seconds for phase, seconds in batch["seconds"].items()},
        "time/update": update_seconds,
    }


def _ending_does_not_pay(config: PPOConfig, record: dict) -> bool:
    finished = record.get("score_finished")  # absent from the supervised warm-up's steps
    return config.penalize_unfinished and finished is not None and config.unfinished_reward > finished


def _warn_the_first_time_ending_does_not_pay(config: PPOConfig, record: dict, history: list[dict]) -> None:
    if _ending_does_not_pay(config, record) and not any(_ending_does_not_pay(config, h) for h in history):
        print(f"Warning: at step {record['step']} the unfinished penalty {config.unfinished_reward} is above the "
              f"mean score of completions that end ({record['score_finished']:.3f}): never ending pays; "
              "lower --unfinished-reward", file=sys.stderr)


def _mean_where(values: torch.Tensor, where: torch.Tensor) -> float | None:
    return float(values[where].mean()) if bool(where.any()) else None


def _samples_markdown(tokenizer, rows: list[dict], experience: Experience, count: int = 3) -> str:
    lines = ["| prompt | completion | reward |", "|---|---|---|"]
    for row, completion, score in list(zip(rows, experience.rollout.completions(), experience.scores.tolist()))[:count]:
        prompt = user_input(row)
        cells = [prompt[-300:], tokenizer.decode(completion, skip_special_tokens=True)]
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
        lines.append(f"| {cells[0]} | {cells[1]} | {score:.3f} |")
    return "\n".join(lines)


def optimizer_and_schedule(policy: Policy, config: PPOConfig):
    """AdamW over the policy's trainable weights (adapter and value head), and its learning-rate schedule: a
    linear warm-up over `warmup_fraction` of all optimizer steps, the warm-up's (supervised or DPO) and PPO's
    counted together, then cosine decay to 0."""
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate(),
                                  weight_decay=0.0)
    total_updates = config.warmup_steps() + config.train_steps * config.updates_per_step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(math.ceil(config.warmup_fraction * total_updates), total_updates))
    return optimizer, scheduler


def train_policy(
    config: PPOConfig,
    prompt_rows: list[dict],
    reward_fn: RewardFunction,
    large_model_reference: str,
    output_dir: Path,
    base_model_path: str | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
    train_pairs: list[dict] = (),
) -> dict:
    """Train, or resume, or return the finished result in `output_dir`. Returns the metrics dict.

    A warm-up on `train_pairs` (the training pairs) comes first: `config.sft_steps` supervised steps on their
    winners (rlhf/rl/sft.py), or `config.dpo_warmup_steps` DPO steps on them (rlhf/rl/dpo.py, the base as
    DPO's reference). From its end on, the reference of the KL penalty is the warmed-up policy, not the base:
    PPO starts where the warm-up left it, and a penalty toward the base would spend PPO's steps undoing the
    warm-up (InstructGPT, the N+ scripts, TRL and OpenRLHF all take the model PPO starts from as the
    reference; LEARNING.md measured both). Each step after the warm-up is the module's five: (1) `batch_indices`
    picks the prompts; (2, 3) `roll_out` samples, scores and computes the advantages; (4) `ppo_update` runs the
    PPO epochs; (5) `step_record` is what the loop logs, and the loop checkpoints. Started by
    `torch.distributed.run`, each process rolls out and trains on its share of every batch
    (`rlhf.training.distributed`)."""
    config.validate()
    if not prompt_rows:
        raise UserError("reinforcement learning: no prompts")
    warmup = config.warmup_steps()
    if warmup and not train_pairs:
        raise UserError("reinforcement learning: the warm-up (sft_steps, dpo_warmup_steps) needs the training pairs, "
                        "which it learns")
    train_pairs = list(train_pairs) if warmup else []
    output_dir = Path(output_dir)
    run_id = run_fingerprint(config, [large_model_reference, reward_fn.name], prompt_rows + train_pairs)
    finished = finished_result(output_dir / METRICS_FILE, run_id, "tuned policy")
    if finished is not None:
        return finished

    ranks, placement, base_path, tokenizer, encoder = start_stage(config, large_model_reference, base_model_path)
    prompts = [encoder.encode_prompt(r) for r in prompt_rows]
    warmup_pairs = encode_pairs(train_pairs, encoder)
    micro_batches_per_step = config.rollouts_per_step() // config.micro_batch_size
    if config.shard_weights and micro_batches_per_step < ranks.world_size:
        # A rank without a micro-batch would have no rollout to make the update's idle passes with.
        raise UserError(f"reinforcement learning: sharded over {ranks.world_size} processes, a step needs at least "
                        f"as many micro-batches; it has {micro_batches_per_step}: raise the batch size or lower the "
                        "micro-batch size")

    torch.manual_seed(config.seed)
    with loading_turn(ranks, config.shard_weights, base_path, placement.dtype):
        model = load_causal_lm(base_path, loading_placement(placement, config.shard_weights))
        policy = Policy.create(model, config.lora_dim, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
        if config.gradient_checkpointing:
            recompute_activations(policy.model)
        policy.place(placement.device, ranks, config.shard_weights)
    if policy.in_step.parallel and ranks.main:
        print(f"policy: each of {ranks.world_size} processes holds 1/{ranks.world_size} of the model's weights",
              file=sys.stderr)
    # The frozen passes keep the prompts when the run comes back to them (rlhf/rl/prefix_cache.py).
    passes = config.train_steps * config.rollouts_per_step()
    if config.kl_coeff > 0:
        policy.keep_reference_prompts(prompts, passes, config.prompt_sequence_length + config.target_sequence_length)
    if isinstance(reward_fn, RewardModelReward):
        reward_fn.keep_prompts(prompt_rows, passes)
    if config.tuning_method != "ppo" and config.micro_batch_size % config.samples_per_prompt == 0:
        policy.pack_prompt_groups(config.samples_per_prompt, config.target_sequence_length,
                                  config.prompt_sequence_length)
    policy.model.train()
    optimizer, scheduler = optimizer_and_schedule(policy, config)

    with TrainingLoop(output_dir, run_id, "policy", config, policy, optimizer, scheduler, stop_requested,
                      progress_label=f"policy ({config.tuning_method.upper()})", ranks=ranks,
                      total_steps=warmup + config.train_steps) as loop:
        dpo_reference = ReferenceLogProbs(policy, tokenizer.pad_token_id) if config.dpo_warmup_steps else None
        for step in loop.steps():
            if step < config.sft_steps:
                record = sft_step(policy, warmup_pairs, step, config, optimizer, scheduler, loop.checkpoint_dir, ranks)
                loop.log(record, items=0, sft_loss=f"{record['sft_loss']:.3f}")
                continue
            if step < warmup:
                record = dpo_step(policy, warmup_pairs, step, config, optimizer, scheduler, dpo_reference,
                                  loop.checkpoint_dir, ranks)
                loop.log(record, items=0, dpo_loss=f"{record['dpo_loss']:.3f}", acc=f"{record['accuracy']:.2f}")
                continue
            if warmup and policy.reference_adapter is None:
                policy.keep_warmed_up_reference(step, warmup, loop.checkpoint_dir, ranks)
            rl_step = step - warmup
            step_config = replace(config, kl_coeff=kl_coefficient(config, loop.history[warmup:]))
            chosen = [i for i in batch_indices(rl_step, config.batch_size, len(prompt_rows), config.seed)
                      for _ in range(config.samples_per_prompt)]
            experiences, batch_rows, numbers = roll_out(policy, prompt_rows, prompts, chosen, reward_fn,
                                                        step_config, rl_step, ranks)
            batch = batch_statistics(experiences, numbers, ranks)
            update_started = clock(placement.device)
            totals = ppo_update(policy, experiences, numbers, batch["tokens"], optimizer, scheduler, step_config,
                                rl_step, loop.checkpoint_dir, ranks)
            record = step_record(step, batch, totals, clock(placement.device) - update_started,
                                 scheduler.get_last_lr()[0], step_config)
            if ranks.main:
                _warn_the_first_time_ending_does_not_pay(config, record, loop.history)
            loop.log(record, items=len(chosen), reward=f"{record['reward']:.3f}",
                     kl="-" if record["kl"] is None else f"{record['kl']:.3f}")
            if ranks.main and ((step + 1) % config.sample_every == 0 or step == max(loop.start_step, warmup)):
                loop.writer.add_text("samples", _samples_markdown(tokenizer, batch_rows[0], experiences[0]), step + 1)
        if loop.interrupted:
            return loop.stopped()
        if not ranks.main:
            return loop.result_of_main()

        save_policy(policy, PolicySpec.of(config, large_model_reference), output_dir, tokenizer,
                    merged=config.export_merged)
        rl_history = loop.history[warmup:]
        return loop.finish({
            "tuning_method": config.tuning_method,
            "final_reward": final_mean(rl_history, "reward"),
            "final_kl": final_mean(rl_history, "kl") if config.kl_coeff > 0 else None,
            "final_kl_coeff": rl_history[-1]["kl_coeff"],
            "initial_reward": rl_history[0]["reward"],
            "final_ended_share": final_mean(rl_history, "ended_share"),
            "sft_steps": config.sft_steps,
            "final_sft_loss": final_sft_loss(loop.history, config.sft_steps),
            "dpo_warmup_steps": config.dpo_warmup_steps,
            "final_dpo_warmup_loss": loop.history[warmup - 1]["dpo_loss"] if config.dpo_warmup_steps else None,
            "steps": config.train_steps,
            "episodes_per_second": loop.items_per_second(),
            "prompts": len(prompt_rows),
            "truncation": encoder.counts.as_dict(),
            **machine(placement),
        })
