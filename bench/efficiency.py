"""How close our training steps come to this machine's practical limit: achieved FLOP/s of one reward-model
optimizer step and one PPO update, against the dense float32 matmul rate measured in the same process.

    .venv/bin/python bench/efficiency.py [--repetitions 5]

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one step (every matmul, linear and
attention product of the forward and backward passes; element-wise work is not counted), and checked
against the analytic estimate printed beside it. The ceiling is the median rate of a 2048x2048 by
2048x2048 float32 matmul, and of a matmul shaped like the model's MLP (tokens x 576 by 576 x 1536).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import load_average, machine, model_dir, our_versions, require_data, spread_text, summary, write_results
from data import preference_slices, prompt_slice
from torch.utils.flop_counter import FlopCounterMode

NAME = "efficiency"
REWARD = {"pairs": 8, "micro_batch_tokens": 2048, "lora_rank": 4, "prompt_length": 512, "target_length": 64}
POLICY = {"prompts": 4, "completion_tokens": 48, "lora_rank": 8, "prompt_length": 256}


def timed(work, repetitions: int) -> list[float]:
    work()  # warm-up: first-call allocations and kernel selection
    seconds = []
    for _ in range(repetitions):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return seconds


def counted_flops(work) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return counter.get_total_flops()


def matmul_ceiling(rows: int, inner: int, columns: int, repetitions: int) -> dict:
    a, b = torch.randn(rows, inner), torch.randn(inner, columns)
    seconds = timed(lambda: a @ b, repetitions * 4)
    flops = 2 * rows * inner * columns
    return {"shape": [rows, inner, columns], "flop_per_second": summary([flops / s for s in seconds])}


def matmul_params(module: torch.nn.Module) -> int:
    """Weights of the frozen and trainable linear layers (embedding lookups do no matmul)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def reward_step(base: str, repetitions: int, dtype: torch.dtype = torch.float32) -> dict:
    """One optimizer step of train_reward_model: packed micro-batches, pairwise loss, backward, AdamW."""
    from rlhf.models.loading import add_lora, load_backbone, load_tokenizer, pick_placement
    from rlhf.reward.model import RewardModel
    from rlhf.reward.packing import pack
    from rlhf.reward.training import pairwise_loss
    from rlhf.training.batching import micro_batches

    tokenizer = load_tokenizer(base)
    rows, _ = preference_slices(tokenizer, REWARD["pairs"], 1, REWARD["prompt_length"], REWARD["target_length"],
                                REWARD["prompt_length"])
    prompts = [r["prompt_ids"] for r in rows]
    completions = [[r["chosen_ids"][len(r["prompt_ids"]):], r["rejected_ids"][len(r["prompt_ids"]):]] for r in rows]
    lengths = [len(p) + sum(len(c) for c in cs) for p, cs in zip(prompts, completions)]
    groups = [pack([prompts[i] for i in g], [completions[i] for i in g], tokenizer.pad_token_id)
              for g in micro_batches(lengths, REWARD["micro_batch_tokens"])]
    model = RewardModel.with_new_head(add_lora(load_backbone(base, pick_placement("cpu", dtype)), REWARD["lora_rank"]), 0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        for packed in groups:
            losses, _ = pairwise_loss(model(packed))
            (losses.sum() / len(rows)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = counted_flops(step)
    seconds = timed(step, repetitions)
    tokens = sum(lengths)
    # Forward: 2 FLOPs per weight per token. Backward through frozen weights: the input gradient only, again
    # 2 per weight per token (LoRA's own weight gradients are negligible at rank 4). Attention products add
    # 4 * layers * hidden per (query, key) pair in the forward pass and twice that in the backward pass.
    params = matmul_params(model.backbone)
    config = model.backbone.config
    attention_pairs = sum(_attention_pairs(g) for g in groups)
    analytic = 4 * params * tokens + 12 * config.num_hidden_layers * config.hidden_size * attention_pairs
    return {"pairs": len(rows), "tokens": tokens, "forward_passes": len(groups), "flops_counted": flops,
            "flops_analytic": analytic, "seconds": summary(seconds),
            "flop_per_second": summary([flops / s for s in seconds])}


def _attention_pairs(packed) -> int:
    """(query, key) pairs the additive mask allows, over the batch (padding rows count themselves only)."""
    mask = packed.attention_mask(torch.float32)
    return int((mask == 0).sum())


def policy_update(base: str, repetitions: int, dtype: torch.dtype = torch.float32) -> dict:
    """One PPO minibatch update of train_policy: the clipped losses' forward, backward, clipping and AdamW."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_placement
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.policy import Policy
    from rlhf.rl.ppo import Experience, ppo_losses
    from rlhf.rl.rollouts import make_rollout

    tokenizer = load_tokenizer(base)
    rows = prompt_slice(tokenizer, POLICY["prompts"], POLICY["prompt_length"])
    generator = torch.Generator().manual_seed(0)
    completions = [torch.randint(100, tokenizer.vocab_size, (POLICY["completion_tokens"],),
                                 generator=generator).tolist() for _ in rows]
    rollout = make_rollout([r["prompt_ids"] for r in rows], completions, tokenizer.pad_token_id, [True] * len(rows))
    policy = Policy.create(load_causal_lm(base, pick_placement("cpu", dtype)), POLICY["lora_rank"], [tokenizer.eos_token_id],
                           tokenizer.pad_token_id)
    policy.model.train()
    config = PPOConfig()
    with torch.no_grad():
        log_probs, _, values = policy.evaluate(rollout, config.temperature)
    advantages = torch.randn(log_probs.shape, generator=generator)
    scores = torch.zeros(len(rows))
    experience = Experience(rollout, log_probs, values, advantages, values + advantages, scores, scores, None, None)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = float(rollout.completion_mask.sum())

    def update():
        losses = ppo_losses(policy, experience, config)
        ((losses["policy_loss"] + config.value_loss_coeff * losses["value_loss"]) / tokens).backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = counted_flops(update)
    seconds = timed(update, repetitions)
    sequence_tokens = int(rollout.attention_mask.sum())
    model_config = policy.model.config
    body = matmul_params(policy.model) - model_config.vocab_size * model_config.hidden_size  # without the LM head
    # As for the reward step (4 FLOPs per frozen weight per token, forward and input-gradient backward), plus
    # the vocabulary projection on the completion positions only (logits_to_keep), forward and backward.
    head_tokens = len(rows) * (POLICY["completion_tokens"] + 1)
    length = rollout.sequences.shape[1]
    analytic = (4 * body * len(rows) * length
                + 6 * model_config.vocab_size * model_config.hidden_size * head_tokens
                + 12 * model_config.num_hidden_layers * model_config.hidden_size * len(rows) * length * (length + 1) // 2)
    return {"prompts": len(rows), "sequence_tokens": sequence_tokens, "padded_tokens": len(rows) * length,
            "flops_counted": flops, "flops_analytic": analytic, "seconds": summary(seconds),
            "flop_per_second": summary([flops / s for s in seconds])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    require_data()
    load_at_start = load_average()
    base = model_dir()
    torch.manual_seed(0)
    # Ceilings measured before and after the model steps, so drifting background load shows in their spread.
    square_before = matmul_ceiling(2048, 2048, 2048, args.repetitions)
    mlp_before = matmul_ceiling(2048, 576, 1536, args.repetitions)
    reward = reward_step(base, args.repetitions)
    policy = policy_update(base, args.repetitions)
    square_after = matmul_ceiling(2048, 2048, 2048, args.repetitions)
    ceiling = statistics.median([square_before["flop_per_second"]["median"],
                                 square_after["flop_per_second"]["median"]])
    for step in (reward, policy):
        step["share_of_ceiling"] = step["flop_per_second"]["median"] / ceiling
        step["share_of_mlp_shaped_matmul"] = step["flop_per_second"]["median"] / mlp_before["flop_per_second"]["median"]
    result = {"benchmark": NAME, "repetitions": args.repetitions, "torch_threads": torch.get_num_threads(),
              "ceiling_flop_per_second": ceiling, "matmul_2048_before": square_before,
              "matmul_2048_after": square_after, "matmul_mlp_shaped": mlp_before,
              "reward_model_step": {**REWARD, **reward}, "policy_update": {**POLICY, **policy},
              "versions": our_versions(), "machine": machine(),
              "load_average_start": load_at_start, "load_average_end": load_average()}
    write_results(NAME, result, markdown(result))


def markdown(r: dict) -> str:
    g = 1e9
    square = r["matmul_2048_before"]["flop_per_second"]
    rows = [
        f"| dense fp32 matmul 2048³ (before / after) | {square['median'] / g:.1f} / "
        f"{r['matmul_2048_after']['flop_per_second']['median'] / g:.1f} | — | 1.00 |",
        f"| fp32 matmul 2048×576 · 576×1536 (MLP-shaped) | {r['matmul_mlp_shaped']['flop_per_second']['median'] / g:.1f} "
        f"| — | {r['matmul_mlp_shaped']['flop_per_second']['median'] / r['ceiling_flop_per_second']:.2f} |",
    ]
    for key, label in (("reward_model_step", "reward-model step (8 pairs, LoRA r=4)"),
                       ("policy_update", "PPO update (4 rollouts, LoRA r=8 + value head)")):
        x = r[key]
        rows.append(f"| {label} | {x['flop_per_second']['median'] / g:.1f} | {spread_text(x['seconds'], 2)} "
                    f"| {x['share_of_ceiling']:.2f} |")
    detail = [f"- {label}: {r[key]['flops_counted'] / 1e12:.3f} TFLOP counted, {r[key]['flops_analytic'] / 1e12:.3f} "
              f"TFLOP analytic" for key, label in (("reward_model_step", "reward-model step"),
                                                   ("policy_update", "PPO update"))]
    return "\n".join([
        "### Efficiency",
        "",
        f"{r['machine']['cpu_count']} CPU cores, {r['torch_threads']} torch threads, float32. GFLOP/s medians of "
        f"{r['repetitions']} repetitions after a warm-up; the ceiling is the 2048³ matmul rate (median of the runs "
        "before and after).",
        "",
        "| work | GFLOP/s | s per step, median [min–max] | share of ceiling |",
        "|---|---|---|---|",
        *rows,
        "",
        *detail,
        f"- load average start {r['load_average_start']}, end {r['load_average_end']}",
    ])


if __name__ == "__main__":
    main()
