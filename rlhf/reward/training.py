"""Train the reward model on preference pairs with the pairwise loss `-log sigmoid(r_winner - r_loser)`.

Read `train_reward_model` top to bottom: tokenise every pair once, build the model (base + LoRA + head),
then for each step take `batch_size` pairs in a seeded order, run them in micro-batches sized by tokens
(each pair packed as prompt + winner + loser so the prompt is computed once), accumulate gradients, step
the optimizer and the warm-up/cosine schedule, log, and checkpoint. At the end: score the training data
to store the mean and std used to normalise rewards, measure held-out accuracy, and save the artifact.

Running the same call again with the same output directory resumes from the last checkpoint; a finished
output directory is returned as it is when it holds this very run (same data and settings), and refused
when it holds another.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.data.prompts import PromptEncoder
from rlhf.data.validation import chosen, longer_wins, rejected
from rlhf.errors import UserError
from rlhf.models.loading import (
    Placement,
    add_lora,
    load_backbone,
    machine,
    recompute_activations,
)
from rlhf.reward.config import RewardTrainingConfig
from rlhf.reward.model import RewardModel, RewardModelSpec, require_exact_packing, save_reward_model, score_packed
from rlhf.reward.packing import pack, packed_length
from rlhf.training.batching import batch_indices, micro_batches, warmup_cosine
from rlhf.training.checkpoints import finished_result
from rlhf.training.distributed import ALONE, Ranks
from rlhf.training.loop import METRICS_FILE, TrainingLoop, final_mean, optimizer_step, require_finite, run_fingerprint
from rlhf.training.sharding import loading_placement, loading_turn, lockstep, shard_frozen_weights
from rlhf.training.stage import start_stage


@dataclass
class EncodedPair:
    prompt: list[int]
    winner: list[int]
    loser: list[int]

    def length(self) -> int:
        return packed_length(self.prompt, [self.winner, self.loser])


def encode_pairs(rows: list[dict], encoder: PromptEncoder) -> list[EncodedPair]:
    return [EncodedPair(encoder.encode_prompt(r), encoder.encode_completion(chosen(r)),
                        encoder.encode_completion(rejected(r))) for r in rows]


def length_balanced(rows: list[dict], seed: int) -> list[dict]:
    """A seeded subset of the pairs in which the longer candidate (in characters) wins exactly as often as the
    shorter, so length alone predicts nothing: human labels often prefer the longer answer, and a reward
    model trained on them learns length first. Pairs of equal length are all kept."""
    groups = {1.0: [], 0.0: [], 0.5: []}
    for row in rows:
        groups[longer_wins(row)].append(row)
    longer, shorter, equal = groups[1.0], groups[0.0], groups[0.5]
    keep = min(len(longer), len(shorter))
    generator = random.Random(seed)
    kept = {id(r) for r in generator.sample(longer, keep) + generator.sample(shorter, keep) + equal}
    return [row for row in rows if id(row) in kept]


def normalisation_sample(pairs: list[EncodedPair], count: int, seed: int) -> list[EncodedPair]:
    """A seeded sample of `count` training pairs (all of them when fewer), in no file order: the first rows of
    a file are often one source, one date or one topic."""
    return random.Random(seed).sample(pairs, min(count, len(pairs)))


def pairwise_loss(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss -log sigmoid(r_winner - r_loser) and whether the winner scored higher."""
    margin = scores[:, 0] - scores[:, 1]
    return -F.logsigmoid(margin), (margin > 0).float()


def score_pairs(model: RewardModel, pairs: list[EncodedPair], pad_id: int, max_tokens: int,
                in_step: Ranks = ALONE) -> torch.Tensor:
    """Raw scores [pairs, 2] (winner, loser); with the weights sharded over `in_step`, each of its ranks scores
    a share of the pairs and every rank gets every score."""
    mine = in_step.share(list(range(len(pairs))))
    scored = score_packed(model, [pairs[i].prompt for i in mine], [[pairs[i].winner, pairs[i].loser] for i in mine],
                          pad_id, max_tokens, in_step)
    scores = torch.empty(len(pairs), 2)
    for rows, part in in_step.gather((mine, scored)):
        scores[rows] = part
    return scores


def evaluate_pairs(model: RewardModel, pairs: list[EncodedPair], pad_id: int, max_tokens: int,
                   in_step: Ranks = ALONE) -> dict:
    if not pairs:
        return {"eval_pairs": 0}
    scores = score_pairs(model, pairs, pad_id, max_tokens, in_step)
    losses, correct = pairwise_loss(scores)
    return {"eval_pairs": len(pairs), "eval_accuracy": float(correct.mean()), "eval_rank_loss": float(losses.mean()),
            "eval_mean_margin": float((scores[:, 0] - scores[:, 1]).mean())}


def train_step(model: RewardModel, pairs: list[EncodedPair], batch_size: int, pad_id: int, placement: Placement,
               config: RewardTrainingConfig, in_step: Ranks = ALONE, idle_pair: EncodedPair | None = None
               ) -> tuple[float, float]:
    """Gradients of `pairs`' share of the batch's mean pairwise loss (the batch has `batch_size` pairs, on one
    rank or over several), accumulated over micro-batches of at most `micro_batch_tokens` padded tokens;
    returns the summed loss and the number of pairs ranked right. With the weights sharded over `in_step`, the
    passes this rank owes the others are made on `idle_pair`, their loss weighted 0."""
    total_loss, total_correct = 0.0, 0.0
    for group in lockstep(micro_batches([p.length() for p in pairs], config.micro_batch_tokens), in_step):
        micro = [pairs[i] for i in group] if group is not None else [idle_pair]
        packed = pack([p.prompt for p in micro], [[p.winner, p.loser] for p in micro], pad_id)
        losses, correct = pairwise_loss(model(packed.to(placement.device)))
        if group is None:
            (losses.sum() * 0.0).backward()
            continue
        (losses.sum() / batch_size).backward()
        total_loss += float(losses.detach().sum())
        total_correct += float(correct.sum())
    return total_loss, total_correct


def train_reward_model(
    config: RewardTrainingConfig,
    train_rows: list[dict],
    held_out_rows: list[dict],
    large_model_reference: str,
    output_dir: Path,
    base_model_path: str | None = None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> dict:
    """Train, or resume, or return the finished result in `output_dir`. Returns the metrics dict.

    `base_model_path` is where `large_model_reference` loads from (resolved by the caller when given).
    `stop_requested` is polled after each step; when it says so, a checkpoint is saved and the run returns
    with `"interrupted": True` (a preempted job's SIGTERM goes through it). Started by
    `torch.distributed.run`, each process trains on its share of every batch (`rlhf.training.distributed`).
    """
    config.validate()
    if not train_rows:
        raise UserError("reward model: no training pairs")
    output_dir = Path(output_dir)
    if config.balance_lengths:
        train_rows = length_balanced(train_rows, config.seed)
    run_id = run_fingerprint(config, [large_model_reference], train_rows)
    finished = finished_result(output_dir / METRICS_FILE, run_id, "reward model")
    if finished is not None:
        return finished

    ranks, placement, base_path, tokenizer, encoder = start_stage(config, large_model_reference, base_model_path)
    if config.lora_dim == 0 and placement.dtype != torch.float32:
        # Updated in bfloat16, most weights would never move (an update below a weight's rounding step is lost):
        # full fine-tuning keeps the weights in float32.
        print(f"Full fine-tuning keeps float32 weights (not {placement.dtype}); LoRA (lora_dim > 0) trains in "
              f"{placement.dtype}", file=sys.stderr)
        placement = Placement(placement.device, torch.float32)
    train_pairs = encode_pairs(train_rows, encoder)
    held_out_pairs = encode_pairs(held_out_rows, encoder)
    pad_id = tokenizer.pad_token_id

    torch.manual_seed(config.seed)
    with loading_turn(ranks, config.shard_weights, base_path, placement.dtype):
        backbone = load_backbone(base_path, loading_placement(placement, config.shard_weights))
        require_exact_packing(backbone, config)
        if config.lora_dim > 0:
            backbone = add_lora(backbone, config.lora_dim)
        if config.gradient_checkpointing:
            recompute_activations(backbone)
        in_step = ranks if config.shard_weights and shard_frozen_weights(backbone, ranks, placement.device) else ALONE
    if in_step.parallel and ranks.main:
        print(f"reward model: each of {ranks.world_size} processes holds 1/{ranks.world_size} of the backbone's "
              "weights", file=sys.stderr)
    model = RewardModel.with_new_head(backbone.to(placement.device), config.seed)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate(), weight_decay=config.weight_decay)
    warmup_steps = math.ceil(config.warmup_fraction * config.train_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, config.train_steps))

    with TrainingLoop(output_dir, run_id, "reward model", config, model, optimizer, scheduler,
                      stop_requested, ranks=ranks) as loop:
        for step in loop.steps():
            batch = [train_pairs[i] for i in batch_indices(step, config.batch_size, len(train_pairs), config.seed)]
            summed = train_step(model, ranks.share(batch), len(batch), pad_id, placement, config, in_step, batch[0])
            ranks.sum_gradients(trainable)
            rank_loss, accuracy = (total / len(batch) for total in ranks.total(list(summed)))
            require_finite(rank_loss, "reward model", step, loop.checkpoint_dir)
            learning_rate = scheduler.get_last_lr()[0]
            optimizer_step(optimizer, scheduler, [trainable], config.max_grad_norm)
            loop.log({"step": step + 1, "rank_loss": rank_loss, "accuracy": accuracy, "learning_rate": learning_rate},
                     items=len(batch), loss=f"{rank_loss:.3f}", acc=f"{accuracy:.2f}")
        if loop.interrupted:
            return loop.stopped()
        if not ranks.main and not in_step.parallel:
            return loop.result_of_main()

        # Sharded weights score on every rank together; whole ones on rank 0 alone.
        normalisation = normalisation_sample(train_pairs, config.normalization_pairs, config.seed)
        scores = score_pairs(model, normalisation, pad_id, config.micro_batch_tokens, in_step)
        evaluation = evaluate_pairs(model, held_out_pairs, pad_id, config.micro_batch_tokens, in_step)
        if not ranks.main:
            return loop.result_of_main()
        if "eval_accuracy" in evaluation:
            loop.writer.add_scalar("eval_accuracy", evaluation["eval_accuracy"], config.train_steps)
        spec = RewardModelSpec(
            large_model_reference=large_model_reference, lora_dim=config.lora_dim,
            prompt_sequence_length=config.prompt_sequence_length, target_sequence_length=config.target_sequence_length,
            instruction=config.instruction, use_chat_template=config.use_chat_template,
            score_mean=float(scores.mean()), score_std=float(scores.std().clamp_min(1e-6)),
            training={"steps": config.train_steps, "train_pairs": len(train_pairs), "seed": config.seed,
                      "learning_rate": config.learning_rate(), "batch_size": config.batch_size})
        save_reward_model(model, spec, output_dir)
        return loop.finish({
            **evaluation,
            "final_rank_loss": final_mean(loop.history, "rank_loss"),
            "final_train_accuracy": final_mean(loop.history, "accuracy"),
            "steps": config.train_steps,
            "train_pairs": len(train_pairs),
            "pairs_per_second": loop.items_per_second(),
            "score_mean": spec.score_mean,
            "score_std": spec.score_std,
            "truncation": encoder.counts.as_dict(),
            **machine(placement),
        })
