"""Direct preference optimisation (DPO): the policy learns from the preference pairs themselves, with no
reward model and no sampling.

The loss of a pair is `-log sigmoid(beta * (log pi(w)/ref(w) - log pi(l)/ref(l)))`, where `pi` is the policy
(base + LoRA), `ref` the same base with the adapter switched off, and `log pi(w)` the summed log-prob of the
winner's tokens after the prompt (Rafailov et al., 2023; TRL's DPOTrainer with its default sigmoid loss).
`beta * log pi/ref` is the implicit reward: DPO widens its gap between winner and loser, as the reward model
widens its score gap, and `beta` keeps the policy near the base as `kl_coeff` does in PPO.

Read `train_dpo` top to bottom: tokenise every pair once, build the policy, then for each step take
`batch_size` pairs in a seeded order, run them in micro-batches of `micro_batch_size` pairs, each pair packed
as prompt + winner + loser (the reward model's shared-prefix packing: the prompt, most of the tokens, runs once
for both candidates), accumulate gradients, step the optimizer and the warm-up/cosine schedule, log, and
checkpoint. A pair's reference log-probs are computed once, on their own, the first time the pair is drawn. At the end:
the implicit reward's accuracy on the held-out pairs, and the policy artifact every other method writes.

With `sft_steps`, that many supervised steps on the winners come first (rlhf/rl/sft.py), and the reference is
then the warmed-up policy, not the base: as in the DPO paper, whose reference is the SFT model. Measured against
the base, the warm-up would already have widened most pairs' margins and left DPO little loss to learn from.
The warmed-up adapter is kept in the checkpoint directory, so a run resumed after the warm-up has its reference
(`Policy.keep_warmed_up_reference`).

`dpo_step` is also the warm-up of the online methods (`dpo_warmup_steps`, rlhf/rl/ppo.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.errors import UserError
from rlhf.models.loading import (
    add_lora,
    load_causal_lm,
    machine,
    recompute_activations,
    stop_token_ids,
)
from rlhf.reward.model import require_exact_packing
from rlhf.reward.packing import PackedBatch, pack
from rlhf.reward.training import EncodedPair, encode_pairs
from rlhf.rl.config import PPOConfig
from rlhf.rl.policy import Policy, PolicySpec, completion_log_probs, save_policy
from rlhf.rl.sft import final_sft_loss, sft_step
from rlhf.training.batching import batch_indices, warmup_cosine
from rlhf.training.checkpoints import finished_result
from rlhf.training.distributed import Ranks
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


def dpo_loss(policy_log_probs: torch.Tensor, reference_log_probs: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards [pairs, 2] (winner, loser) from summed log-probs [pairs, 2]."""
    rewards = beta * (policy_log_probs - reference_log_probs)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards.detach()


def _packed(pairs: list[EncodedPair], pad_id: int, device: torch.device) -> PackedBatch:
    return pack([p.prompt for p in pairs], [[p.winner, p.loser] for p in pairs], pad_id).to(device)


class ReferenceLogProbs:
    """Each pair's summed log-probs under the policy's reference (`Policy.reference_weights`: the base model, or
    the warmed-up policy). Computed the first time the pair is asked for and kept: the reference does not change
    while this object is used, so a pair seen again costs nothing.

    A pair is computed alone, never batched with the others missing at that moment: padding to a batch's
    longest pair changes the rounding of the products on some CPUs, and which pairs are missing together
    depends on what was computed before (a run resumed from a checkpoint starts with none, another rank holds
    others). Alone, a pair's reference is the same number in every run, so a resumed run ends bit for bit as
    an uninterrupted one. Once per pair, this costs little next to the pair's training passes."""

    def __init__(self, policy: Policy, pad_id: int):
        self.policy, self.pad_id = policy, pad_id
        self.known: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def of(self, indices: list[int], pairs: list[EncodedPair]) -> torch.Tensor:
        missing = [i for i in dict.fromkeys(indices) if i not in self.known]
        if missing:
            with self.policy.reference_weights():
                for i in missing:
                    self.known[i] = completion_log_probs(self.policy.model,
                                                         _packed([pairs[i]], self.pad_id, self.policy.device))[0]
        return torch.stack([self.known[i] for i in indices])

    @torch.no_grad()
    def share_out(self, indices: list[int], pairs: list[EncodedPair]) -> None:
        """With the policy's weights sharded, the references of a step's pairs (`indices`, the whole batch) that
        are not known yet, computed by the ranks together, each its share, alone and in step as `of` computes
        them, and known to every rank after."""
        in_step = self.policy.in_step
        if not in_step.parallel:
            return
        missing = [i for i in dict.fromkeys(indices) if i not in self.known]
        mine = in_step.share(missing)
        computed = {}
        with self.policy.reference_weights():
            for i in lockstep(mine, in_step):
                log_probs = completion_log_probs(self.policy.model, _packed([pairs[missing[0] if i is None else i]],
                                                                            self.pad_id, self.policy.device))[0]
                if i is not None:
                    computed[i] = log_probs.cpu()
        for part in in_step.gather(computed):
            self.known.update({i: log_probs.to(self.policy.device) for i, log_probs in part.items()})


def train_step(policy: Policy, indices: list[int], pairs: list[EncodedPair], reference: ReferenceLogProbs,
               batch_size: int, config: PPOConfig, idle_pair: int = 0) -> list[float]:
    """Gradients of these pairs' share of the batch's mean DPO loss (the batch has `batch_size` pairs, on one rank
    or over several), over micro-batches of `micro_batch_size` pairs; returns the sums of the loss, of pairs
    ranked right, and of the winner's and the loser's implicit rewards. With the weights sharded, the passes
    this rank owes the others are made on `idle_pair`, their loss weighted 0."""
    totals = [0.0, 0.0, 0.0, 0.0]
    micro_batches = [indices[start:start + config.micro_batch_size]
                     for start in range(0, len(indices), config.micro_batch_size)]
    for micro in lockstep(micro_batches, policy.in_step):
        reference_log_probs = reference.of(micro or [idle_pair], pairs)
        log_probs = completion_log_probs(policy.model, _packed([pairs[i] for i in micro or [idle_pair]],
                                                               policy.pad_id, policy.device))
        losses, rewards = dpo_loss(log_probs, reference_log_probs, config.beta)
        if micro is None:
            (losses.sum() * 0.0).backward()
            continue
        (losses.sum() / batch_size).backward()
        for slot, value in enumerate((losses.detach(), (rewards[:, 0] > rewards[:, 1]).float(), rewards[:, 0],
                                      rewards[:, 1])):
            totals[slot] += float(value.sum())
    return totals


def dpo_step(policy: Policy, pairs: list[EncodedPair], step: int, config: PPOConfig, optimizer, scheduler,
             reference: ReferenceLogProbs, checkpoint_dir: Path, ranks: Ranks, first_step: int = 0) -> dict:
    """One DPO step: batch `step - first_step` of `config.pairs_per_step()` pairs in a seeded order, their
    gradients summed over the ranks, one optimizer step; returns what the step logs (means over the batch's
    pairs, and the step's time)."""
    started = clock(policy.device)
    batch = batch_indices(step - first_step, config.pairs_per_step(), len(pairs), config.seed)
    reference.share_out(batch, pairs)
    summed = train_step(policy, ranks.share(batch), pairs, reference, len(batch), config, batch[0])
    trainable = [p for p in policy.model.parameters() if p.requires_grad]  # a value head has no part in it
    ranks.sum_gradients(trainable)
    loss, accuracy, chosen_reward, rejected_reward = (total / len(batch) for total in ranks.total(summed))
    require_finite(loss, "dpo", step, checkpoint_dir)
    learning_rate = scheduler.get_last_lr()[0]
    optimizer_step(optimizer, scheduler, [trainable], config.max_grad_norm)
    return {"step": step + 1, "dpo_loss": loss, "accuracy": accuracy, "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward, "reward_margin": chosen_reward - rejected_reward,
            "learning_rate": learning_rate, "time/update": clock(policy.device) - started}


@torch.no_grad()
def evaluate_pairs(policy: Policy, pairs: list[EncodedPair], reference: ReferenceLogProbs, config: PPOConfig) -> dict:
    """The implicit reward on held-out pairs: how often it ranks the winner above the loser, and its mean margin.
    With the policy's weights sharded, every rank evaluates a share of the pairs, in step, and gets every margin."""
    if not pairs:
        return {"eval_pairs": 0}
    in_step = policy.in_step
    reference.share_out(list(range(len(pairs))), pairs)
    was_training = policy.training
    policy.eval()
    mine = in_step.share(list(range(len(pairs))))
    margin = torch.empty(len(pairs))
    micro_batches = [mine[start:start + config.micro_batch_size] for start in range(0, len(mine),
                                                                                    config.micro_batch_size)]
    for indices in lockstep(micro_batches, in_step):
        log_probs = completion_log_probs(policy.model, _packed([pairs[i] for i in indices or [0]], policy.pad_id,
                                                               policy.device))
        rewards = config.beta * (log_probs - reference.of(indices or [0], pairs))
        if indices is not None:
            margin[indices] = (rewards[:, 0] - rewards[:, 1]).cpu()
    for rows, part in in_step.gather((mine, margin[mine])):
        margin[rows] = part
    policy.train(was_training)
    return {"eval_pairs": len(pairs), "eval_accuracy": float((margin > 0).float().mean()),
            "eval_mean_margin": float(margin.mean())}


def train_dpo(
    config: PPOConfig,
    train_rows: list[dict],
    held_out_rows: list[dict],
    large_model_reference: str,
    output_dir: Path,
    base_model_path: str | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> dict:
    """Train, or resume, or return the finished result in `output_dir`. Returns the metrics dict.

    `stop_requested` is polled after each step; when it says so, a checkpoint is saved and the run returns with
    `"interrupted": True`. Started by `torch.distributed.run`, each process trains on its share of every batch."""
    config.validate()
    if not train_rows:
        raise UserError("dpo: no training pairs")
    output_dir = Path(output_dir)
    run_id = run_fingerprint(config, [large_model_reference], train_rows)
    finished = finished_result(output_dir / METRICS_FILE, run_id, "tuned policy")
    if finished is not None:
        return finished

    ranks, placement, base_path, tokenizer, encoder = start_stage(config, large_model_reference, base_model_path)
    train_pairs = encode_pairs(train_rows, encoder)
    held_out_pairs = encode_pairs(held_out_rows, encoder)

    torch.manual_seed(config.seed)
    with loading_turn(ranks, config.shard_weights, base_path, placement.dtype):
        model = load_causal_lm(base_path, loading_placement(placement, config.shard_weights))
        require_exact_packing(model, config, "dpo")
        policy = Policy(add_lora(model, config.lora_dim), None, stop_token_ids(model, tokenizer),
                        tokenizer.pad_token_id)
        if config.gradient_checkpointing:
            recompute_activations(policy.model)
        policy.place(placement.device, ranks, config.shard_weights)
    policy.model.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate(),
                                  weight_decay=0.0)
    total_steps = config.sft_steps + config.train_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(math.ceil(config.warmup_fraction * total_steps), total_steps))
    reference = ReferenceLogProbs(policy, tokenizer.pad_token_id)

    with TrainingLoop(output_dir, run_id, "policy", config, policy, optimizer, scheduler, stop_requested,
                      progress_label="policy (DPO)", ranks=ranks, total_steps=total_steps) as loop:
        for step in loop.steps():
            if step < config.sft_steps:
                record = sft_step(policy, train_pairs, step, config, optimizer, scheduler, loop.checkpoint_dir, ranks)
                loop.log(record, items=0, sft_loss=f"{record['sft_loss']:.3f}")
                continue
            if config.sft_steps and policy.reference_adapter is None:
                policy.keep_warmed_up_reference(step, config.sft_steps, loop.checkpoint_dir, ranks)
                reference = ReferenceLogProbs(policy, tokenizer.pad_token_id)
            record = dpo_step(policy, train_pairs, step, config, optimizer, scheduler, reference, loop.checkpoint_dir,
                              ranks, first_step=config.sft_steps)
            loop.log(record, items=config.batch_size, loss=f"{record['dpo_loss']:.3f}",
                     acc=f"{record['accuracy']:.2f}")
        if loop.interrupted:
            return loop.stopped()
        if not ranks.main and not policy.in_step.parallel:
            return loop.result_of_main()

        # Sharded weights evaluate on every rank together; whole ones on rank 0 alone.
        evaluation = evaluate_pairs(policy, held_out_pairs,
                                    ReferenceLogProbs(policy, tokenizer.pad_token_id), config)
        if not ranks.main:
            return loop.result_of_main()
        if "eval_accuracy" in evaluation:
            loop.writer.add_scalar("eval_accuracy", evaluation["eval_accuracy"], total_steps)
        dpo_history = loop.history[config.sft_steps:]
        save_policy(policy, PolicySpec.of(config, large_model_reference), output_dir, tokenizer,
                    merged=config.export_merged)
        return loop.finish({
            "tuning_method": "dpo",
            **evaluation,
            "final_dpo_loss": final_mean(dpo_history, "dpo_loss"),
            "final_accuracy": final_mean(dpo_history, "accuracy"),
            "final_reward_margin": final_mean(dpo_history, "reward_margin"),
            "sft_steps": config.sft_steps,
            "final_sft_loss": final_sft_loss(loop.history, config.sft_steps),
            "steps": config.train_steps,
            "train_pairs": len(train_pairs),
            "pairs_per_second": loop.items_per_second(),
            "truncation": encoder.counts.as_dict(),
            **machine(placement),
        })
