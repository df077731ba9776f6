"""The GPU check: whether this code's CUDA and bfloat16 paths agree with themselves, and how fast they run.

    .venv/bin/python bench/gpu_check.py [--device auto] [--dtype auto] [--model PATH] [--steps 4]

On one GPU it finishes within a few minutes on the default model (the bundled sample's data); it runs on a
CPU too, where every line it prints says CPU. It prints, and writes to bench/results/gpu_check.json (or `--output`):

- step 0 of PPO in the chosen precision: mean |log p(sampling pass) - log p(training pass)| over the
  completion tokens (the sampling pass is a one-token pass over the KV cache; target < 1e-2), and the KL to
  the reference and the approx_kl of the first update, both of which must be 0: the old log-probs come from
  the training pass itself (`Policy.roll_out`);
- the reward model's shared-prefix packing against each completion run alone, in that precision;
- generation tokens/s, reward-model pairs/s and PPO episodes/s of the real trainers on this device;
- peak memory (the GPU's allocator on CUDA, the process's resident set on a CPU), and the process's peak
  resident set on the host.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
PROMPTS = 16  # rows sampled for the step-0 and generation figures
NEW_TOKENS = 64


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_zero(model_path: str, placement, prompts: list[list[int]], tokenizer) -> dict:
    """Sampling against training log-probs, the KL and approx_kl of PPO's first step, and generation speed."""
    from rlhf.models.loading import load_causal_lm, stop_token_ids
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.decoding import decode
    from rlhf.rl.policy import Policy
    from rlhf.rl.ppo import Experience, gae, ppo_losses

    torch.manual_seed(0)
    model = load_causal_lm(model_path, placement)
    policy = Policy.create(model, 8, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    config = PPOConfig(kl_coeff=0.1, target_sequence_length=NEW_TOKENS)
    started = time.perf_counter()
    with torch.no_grad():
        decoded = decode(policy.model, prompts, NEW_TOKENS, policy.stop_ids, policy.pad_id, config.temperature,
                         config.top_p)
        if placement.device.type == "cuda":
            torch.cuda.synchronize(placement.device)
        seconds = time.perf_counter() - started
        rollout = decoded.rollout
        mask = rollout.completion_mask.bool()
        log_probs, _, values = policy.evaluate(rollout, config.temperature)
        reference, _, _ = policy.evaluate(rollout, config.temperature, with_values=False, reference=True)
    # PPO's own first step, through `roll_out`, on the same prompts
    torch.manual_seed(0)
    with torch.no_grad():
        sampled, old_log_probs, old_values = policy.roll_out(prompts, NEW_TOKENS, config.temperature, config.top_p)
        kl_reference, _, _ = policy.evaluate(sampled, config.temperature, with_values=False, reference=True)
    sampled_mask = sampled.completion_mask.float()
    kl = ((old_log_probs - kl_reference) * sampled_mask).sum(dim=1)
    rewards = torch.zeros_like(old_log_probs)
    advantages, returns = gae(rewards, old_values, sampled_mask, config.gamma, config.lam)
    experience = Experience(sampled, old_log_probs, old_values * sampled_mask, advantages, returns,
                            torch.zeros(len(prompts)), torch.zeros(len(prompts)), kl, kl_reference)
    losses = ppo_losses(policy, experience, config)
    tokens = float(sampled_mask.sum())
    with torch.no_grad():
        log_ratio = policy.evaluate(sampled, config.temperature, with_values=False)[0] - old_log_probs
    return {
        "sampling_vs_training_mean_abs_log_prob": float((decoded.log_probs - log_probs)[mask].abs().mean()),
        "adapter_off_vs_on_mean_abs_log_prob": float((reference - log_probs)[mask].abs().mean()),
        "step0_kl_per_completion": float(kl.mean()),
        "step0_approx_kl_per_token": float(losses["approx_kl"]) / tokens,
        "step0_max_abs_log_ratio": float((log_ratio.abs() * sampled_mask).max()),
        "generation_tokens_per_second": float(mask.sum()) / seconds,
        "generation_rows": len(prompts),
    }


def packing_agreement(model_path: str, placement, rows: list[dict], tokenizer) -> dict:
    """Max |score packed - score alone| over pairs, on a fresh reward model in the chosen precision."""
    from rlhf.data.prompts import PromptEncoder, PromptFormat
    from rlhf.data.validation import chosen, rejected
    from rlhf.models.loading import load_backbone
    from rlhf.reward.model import RewardModel, score_packed

    encoder = PromptEncoder(tokenizer, PromptFormat("", None), 512, NEW_TOKENS)
    prompts = [encoder.encode_prompt(r) for r in rows]
    completions = [[encoder.encode_completion(chosen(r)), encoder.encode_completion(rejected(r))] for r in rows]
    model = RewardModel.with_new_head(load_backbone(model_path, placement), 0)
    packed = score_packed(model, prompts, completions, tokenizer.pad_token_id, 4096)
    alone = torch.cat([score_packed(model, prompts, [[c[k]] for c in completions], tokenizer.pad_token_id, 4096)
                       for k in (0, 1)], dim=1)
    return {"packed_vs_alone_max_abs_score": float((packed - alone).abs().max()),
            "score_std": float(alone.std()), "pairs": len(rows)}


def trainer_speed(model_path: str, device: str, steps: int, work: Path) -> dict:
    """Pairs/s and episodes/s of the real trainers, a few steps each, on the bundled sample."""
    from rlhf.data.datasets import prepare_datasets, sample_dataset
    from rlhf.models.loading import pick_placement
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.reward.training import train_reward_model
    from rlhf.rl.config import PPOConfig
    from rlhf.rl.ppo import train_policy
    from rlhf.rl.rewards import RewardModelReward

    data = prepare_datasets(sample_dataset("preference.jsonl"), sample_dataset("prompts.jsonl"))
    instruction = "Summarize in less than 50 words."
    reward = train_reward_model(
        RewardTrainingConfig(train_steps=steps, batch_size=16, instruction=instruction, device=device,
                             target_sequence_length=NEW_TOKENS, checkpoint_every=10**6),
        data.train_pairs, data.held_out_pairs, model_path, work / "reward_model", base_model_path=model_path)
    reward_fn = RewardModelReward(work / "reward_model", pick_placement(device), model_path)
    policy = train_policy(
        PPOConfig(train_steps=steps, batch_size=16, micro_batch_size=8, ppo_minibatch_size=8, ppo_epochs=1,
                  instruction=instruction, device=device, target_sequence_length=NEW_TOKENS,
                  checkpoint_every=10**6),
        data.prompts, reward_fn, model_path, work / "policy", base_model_path=model_path)
    return {"reward_model_pairs_per_second": reward["pairs_per_second"],
            "reward_model_dtype": reward.get("dtype"), "ppo_episodes_per_second": policy["episodes_per_second"],
            "ppo_dtype": policy.get("dtype"), "ppo_steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="precision of the step-0 and packing checks; auto: what the stages pick on this device")
    parser.add_argument("--model", default=None, help="a model directory (default: the default model)")
    parser.add_argument("--steps", type=int, default=4, help="steps of each trainer for the speed figures")
    parser.add_argument("--output", type=Path, default=RESULTS / "gpu_check.json", help="where the JSON goes")
    args = parser.parse_args()

    from rlhf.data.datasets import read_jsonl, sample_dataset
    from rlhf.data.prompts import PromptEncoder, PromptFormat
    from rlhf.models.loading import load_tokenizer, pick_placement
    from rlhf.models.reference import DEFAULT_MODEL, resolve_model_reference

    model_path = args.model or resolve_model_reference(DEFAULT_MODEL)
    placement = pick_placement(args.device, None if args.dtype == "auto" else getattr(torch, args.dtype))
    where = f"{placement.device.type.upper()} ({torch.cuda.get_device_name(placement.device)})" \
        if placement.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    tokenizer = load_tokenizer(model_path)
    encoder = PromptEncoder(tokenizer, PromptFormat("Summarize in less than 50 words.", None), 512, NEW_TOKENS)
    prompt_rows = read_jsonl(sample_dataset("prompts.jsonl"))[:PROMPTS]
    pair_rows = read_jsonl(sample_dataset("preference.jsonl"))[:PROMPTS]
    started = time.perf_counter()
    result = {"device": where, "dtype": str(placement.dtype).removeprefix("torch."), "model": model_path}
    result.update(step_zero(model_path, placement, [encoder.encode_prompt(r) for r in prompt_rows], tokenizer))
    result.update(packing_agreement(model_path, placement, pair_rows, tokenizer))
    with tempfile.TemporaryDirectory() as work:
        result.update(trainer_speed(model_path, args.device, args.steps, Path(work)))
    result["peak_memory_mb"] = _peak_memory_mb(placement.device)
    # The host's too, on a GPU: the models load onto the GPU directly, so it should stay far below their size.
    result["peak_host_memory_mb"] = _peak_memory_mb(torch.device("cpu"))
    result["seconds"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{where} {key}: {value:.4g}" if isinstance(value, float) else f"{where} {key}: {value}")
    if result["sampling_vs_training_mean_abs_log_prob"] >= 1e-2 or abs(result["step0_kl_per_completion"]) > 1e-3:
        sys.exit(f"{where}: step 0 does not agree (see above)")


if __name__ == "__main__":
    main()
