"""Base against tuned, side by side, by two judges: the reward model (scores, win rate with a bootstrap
interval) and, where the instruction defines one, the rule judge (`rlhf.evaluation.rule_judge`), which never sees the
reward model. Also the KL of the tuned policy to the base, lengths, ended shares, repeated n-grams, and how
much of each completion is copied from its prompt."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from rlhf.data.prompts import PromptEncoder
from rlhf.data.validation import prompt_key, user_input
from rlhf.errors import UserError
from rlhf.evaluation.inference import load_generator
from rlhf.evaluation.rule_judge import (
    CHECKS,
    SummaryRule,
    copied_ngram_share,
    repeated_ngram_share,
    rule_for_instruction,
)
from rlhf.models.artifacts import TENSORBOARD_DIR
from rlhf.models.loading import MACHINE_KEYS, machine, pick_placement, stop_token_ids
from rlhf.reward.model import load_reward_model, score_packed
from rlhf.rl.policy import Policy, PolicySpec
from rlhf.rl.rollouts import Rollout
from rlhf.training.distributed import ALONE, Ranks, join, local_device
from rlhf.training.progress import Progress

KL_BATCH = 8  # completions sampled per pass for the KL to base (32 a pass took as long per completion here)
# Completions sampled per eval prompt for the KL to base. One per prompt left a standard error of 1.1-1.3
# nats on 16 prompts (sd 4-5 nats per completion), as wide as the distance of the default run's seeds from the
# 10-nat target; four halve it (LEARNING.md, "Where the KL lies").
KL_SAMPLES_PER_PROMPT = 4


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


@torch.no_grad()
def sampled_log_ratios(policy: Policy, prompts: list[list[int]],
                       spec: PolicySpec) -> Iterator[tuple[torch.Tensor, Rollout]]:
    """For each pass of about `KL_BATCH` prompts (whole groups when the policy packs groups of one prompt's
    completions): completions sampled from the tuned policy at the training temperature (and nucleus), the
    per-token log-ratio of the tuned and the base (adapter off) distributions at that temperature on the
    generated ids themselves [rows, positions], 0 past a completion's end, and the sampled rollout. The tuned
    log-probs come from the sampling pass itself (`Policy.roll_out`), so only the base takes a second pass.
    Draws from torch's global generator: seed it first."""
    group = policy.prompt_group
    per_pass = max(group, KL_BATCH // group * group)
    for first in range(0, len(prompts), per_pass):
        rollout, tuned, _ = policy.roll_out(prompts[first:first + per_pass], spec.target_sequence_length,
                                            spec.temperature, spec.top_p)
        base, _, _ = policy.evaluate(rollout, spec.temperature, with_values=False, reference=True)
        yield (tuned - base) * rollout.completion_mask, rollout


def kl_to_base(model, tokenizer, prompts: list[list[int]], spec: PolicySpec, seed: int,
               samples_per_prompt: int = KL_SAMPLES_PER_PROMPT, in_step: Ranks = ALONE) -> tuple[float, float, int]:
    """KL(tuned || base) in nats per completion: the mean, over `samples_per_prompt` completions per prompt,
    of the summed per-token log-ratio (`sampled_log_ratios`). Returns the mean, its standard error and the
    number of completions. A prompt's completions are drawn in a row, and the base pass packs them after one
    copy of their prompt where that is exact for the model (`Policy.pack_prompt_groups`). `in_step`: the ranks
    `model`'s weights are sharded over, each running every pass."""
    policy = Policy(model, None, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    policy.in_step = in_step
    policy.pack_prompt_groups(samples_per_prompt, spec.target_sequence_length, max(len(p) for p in prompts))
    torch.manual_seed(seed)
    drawn = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    progress = Progress(len(drawn), "KL to base", unit="completion") if in_step.main else None
    sums = []
    for ratios, _ in sampled_log_ratios(policy, drawn, spec):
        sums.extend(ratios.sum(dim=1).tolist())
        if progress:
            progress.update(len(ratios))
    if progress:
        progress.close()
    spread = torch.tensor(sums, dtype=torch.float64).std().item() if len(sums) > 1 else 0.0
    return _mean(sums), spread / len(sums) ** 0.5, len(sums)


def rule_verdicts(rule: SummaryRule, rows: list[dict]) -> list[dict]:
    verdicts = []
    for row in rows:
        verdict = rule.judge(user_input(row), row["prediction"], stopped=row.get("ended", True))
        verdicts.append({"passed": verdict.passed, "failed": verdict.failed()})
    return verdicts


def evaluate_outputs(base_rows: list[dict], tuned_rows: list[dict], reward_model_dir: Path, base_model_path: str,
                     adapter_dir: Path | None, spec: PolicySpec | None = None, device: str = "auto", seed: int = 0,
                     max_tokens: int = 4096, in_step: Ranks = ALONE) -> tuple[dict, list[dict]]:
    """Metrics and the per-prompt comparison rows (ordered by reward gain, largest first). `spec` (the tuned
    policy's) gives the instruction, for the rule judge, and the sampling settings, for the KL to base.
    `in_step`: the ranks to shard the reward model's and the policy's weights over (`rlhf.training.sharding`):
    each runs the whole evaluation, every pass together, and all return the same (the few eval prompts ask for
    the memory of several GPUs, not their speed)."""
    if len(base_rows) != len(tuned_rows) or not base_rows:
        raise UserError(f"evaluation needs the same prompts on both sides, got {len(base_rows)} and {len(tuned_rows)}")
    for base, tuned in zip(base_rows, tuned_rows):
        if prompt_key(base) != prompt_key(tuned):
            raise UserError("base and tuned outputs are not in the same prompt order")
    placement = pick_placement(local_device(device))
    reward = load_reward_model(reward_model_dir, placement, base_model_path, in_step)
    if in_step.parallel and in_step.main:
        print(f"evaluation: each of {in_step.world_size} processes holds 1/{in_step.world_size} of the reward "
              "model's and the policy's decoder layers", file=sys.stderr)
    encoder = reward.encoder()
    limit = reward.spec.target_sequence_length
    tokenizer = reward.tokenizer
    prompts = [encoder.encode_prompt(r) for r in base_rows]
    base_ids = [completion_ids(tokenizer, r["prediction"], r.get("ended", True), limit) for r in base_rows]
    tuned_ids = [completion_ids(tokenizer, r["prediction"], r.get("ended", True), limit) for r in tuned_rows]
    scores = score_packed(reward.model, prompts, [[b, t] for b, t in zip(base_ids, tuned_ids)],
                          tokenizer.pad_token_id, max_tokens, in_step)
    scores = reward.normalise(scores)
    base_scores, tuned_scores = scores[:, 0].tolist(), scores[:, 1].tolist()

    kl = kl_error = kl_completions = None
    if adapter_dir is not None and spec is not None:
        policy_encoder = PromptEncoder(tokenizer, spec.prompt_format(), spec.prompt_sequence_length,
                                       spec.target_sequence_length)
        kl, kl_error, kl_completions = kl_to_base(
            load_generator(base_model_path, adapter_dir, placement, in_step=in_step), tokenizer,
            [policy_encoder.encode_prompt(r) for r in base_rows], spec, seed, in_step=in_step)

    rule = rule_for_instruction(spec.instruction if spec is not None else reward.spec.instruction)
    judged = {side: rule_verdicts(rule, rows) if rule else None for side, rows in (("base", base_rows),
                                                                                    ("tuned", tuned_rows))}
    comparison = []
    for index, (base, tuned, b, t) in enumerate(zip(base_rows, tuned_rows, base_scores, tuned_scores)):
        entry = {key: base[key] for key in ("input_text", "messages") if key in base}
        entry.update({"base": base["prediction"], "tuned": tuned["prediction"], "base_reward": b,
                      "tuned_reward": t, "reward_gain": t - b})
        if rule:
            entry.update({"base_rule": judged["base"][index], "tuned_rule": judged["tuned"][index]})
        comparison.append(entry)
    comparison.sort(key=lambda e: -e["reward_gain"])
    metrics = {
        "prompts": len(base_rows),
        "base_mean_reward": _mean(base_scores),
        "tuned_mean_reward": _mean(tuned_scores),
        "win_rate_vs_base": win_rate(base_scores, tuned_scores),
        "win_rate_ci95": bootstrap_interval(base_scores, tuned_scores, seed),
        "kl_to_base": kl,
        "kl_to_base_sampling": None if kl is None else {"temperature": spec.temperature, "top_p": spec.top_p,
                                                        "completions": kl_completions,
                                                        "standard_error": kl_error},
        "base_mean_words": _mean([_words(r["prediction"]) for r in base_rows]),
        "tuned_mean_words": _mean([_words(r["prediction"]) for r in tuned_rows]),
        "base_ended_share": _mean([float(r.get("ended", True)) for r in base_rows]),
        "tuned_ended_share": _mean([float(r.get("ended", True)) for r in tuned_rows]),
        "base_repeated_ngram_share": _mean([repeated_ngram_share(r["prediction"]) for r in base_rows]),
        "tuned_repeated_ngram_share": _mean([repeated_ngram_share(r["prediction"]) for r in tuned_rows]),
        "base_copied_ngram_share": _mean([copied_ngram_share(r["prediction"], user_input(r)) for r in base_rows]),
        "tuned_copied_ngram_share": _mean([copied_ngram_share(r["prediction"], user_input(r)) for r in tuned_rows]),
        "judges": ["reward_model"] + (["rule"] if rule else []),
        **machine(placement),
    }
    if rule:
        metrics["rule"] = rule.description
        for side in ("base", "tuned"):
            metrics[f"rule_pass_rate_{side}"] = _mean([float(v["passed"]) for v in judged[side]])
            metrics[f"rule_checks_{side}"] = {check: _mean([float(check not in v["failed"]) for v in judged[side]])
                                              for check in CHECKS}
    return metrics, comparison


METRICS_FILE = "metrics.json"
REPORT_HTML = "report.html"
REPORT_MARKDOWN = "report.md"
COMPARISON_FILE = "comparison.jsonl"

REWARD_MODEL_KEYS = ("eval_accuracy", "eval_pairs", "final_rank_loss", "final_train_accuracy", "eval_mean_margin",
                     "steps", "train_pairs", "pairs_per_second", *MACHINE_KEYS)
POLICY_KEYS = ("tuning_method", "final_reward", "final_kl", "initial_reward", "final_ended_share", "steps", "prompts",
               "episodes_per_second", "final_dpo_loss", "final_reward_margin", "eval_accuracy", "eval_pairs",
               "train_pairs", "pairs_per_second", "sft_steps", "final_sft_loss", "dpo_warmup_steps",
               "final_dpo_warmup_loss", *MACHINE_KEYS)


def _stage_metrics(directory: Path, keys: tuple[str, ...]) -> dict:
    path = Path(directory) / METRICS_FILE
    found = json.loads(path.read_text()) if path.is_file() else {}
    return {k: found[k] for k in keys if k in found}


def evaluate_run(base_rows: list[dict], tuned_rows: list[dict], reward_model_dir: Path, policy_dir: Path,
                 output_dir: Path, parameters: dict, device: str = "auto", seed: int = 0,
                 shard_weights: bool = False) -> dict:
    """Score both sides, then write metrics.json, comparison.jsonl, report.html and report.md. Started by
    `torch.distributed.run` with `shard_weights`, the processes shard both models' weights (`evaluate_outputs`),
    and the first writes."""
    from rlhf.data.datasets import write_jsonl
    from rlhf.evaluation.report import read_scalars, render_html, render_markdown
    from rlhf.models.reference import resolve_model_reference
    from rlhf.rl.policy import ADAPTER_DIR, read_policy_spec

    spec = read_policy_spec(policy_dir)
    base_model_path = resolve_model_reference(spec.large_model_reference)
    evaluation, comparison = evaluate_outputs(base_rows, tuned_rows, reward_model_dir, base_model_path,
                                              Path(policy_dir) / ADAPTER_DIR, spec, device, seed,
                                              in_step=join() if shard_weights else ALONE)
    metrics = {"reward_model": _stage_metrics(reward_model_dir, REWARD_MODEL_KEYS),
               "policy": _stage_metrics(policy_dir, POLICY_KEYS), "evaluation": evaluation}
    if not join().main:
        return metrics
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
