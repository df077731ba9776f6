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
The warmed-up adapter is kept in the checkpoint directory, so a run resumed after the warm-up has its reference.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rlhf.errors import UserError
from rlhf.models.loading import (
    add_lora,
    load_causal_lm,
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
from rlhf.training.checkpoints import copy_weights, finished_result, trainable_state
from rlhf.training.distributed import Ranks
from rlhf.training.loop import METRICS_FILE, TrainingLoop, final_mean, optimizer_step, require_finite, run_fingerprint
from rlhf.training.stage import start_stage

WARMED_UP_ADAPTER = "warmed_up_adapter.safetensors"  # in the checkpoint directory: the reference after a warm-up


def dpo_loss(policy_log_probs: torch.Tensor, reference_log_probs: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss and the implicit rewards [pairs, 2] (winner, loser) from summed log-probs [pairs, 2]."""
    rewards = beta * (policy_log_probs - reference_log_probs)
    return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards.detach()


def _packed(pairs: list[EncodedPair], pad_id: int, device: torch.device) -> PackedBatch:
    return pack([p.prompt for p in pairs], [[p.winner, p.loser] for p in pairs], pad_id).to(device)


class ReferenceLogProbs:
    """Each pair's summed log-probs under the reference: the base model (the adapter switched off), or with
    `adapter` the policy with those adapter weights (the warmed-up policy). Computed the first time the pair is
    asked for and kept: the reference never changes, so a pair seen again costs nothing.

    A pair is computed alone, never batched with the others missing at that moment: padding to a batch's
    longest pair changes the rounding of the products on some CPUs, and which pairs are missing together
    depends on what was computed before (a run resumed from a checkpoint starts with none, another rank holds
    others). Alone, a pair's reference is the same number in every run, so a resumed run ends bit for bit as
    an uninterrupted one. Once per pair, this costs little next to the pair's training passes."""

    def __init__(self, policy: Policy, pad_id: int, adapter: dict[str, torch.Tensor] | None = None):
        self.policy, self.pad_id, self.adapter = policy, pad_id, adapter
        self.known: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def of(self, indices: list[int], pairs: list[EncodedPair]) -> torch.Tensor:
        missing = [i for i in dict.fromkeys(indices) if i not in self.known]
        if missing:
            with self._reference_weights():
                for i in missing:
                    self.known[i] = completion_log_probs(self.policy.model,
                                                         _packed([pairs[i]], self.pad_id, self.policy.device))[0]
        return torch.stack([self.known[i] for i in indices])

    @contextmanager
    def _reference_weights(self) -> Iterator[None]:
        model = self.policy.model
        if self.adapter is None:
            with model.disable_adapter():
                yield
            return
        parameters = dict(model.named_parameters())
        trained = {name: parameters[name].detach().clone() for name in self.adapter}
        copy_weights(model, self.adapter)
        try:
            yield
        finally:
            copy_weights(model, trained)


def warmed_up_adapter(policy: Policy, step: int, sft_steps: int, checkpoint_dir: Path, ranks: Ranks) -> dict:
    """The reference after a warm-up: at the step the warm-up ends, the policy's adapter as it is (rank 0 also
    writes it beside the checkpoints); in a run resumed after that step, the adapter written then."""
    path = checkpoint_dir / WARMED_UP_ADAPTER
    if step > sft_steps:
        if not path.exists():
            raise UserError(f"{checkpoint_dir}: the checkpoints are past the warm-up, but {WARMED_UP_ADAPTER}, the "
                            "reference DPO compares with, is missing; write to a new output directory")
        return load_file(path, device=str(policy.device))
    adapter = {name: p.detach().clone() for name, p in policy.model.named_parameters() if p.requires_grad}
    if ranks.main:
        staged = path.with_name(f".{WARMED_UP_ADAPTER}.partial")
        save_file(trainable_state(policy.model), staged)
        os.replace(staged, path)
    return adapter  # a copy: the policy's own weights move on from here


def train_step(policy: Policy, indices: list[int], pairs: list[EncodedPair], reference: ReferenceLogProbs,
               batch_size: int, config: PPOConfig) -> list[float]:
    """Gradients of these pairs' share of the batch's mean DPO loss (the batch has `batch_size` pairs, on one rank
    or over several), over micro-batches of `micro_batch_size` pairs; returns the sums of the loss, of pairs
    ranked right, and of the winner's and the loser's implicit rewards."""
    totals = [0.0, 0.0, 0.0, 0.0]
    for start in range(0, len(indices), config.micro_batch_size):
        micro = indices[start:start + config.micro_batch_size]
        reference_log_probs = reference.of(micro, pairs)
        log_probs = completion_log_probs(policy.model, _packed([pairs[i] for i in micro], policy.pad_id,
                                                               policy.device))
        losses, rewards = dpo_loss(log_probs, reference_log_probs, config.beta)
        (losses.sum() / batch_size).backward()
        for slot, value in enumerate((losses.detach(), (rewards[:, 0] > rewards[:, 1]).float(), rewards[:, 0],
                                      rewards[:, 1])):
            totals[slot] += float(value.sum())
    return totals


@torch.no_grad()
def evaluate_pairs(policy: Policy, pairs: list[EncodedPair], reference: ReferenceLogProbs, config: PPOConfig) -> dict:
    """The implicit reward on held-out pairs: how often it ranks the winner above the loser, and its mean margin."""
    if not pairs:
        return {"eval_pairs": 0}
    was_training = policy.training
    policy.eval()
    margins = []
    for start in range(0, len(pairs), config.micro_batch_size):
        indices = list(range(start, min(start + config.micro_batch_size, len(pairs))))
        log_probs = completion_log_probs(policy.model, _packed([pairs[i] for i in indices], policy.pad_id,
                                                               policy.device))
        rewards = config.beta * (log_probs - reference.of(indices, pairs))
        margins.append(rewards[:, 0] - rewards[:, 1])
    policy.train(was_training)
    margin = torch.cat(margins)
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
    model = load_causal_lm(base_path, placement)
    require_exact_packing(model, config, "dpo")
    policy = Policy(add_lora(model, config.lora_dim), None, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    if config.gradient_checkpointing:
        recompute_activations(policy.model)
    policy.model.train()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate(), weight_decay=0.0)
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
            if config.sft_steps and reference.adapter is None:
                reference = ReferenceLogProbs(policy, tokenizer.pad_token_id, warmed_up_adapter(
                    policy, step, config.sft_steps, loop.checkpoint_dir, ranks))
            batch = batch_indices(step - config.sft_steps, config.batch_size, len(train_pairs), config.seed)
            summed = train_step(policy, ranks.share(batch), train_pairs, reference, len(batch), config)
            ranks.sum_gradients(trainable)
            loss, accuracy, chosen_reward, rejected_reward = (total / len(batch) for total in ranks.total(summed))
            require_finite(loss, "dpo", step, loop.checkpoint_dir)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer_step(optimizer, scheduler, [trainable], config.max_grad_norm)
            loop.log({"step": step + 1, "dpo_loss": loss, "accuracy": accuracy, "chosen_reward": chosen_reward,
                      "rejected_reward": rejected_reward, "reward_margin": chosen_reward - rejected_reward,
                      "learning_rate": learning_rate},
                     items=len(batch), loss=f"{loss:.3f}", acc=f"{accuracy:.2f}")
        if loop.interrupted:
            return loop.stopped()
        if not ranks.main:
            return loop.result_of_main()

        evaluation = evaluate_pairs(policy, held_out_pairs,
                                    ReferenceLogProbs(policy, tokenizer.pad_token_id, reference.adapter), config)
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
            "device": str(placement.device),
            "dtype": str(placement.dtype).removeprefix("torch."),
        })
