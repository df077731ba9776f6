"""What kept prompts save: the reference pass and the reward model's scoring of the local run's PPO steps,
each step's rollouts passed through both with their prompts kept (rlhf/rl/prefix_cache.py) and through
full passes, in one process.

    .venv/bin/python bench/prefix_cache.py [--steps 10]

Each step takes 16 of the bundled sample's 40 prompts in the local run's seeded order (`batch_indices`) and
samples their completions once (the policy with a fresh adapter, up to `--new-tokens`, stopping at EOS as the
run does); both ways then get the same rollouts, in passes of 8 (the local run's micro-batch), alternating
which goes first. The kept way fills its caches on the steps that meet a prompt for the first time, and those
steps are counted in its time. The reward model is the default model's backbone with a seeded head (its scores
do not matter here); both ways' reference log-probs and scores are compared, to show they agree.
"""

from __future__ import annotations

import argparse
import time

from common import SCRATCH, bundled_prompts, load_average, machine, model_dir, our_versions, summary, write_results
from ppo import make_reward_model

NAME = "prefix_cache"
WAYS = ("full", "kept")
PASS = 8  # rollouts a pass: the local run's micro-batch
BATCH = 16  # prompts a step: the local run's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="PPO steps' rollouts to pass through both ways")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_placement, stop_token_ids
    from rlhf.rl.policy import Policy
    from rlhf.rl.rewards import RewardModelReward
    from rlhf.training.batching import batch_indices

    load_at_start = load_average()
    base = model_dir()
    settings = {"prompt_length": 512, "new_tokens": args.new_tokens, "seed": 0}
    reward_dir = SCRATCH / "prefix-cache-reward-model"
    make_reward_model(base, settings, reward_dir)
    placement = pick_placement("cpu")
    tokenizer = load_tokenizer(base)
    rows, prompts = bundled_prompts(tokenizer, args.new_tokens)
    torch.manual_seed(0)
    model = load_causal_lm(base, placement)
    full = Policy.create(model, 8, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    kept = Policy(full.model, None, full.stop_ids, tokenizer.pad_token_id)  # the same weights, prompts kept
    assert kept.keep_reference_prompts(prompts, args.steps * BATCH, 512 + args.new_tokens)
    policies = {"full": full, "kept": kept}
    rewards = {way: RewardModelReward(reward_dir, placement, base) for way in WAYS}
    assert rewards["kept"].keep_prompts(rows, args.steps * BATCH)

    seconds = {way: {"reference": [], "scoring": []} for way in WAYS}
    largest_difference = {"reference": 0.0, "scoring": 0.0}
    prompt_tokens = completion_tokens = 0
    for step in range(args.steps):
        chosen = batch_indices(step, BATCH, len(rows), 0)
        torch.manual_seed(step)
        rollouts = [policies["full"].roll_out([prompts[i] for i in chosen[first:first + PASS]], args.new_tokens,
                                              1.0, 1.0)[0] for first in range(0, BATCH, PASS)]
        prompt_tokens += sum(len(prompts[i]) for i in chosen)
        completion_tokens += sum(int(r.completion_mask.sum()) for r in rollouts)
        outputs = {}
        for way in (WAYS if step % 2 == 0 else WAYS[::-1]):
            log_probs, scores = [], []
            started = time.perf_counter()
            with torch.no_grad():
                for rollout in rollouts:
                    log_probs.append(policies[way].evaluate(rollout, 1.0, with_values=False, reference=True)[0]
                                     * rollout.completion_mask)
            referenced = time.perf_counter()
            for first, rollout in zip(range(0, BATCH, PASS), rollouts):
                scores.append(rewards[way]([rows[i] for i in chosen[first:first + PASS]], rollout.completions()))
            scored = time.perf_counter()
            seconds[way]["reference"].append(referenced - started)
            seconds[way]["scoring"].append(scored - referenced)
            outputs[way] = log_probs, scores
        largest_difference["reference"] = max(largest_difference["reference"], *(
            float((a - b).abs().max()) for a, b in zip(outputs["full"][0], outputs["kept"][0])))
        largest_difference["scoring"] = max(largest_difference["scoring"], *(
            float((a - b).abs().max()) for a, b in zip(outputs["full"][1], outputs["kept"][1])))
        print(f"step {step + 1}/{args.steps}: " + ", ".join(
            f"{way} {seconds[way]['reference'][-1]:.2f} + {seconds[way]['scoring'][-1]:.2f} s" for way in WAYS),
            flush=True)
    result = {"benchmark": NAME, "steps": args.steps, "prompts_per_step": BATCH, "prompts": len(rows),
              "new_tokens": args.new_tokens, "mean_prompt_tokens": prompt_tokens / (args.steps * BATCH),
              "mean_completion_tokens": completion_tokens / (args.steps * BATCH),
              "seconds": seconds,
              "summary": {way: {phase: summary(v) for phase, v in by.items()} for way, by in seconds.items()},
              "kept_prompts": {"reference": len(policies["kept"].reference_prefixes.entries),
                               "reward_model": len(rewards["kept"].prefixes.entries),
                               "bytes": policies["kept"].reference_prefixes.used_bytes
                               + rewards["kept"].prefixes.used_bytes},
              "largest_difference": largest_difference,
              "versions": our_versions(), "machine": machine(),
              "load_average_start": load_at_start, "load_average_end": load_average()}
    write_results(NAME, result, markdown(result))


def markdown(r: dict) -> str:
    s = r["seconds"]
    total = {way: {phase: sum(v) for phase, v in by.items()} for way, by in s.items()}
    lines = ["### Kept prompts in the reference pass and the reward model's scoring (ours)", "",
             f"{r['steps']} PPO steps of {r['prompts_per_step']} of the bundled sample's {r['prompts']} prompts "
             f"(prompts {r['mean_prompt_tokens']:.0f} tokens on average, completions "
             f"{r['mean_completion_tokens']:.0f}), each step's rollouts through both ways in passes of {PASS}; "
             "seconds summed over the steps, the kept way's cache fills included.", "",
             "| pass | full passes (s) | kept prompts (s) | ratio | steps after the third: full / kept (s a step, median) |",
             "|---|---|---|---|---|"]
    for phase in ("reference", "scoring"):
        full, kept = total["full"][phase], total["kept"][phase]
        later = [summary(s[way][phase][3:])["median"] if len(s[way][phase]) > 3 else float("nan") for way in WAYS]
        lines.append(f"| {phase} | {full:.1f} | {kept:.1f} | {full / kept:.2f}x | {later[0]:.2f} / {later[1]:.2f} |")
    lines += ["", f"Kept at the end: {r['kept_prompts']['reference']} prompts for the reference, "
              f"{r['kept_prompts']['reward_model']} for the reward model, "
              f"{r['kept_prompts']['bytes'] / 2**20:.0f} MiB in all. Largest difference between the two ways: "
              f"{r['largest_difference']['reference']:.1e} in a reference log-prob, "
              f"{r['largest_difference']['scoring']:.1e} in a normalised score.", "",
              f"Load average start {r['load_average_start']}, end {r['load_average_end']}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
