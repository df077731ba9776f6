"""The least time a finished local run's reward-model and policy stages could take on this machine, against
the time they took: each stage's matmul work, counted from the run's own data, settings, step counts and
completion lengths, at the fastest dense float32 matmul rate this machine shows now, and its decode steps at
the fastest read bandwidth it shows now (a shared machine's speed moves from minute to minute; the floor takes
its best). Run it alone, on the machine the run ran on.

    .venv/bin/python bench/run_floor.py runs/run-DATE-TIME

A floor, not a forecast: attention, element-wise work, the optimizer and model loading count for nothing
here, so a stage always takes longer. Counted, with P the weights of the linear layers, V x d the language-
model head and T the tokens of a pass: 2·P·T a pass without gradients, 4·P·T with them (a frozen backbone
under LoRA: no weight gradients), the head only where a token is predicted; the policy's frozen passes over
kept prompts (BENCHMARKS.md section 13) read a prompt once per model. A decode step takes at least the longer
of reading every weight once and its rows' 2·P products.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from datetime import datetime, timedelta
from pathlib import Path

from common import load_average, machine, read_bandwidth, write_results
from efficiency import matmul_ceiling

NAME = "run_floor"
STAGE_ROOT = Path("pipeline_root") / "rlhf-pipeline"
TIMESTAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) ")


def stage_seconds(log: Path) -> float:
    """Wall time between a stage log's first and last timestamped lines (the local runner's own)."""
    stamps = [datetime.strptime(m.group(1), "%H:%M:%S.%f") for line in log.read_text().splitlines()
              if (m := TIMESTAMP.match(line))]
    elapsed = stamps[-1] - stamps[0]
    return (elapsed + timedelta(days=1) if elapsed.days < 0 else elapsed).total_seconds()


def shapes(model_dir: str) -> dict:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or d // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * config["intermediate_size"])  # q, o; k, v; gate, up, down
    return {"linear": linear, "head": config["vocab_size"] * d}


def policy_phases(run: Path, warmup_steps: int) -> dict[str, list[float]]:
    """The policy stage's TensorBoard scalars per PPO step (the steps after the warm-up), and the warm-up
    steps' times (`warm-up`)."""
    from rlhf.evaluation.report import read_scalars

    scalars = read_scalars(run / STAGE_ROOT / "train-policy" / "policy" / "tensorboard")
    phases = {tag: [value for step, value in scalars[tag] if step > warmup_steps]
              for tag in ("response_length", "time/generation", "time/forward", "time/scoring", "time/update")}
    phases["warm-up"] = [value for step, value in scalars["time/update"] if step <= warmup_steps]
    return phases


def floors(run: Path, flops_per_second: float, bytes_per_second: float) -> tuple[dict, dict]:
    from rlhf.data.datasets import read_jsonl
    from rlhf.data.prompts import PromptEncoder, PromptFormat
    from rlhf.models.loading import load_tokenizer
    from rlhf.models.reference import resolve_model_reference
    from rlhf.pipeline.parameters import pipeline_defaults
    from rlhf.reward.training import encode_pairs
    from rlhf.training.batching import batch_indices

    # run.json holds what the run set; the pipeline's defaults the rest.
    settings = {**pipeline_defaults(), **json.loads((run / "run.json").read_text())["parameters"]}
    metrics = json.loads((run / "metrics.json").read_text())
    if metrics["policy"].get("tuning_method", "ppo") != "ppo":
        raise SystemExit(f"{run}: counts PPO's work; this run tuned with {metrics['policy']['tuning_method']}")
    model = resolve_model_reference(settings["large_model_reference"])
    size = shapes(model)
    P, H = size["linear"], size["head"]
    encoder = PromptEncoder(load_tokenizer(model), PromptFormat(settings["instruction"], None),
                            settings["prompt_sequence_length"], settings["target_sequence_length"])
    datasets = run / STAGE_ROOT / "validate-datasets"
    train = encode_pairs(read_jsonl(datasets / "train_pairs"), encoder)
    held_out = encode_pairs(read_jsonl(datasets / "held_out_pairs"), encoder)
    prompts = [len(encoder.encode_prompt(row)) for row in read_jsonl(datasets / "prompts")]

    def seconds(flops: float, decode_steps: float = 0.0, rows_per_decode_step: float = 0.0) -> float:
        step = max((P + H) * 4 / bytes_per_second, 2 * P * rows_per_decode_step / flops_per_second)
        return flops / flops_per_second + decode_steps * step

    work = {}
    pair_tokens = statistics.mean(p.length() for p in train)
    rm_flops = (metrics["reward_model"]["steps"] * settings["reward_model_batch_size"] * 4 * P * pair_tokens
                + sum(2 * P * p.length() for p in held_out))
    measured = {log.stem: stage_seconds(log) for log in sorted((run / "logs").glob("*.log")) if log.stem != "pipeline"}
    work["reward model (the stage)"] = {"tflop": rm_flops / 1e12, "decode_steps": 0, "floor_s": seconds(rm_flops),
                                        "measured_s": measured["train-reward-model"]}

    batch = settings["reinforcement_learning_batch_size"]
    sft_steps, dpo_steps = (metrics["policy"].get(name, 0) for name in ("sft_steps", "dpo_warmup_steps"))
    prompt_tokens = statistics.mean(len(p.prompt) for p in train)
    winner_tokens = statistics.mean(len(p.winner) for p in train)
    loser_tokens = statistics.mean(len(p.loser) for p in train)
    # Supervised: the prompt and its winner, forward and backward. DPO: the prompt once with both candidates,
    # forward and backward, and one forward of the reference per pair met (half a forward and backward).
    pairs_met = min(len(train), dpo_steps * batch)
    warm_flops = (sft_steps * batch * (4 * P * (prompt_tokens + winner_tokens) + 4 * H * winner_tokens)
                  + (dpo_steps * batch + pairs_met / 2) * (4 * P * (prompt_tokens + winner_tokens + loser_tokens)
                                                           + 4 * H * (winner_tokens + loser_tokens)))
    phases = policy_phases(run, sft_steps + dpo_steps)
    work["policy: warm-up"] = {"tflop": warm_flops / 1e12, "decode_steps": 0, "floor_s": seconds(warm_flops),
                               "measured_s": sum(phases["warm-up"])}
    steps = len(phases["response_length"])
    per_pass = (settings["reinforcement_learning_rollout_micro_batch_size"]
                or settings["reinforcement_learning_micro_batch_size"])
    passes = math.ceil(batch / per_pass)
    met = {i for step in range(steps) for i in batch_indices(step, batch, len(prompts), settings["seed"])}
    mean_prompt = statistics.mean(prompts)
    completions = sum(phases["response_length"])  # mean completion tokens, summed over the steps
    # A pass decodes until its longest row stops: at least the mean completion's tokens.
    decode_steps = passes * completions
    generation = steps * batch * (2 * P * mean_prompt + 2 * H)
    frozen = batch * completions * (2 * P + 2 * H + 2 * P) + sum(2 * 2 * P * prompts[i] for i in met)
    update = settings["reinforcement_learning_ppo_epochs"] * batch * (
        4 * P * (steps * mean_prompt + completions) + 4 * H * completions)
    for name, flops, decoded, timed in (
            ("policy: PPO sampling", generation, decode_steps, phases["time/generation"]),
            ("policy: PPO reference and reward passes", frozen, 0,
             [a + b for a, b in zip(phases["time/forward"], phases["time/scoring"], strict=True)]),
            ("policy: PPO update", update, 0, phases["time/update"])):
        work[name] = {"tflop": flops / 1e12, "decode_steps": decoded,
                      "floor_s": seconds(flops, decoded, batch / passes), "measured_s": sum(timed)}

    counts = {"linear_weights": P, "head_weights": H, "reward_pair_tokens": pair_tokens, "ppo_steps": steps,
              "sft_steps": sft_steps, "dpo_warmup_steps": dpo_steps, "mean_prompt_tokens": mean_prompt, "prompts_met": len(met),
              "mean_completion_tokens": completions / steps}
    return {"work": work, "stages": measured}, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished `rlhf run` output directory")
    args = parser.parse_args()
    load_at_start = load_average()
    ceiling = matmul_ceiling(2048, 2048, 2048, 10)["flop_per_second"]["max"]
    bandwidth = max(read_bandwidth() for _ in range(3))
    found, counts = floors(args.run, ceiling, bandwidth)
    result = {"benchmark": NAME, "run": args.run.name, "ceiling_flop_per_second": ceiling,
              "read_bytes_per_second": bandwidth, **found, "counts": counts, "machine": machine(),
              "load_average_start": load_at_start, "load_average_end": load_average()}
    write_results(NAME, result, markdown(result))


def markdown(r: dict) -> str:
    work, stages = r["work"], r["stages"]
    rows = []
    for name, w in work.items():
        rows.append(f"| {name} | {w['tflop']:.1f} | {w['decode_steps']:.0f} | {w['floor_s']:.0f} | "
                    f"{w['measured_s']:.0f} | {w['measured_s'] / w['floor_s']:.1f}x |")
    two = stages["train-reward-model"] + stages["train-policy"]
    floor_two = sum(w["floor_s"] for w in work.values())
    rows.append(f"| reward-model and policy stages, as logged | {sum(w['tflop'] for w in work.values()):.1f} | | "
                f"{floor_two:.0f} | {two:.0f} | {two / floor_two:.1f}x |")
    others = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items()
                       if name not in ("train-reward-model", "train-policy"))
    c = r["counts"]
    return "\n".join([
        f"The run `{r['run']}`; this machine now, at its fastest: dense float32 matmul "
        f"{r['ceiling_flop_per_second'] / 1e9:.1f} GFLOP/s, read bandwidth {r['read_bytes_per_second'] / 1e9:.1f} GB/s.",
        "",
        "| work | matmul TFLOP | decode steps | floor (s) | the run (s) | run / floor |", "|---|---|---|---|---|---|",
        *rows, "",
        f"Counted from the run: {c['linear_weights'] / 1e6:.1f}M linear and {c['head_weights'] / 1e6:.1f}M head "
        f"weights; reward-model pairs of {c['reward_pair_tokens']:.0f} packed tokens on average; {c['sft_steps']} "
        f"supervised and {c['dpo_warmup_steps']} DPO warm-up steps, {c['ppo_steps']} PPO steps; prompts of {c['mean_prompt_tokens']:.0f} tokens, "
        f"{c['prompts_met']} of them met; completions of {c['mean_completion_tokens']:.1f} tokens on average.",
        f"The other stages, as logged: {others}.",
        f"Load average start {r['load_average_start']}, end {r['load_average_end']}.",
    ])


if __name__ == "__main__":
    main()
