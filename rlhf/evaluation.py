"""Base against tuned, side by side: rewards, win rate with a bootstrap interval, KL, lengths."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from rlhf.artifacts import TENSORBOARD_DIR
from rlhf.inference import load_generator
from rlhf.modeling import pick_placement
from rlhf.policy import Policy
from rlhf.rollouts import make_rollout
from rlhf.reward_model import load_reward_model, score_packed
from rlhf.validation import prompt_key


def completion_ids(tokenizer, text: str, ended: bool, limit: int) -> list[int]:
    """Token ids of a decoded prediction, ending with EOS when the model ended it and it fits."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:limit]
    if ended and len(ids) < limit:
        ids = ids + [tokenizer.eos_token_id]
    return ids or [tokenizer.eos_token_id]


def win_rate(base: list[float], tuned: list[float]) -> float:
    """Share of prompts where the tuned completion scores higher (ties count half)."""
    return sum(1.0 if t > b else 0.5 if t == b else 0.0 for b, t in zip(base, tuned)) / len(base)


def bootstrap_interval(base: list[float], tuned: list[float], seed: int, resamples: int = 2000) -> list[float]:
    rng = random.Random(seed)
    count = len(base)
    rates = []
    for _ in range(resamples):
        picks = [rng.randrange(count) for _ in range(count)]
        rates.append(win_rate([base[i] for i in picks], [tuned[i] for i in picks]))
    rates.sort()
    return [rates[int(0.025 * resamples)], rates[int(0.975 * resamples) - 1]]


def _words(text: str) -> int:
    return len(text.split())


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def evaluate_outputs(base_rows: list[dict], tuned_rows: list[dict], reward_model_dir: Path, base_model_path: str,
                     adapter_dir: Path | None, device: str = "auto", seed: int = 0,
                     max_tokens: int = 4096) -> tuple[dict, list[dict]]:
    """Metrics and the per-prompt comparison rows (ordered by reward gain, largest first)."""
    if len(base_rows) != len(tuned_rows) or not base_rows:
        raise ValueError(f"evaluation needs the same prompts on both sides, got {len(base_rows)} and {len(tuned_rows)}")
    for base, tuned in zip(base_rows, tuned_rows):
        if prompt_key(base) != prompt_key(tuned):
            raise ValueError("base and tuned outputs are not in the same prompt order")
    placement = pick_placement(device)
    reward = load_reward_model(reward_model_dir, placement, base_model_path)
    encoder = reward.encoder()
    limit = reward.spec.target_sequence_length
    tokenizer = reward.tokenizer
    prompts = [encoder.encode_prompt(r) for r in base_rows]
    base_ids = [completion_ids(tokenizer, r["prediction"], r.get("ended", True), limit) for r in base_rows]
    tuned_ids = [completion_ids(tokenizer, r["prediction"], r.get("ended", True), limit) for r in tuned_rows]
    scores = score_packed(reward.model, prompts, [[b, t] for b, t in zip(base_ids, tuned_ids)],
                          tokenizer.pad_token_id, max_tokens)
    scores = reward.normalise(scores)
    base_scores, tuned_scores = scores[:, 0].tolist(), scores[:, 1].tolist()

    kl_to_base = None
    if adapter_dir is not None:
        model = load_generator(base_model_path, adapter_dir, placement)
        policy = Policy(model, None, tokenizer.eos_token_id, tokenizer.pad_token_id)
        kls = []
        for first in range(0, len(prompts), 8):
            rows = range(first, min(first + 8, len(prompts)))
            rollout = make_rollout([prompts[i] for i in rows], [tuned_ids[i] for i in rows], tokenizer.pad_token_id,
                                   [True] * len(rows)).to(placement.device)
            with torch.no_grad():
                tuned_lp, _, _ = policy.evaluate(rollout, 1.0, with_values=False)
                base_lp, _, _ = policy.evaluate(rollout, 1.0, with_values=False, use_adapter=False)
            kls.extend(((tuned_lp - base_lp) * rollout.completion_mask).sum(dim=1).tolist())
        kl_to_base = _mean(kls)

    comparison = []
    for base, tuned, b, t in zip(base_rows, tuned_rows, base_scores, tuned_scores):
        entry = {key: base[key] for key in ("input_text", "messages") if key in base}
        entry.update({"base": base["prediction"], "tuned": tuned["prediction"], "base_reward": b,
                      "tuned_reward": t, "reward_gain": t - b})
        comparison.append(entry)
    comparison.sort(key=lambda e: -e["reward_gain"])
    metrics = {
        "prompts": len(base_rows),
        "base_mean_reward": _mean(base_scores),
        "tuned_mean_reward": _mean(tuned_scores),
        "win_rate_vs_base": win_rate(base_scores, tuned_scores),
        "win_rate_ci95": bootstrap_interval(base_scores, tuned_scores, seed),
        "kl_to_base": kl_to_base,
        "base_mean_words": _mean([_words(r["prediction"]) for r in base_rows]),
        "tuned_mean_words": _mean([_words(r["prediction"]) for r in tuned_rows]),
        "base_ended_share": _mean([float(r.get("ended", True)) for r in base_rows]),
        "tuned_ended_share": _mean([float(r.get("ended", True)) for r in tuned_rows]),
    }
    return metrics, comparison


METRICS_FILE = "metrics.json"
REPORT_HTML = "report.html"
REPORT_MARKDOWN = "report.md"
COMPARISON_FILE = "comparison.jsonl"

REWARD_MODEL_KEYS = ("eval_accuracy", "eval_pairs", "final_rank_loss", "final_train_accuracy", "eval_mean_margin",
                     "steps", "train_pairs", "pairs_per_second")
POLICY_KEYS = ("final_reward", "final_kl", "initial_reward", "final_ended_share", "steps", "prompts",
               "episodes_per_second")


def _stage_metrics(directory: Path, keys: tuple[str, ...]) -> dict:
    path = Path(directory) / METRICS_FILE
    found = json.loads(path.read_text()) if path.is_file() else {}
    return {k: found[k] for k in keys if k in found}


def evaluate_run(base_rows: list[dict], tuned_rows: list[dict], reward_model_dir: Path, policy_dir: Path,
                 output_dir: Path, parameters: dict, device: str = "auto", seed: int = 0) -> dict:
    """Score both sides, then write metrics.json, comparison.jsonl, report.html and report.md."""
    from rlhf.datasets import write_jsonl
    from rlhf.model_reference import resolve_model_reference
    from rlhf.policy import ADAPTER_DIR, read_policy_spec
    from rlhf.report import read_scalars, render_html, render_markdown

    spec = read_policy_spec(policy_dir)
    base_model_path = resolve_model_reference(spec.large_model_reference)
    evaluation, comparison = evaluate_outputs(base_rows, tuned_rows, reward_model_dir, base_model_path,
                                              Path(policy_dir) / ADAPTER_DIR, device, seed)
    metrics = {"reward_model": _stage_metrics(reward_model_dir, REWARD_MODEL_KEYS),
               "policy": _stage_metrics(policy_dir, POLICY_KEYS), "evaluation": evaluation}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    write_jsonl(output_dir / COMPARISON_FILE, comparison)
    reward_scalars = read_scalars(Path(reward_model_dir) / TENSORBOARD_DIR)
    policy_scalars = read_scalars(Path(policy_dir) / TENSORBOARD_DIR)
    (output_dir / REPORT_HTML).write_text(render_html(parameters, metrics, comparison, reward_scalars, policy_scalars),
                                          encoding="utf-8")
    (output_dir / REPORT_MARKDOWN).write_text(render_markdown(metrics, comparison), encoding="utf-8")
    return metrics
