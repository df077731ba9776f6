"""What the warm-up alone leaves behind, seed by seed: the policy PPO starts from, judged on the eval posts
before any PPO step.

    python experiments/warmup_probe.py --output-dir D [--seeds 0 1 2] [--set NAME=VALUE ...] [--samples 4]
        [--temperatures 1.0 0.7] [--runs RUN_0 RUN_1 RUN_2]

For each seed, the local run's settings (`rlhf run`'s defaults, `--set` applied; the seed also picks the
held-out split, as in a run) and the policy stage's own set-up: the same LoRA, optimizer and learning-rate
schedule (`rlhf.rl.ppo.optimizer_and_schedule`), then the warm-up on the training pairs and nothing else:
`sft_steps` supervised steps on their winners or `dpo_warmup_steps` DPO steps on them, as the stage runs it.
The warmed-up policy is judged on the eval posts twice: greedily (one completion per post, as bulk inference
writes the tuned side) and sampled at the rollout temperature or at each of `--temperatures` (`--samples` per
post, what PPO's first steps see), each by the rule judge, with the share of word 5-grams copied from the post
and, for the samples, the KL to the base in nats per completion at that temperature (the evaluation's
estimator). No reward model: this asks what the warm-up puts among PPO's samples (`--samples 0`: no samples).

`--runs` gives each seed's finished `rlhf run` (the same settings, in the order of `--seeds`): the warmed-up
policy is then also saved as the policy stage saves its own and judged as that run's tuned policy was, by
`rlhf infer` and `rlhf evaluate` with the run's reward model against its base completions (win rate, rule pass
rates, KL to base, repeated 4-grams): what the warm-up alone gives by the run's own verdict. Writes
`warmup.json` and `warmup.md` in D.
"""

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from tuning_methods import judge_against_run

from rlhf.data.config import DataConfig
from rlhf.data.datasets import prepare_datasets
from rlhf.data.validation import user_input
from rlhf.evaluation.compare import sampled_log_ratios
from rlhf.evaluation.rule_judge import copied_ngram_share, rule_for_instruction
from rlhf.models.loading import load_causal_lm, stop_token_ids
from rlhf.pipeline.local_run import DATASET_PARAMETERS, LOCAL_DEFAULTS, RUN_RECORD, input_digests
from rlhf.pipeline.parameters import pipeline_defaults, resolve_parameters, stage_configs
from rlhf.reward.training import encode_pairs
from rlhf.rl.config import PPOConfig
from rlhf.rl.dpo import ReferenceLogProbs, dpo_step
from rlhf.rl.policy import Policy, PolicySpec, save_policy
from rlhf.rl.ppo import optimizer_and_schedule
from rlhf.rl.sft import sft_step
from rlhf.training.distributed import ALONE
from rlhf.training.stage import start_stage

GREEDY_BATCH = 8  # eval posts decoded together


def settings_for(seed: int, assignments: list[str]) -> tuple[dict, DataConfig, PPOConfig]:
    """The local run's parameters for `seed`, and the data and policy stages' configs they give."""
    parameters = resolve_parameters(None, [f"seed={seed}", *assignments], LOCAL_DEFAULTS)
    defaults = pipeline_defaults()
    configs = {type(config): config for config, _ in stage_configs(lambda n: parameters.get(n, defaults.get(n)))}
    return parameters, configs[DataConfig], configs[PPOConfig]


def differences_from_run(run: Path, parameters: dict) -> list[str]:
    """The settings and datasets (by content: a run's copy of the sample lives in its own checkout) in which the
    finished run `run` differs from the probe's `parameters`; the warm-up is only that run's when there are none."""
    record = json.loads((run / RUN_RECORD).read_text())
    given, defaults = record["parameters"], pipeline_defaults()  # a setting not given is the pipeline's default
    names = (set(given) | set(parameters)) - set(DATASET_PARAMETERS)
    differ = [name for name in names if given.get(name, defaults.get(name)) != parameters.get(name, defaults.get(name))]
    digests = input_digests(parameters)
    differ += [name for name in DATASET_PARAMETERS if record["inputs"].get(name) != digests.get(name)]
    return sorted(differ)


def warmed_up_policy(config: PPOConfig, parameters: dict, train_pairs: list[dict]):
    """The policy after the warm-up's steps (supervised or DPO), set up as `rlhf.rl.ppo.train_policy` sets it up,
    and each step's loss."""
    _, placement, base_path, tokenizer, encoder = start_stage(config, parameters["large_model_reference"], None)
    pairs = encode_pairs(train_pairs, encoder)
    torch.manual_seed(config.seed)
    model = load_causal_lm(base_path, placement)
    policy = Policy.create(model, config.lora_dim, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    policy.model.train()
    optimizer, scheduler = optimizer_and_schedule(policy, config)
    reference = ReferenceLogProbs(policy, tokenizer.pad_token_id) if config.dpo_warmup_steps else None
    losses = []
    with tempfile.TemporaryDirectory() as scratch:
        for step in range(config.warmup_steps()):
            if config.sft_steps:
                loss = sft_step(policy, pairs, step, config, optimizer, scheduler, Path(scratch), ALONE)["sft_loss"]
            else:
                loss = dpo_step(policy, pairs, step, config, optimizer, scheduler, reference, Path(scratch),
                                ALONE)["dpo_loss"]
            losses.append(loss)
            print(f"  warm-up step {step + 1}/{config.warmup_steps()}: loss {loss:.3f}", flush=True)
    policy.model.eval()
    return policy, tokenizer, encoder, losses


def judged(rule, posts: list[str], texts: list[str], ended: list[bool]) -> dict:
    """Rule pass share, each check's pass share, copied 5-gram share, words and ended share of completions."""
    verdicts = [rule.judge(post, text, stopped=stop) for post, text, stop in zip(posts, texts, ended)]
    checks = verdicts[0].checks if verdicts else {}
    count = len(texts)
    return {"count": count, "rule_pass": sum(v.passed for v in verdicts) / count,
            **{name: sum(v.checks[name] for v in verdicts) / count for name in checks},
            "copied_5grams": sum(copied_ngram_share(t, p) for t, p in zip(texts, posts)) / count,
            "words": sum(len(t.split()) for t in texts) / count, "ended_share": sum(ended) / count}


@torch.no_grad()
def probe(seed: int, assignments: list[str], samples: int, temperatures: list[float], run: Path | None,
          output: Path) -> dict:
    parameters, data_config, config = settings_for(seed, assignments)
    if run is not None and (differ := differences_from_run(run, parameters)):
        raise SystemExit(f"--runs {run}: that run's {', '.join(differ)} differ from seed {seed}'s settings here; "
                         "its warm-up would not be this one")
    rule = rule_for_instruction(config.instruction)
    if rule is None:
        raise SystemExit(f"instruction {config.instruction!r} defines no rule to judge the warm-up by; give one "
                         "with a word limit, such as 'Summarize in less than 50 words.'")
    data = prepare_datasets(parameters["preference_dataset"], parameters["prompt_dataset"] or None,
                            parameters["eval_dataset"] or None, data_config)
    with torch.enable_grad():
        policy, tokenizer, encoder, losses = warmed_up_policy(config, parameters, data.train_pairs)
    posts = [user_input(row) for row in data.eval_prompts]
    prompts = [encoder.encode_prompt(row) for row in data.eval_prompts]
    length = config.target_sequence_length

    texts, ended = [], []
    for first in range(0, len(prompts), GREEDY_BATCH):
        rollout = policy.generate(prompts[first:first + GREEDY_BATCH], length, 1.0, 1.0, greedy=True)
        texts += tokenizer.batch_decode(rollout.completions(), skip_special_tokens=True)
        ended += rollout.ended.tolist()
    greedy = judged(rule, posts, texts, ended)
    greedy["examples"] = texts[:4]

    spec = PolicySpec.of(config, parameters["large_model_reference"])
    sampled = {str(t): sampled_judged(policy, tokenizer, rule, posts, prompts, replace(spec, temperature=t), seed,
                                      samples) for t in temperatures or [config.temperature]} if samples else {}
    verdict = None
    if run is not None:
        save_policy(policy, spec, output / "policy", tokenizer, merged=False)
        verdict = judge_against_run(run, output / "policy", output, seed, output / "log.txt")
    return {"seed": seed, "sft_steps": config.sft_steps, "dpo_warmup_steps": config.dpo_warmup_steps,
            "warmup_losses": losses, "greedy": greedy, "sampled": sampled, "run": str(run) if run else None,
            "evaluation": verdict}


def sampled_judged(policy, tokenizer, rule, posts: list[str], prompts: list[list[int]], spec: PolicySpec, seed: int,
                   samples: int) -> dict:
    """`judged` on `samples` completions per post sampled at the spec's temperature, with their KL to base."""
    torch.manual_seed(seed)
    drawn = [index for index in range(len(prompts)) for _ in range(samples)]
    texts, ended, kl = [], [], []
    for ratios, rollout in sampled_log_ratios(policy, [prompts[i] for i in drawn], spec):
        kl += ratios.sum(dim=1).tolist()
        texts += tokenizer.batch_decode(rollout.completions(), skip_special_tokens=True)
        ended += rollout.ended.tolist()
    result = judged(rule, [posts[i] for i in drawn], texts, ended)
    kl_tensor = torch.tensor(kl, dtype=torch.float64)
    return {**result, "kl_to_base": float(kl_tensor.mean()),
            "kl_standard_error": float(kl_tensor.std() / len(kl) ** 0.5)}


def table(results: list[dict], sets: list[str]) -> str:
    """The probe's results as markdown: one row per seed and sampling temperature (one per seed when nothing
    was sampled), then, for the seeds judged against their runs, the run's verdict on the warmed-up policy."""
    lines = [f"Settings changed: {', '.join(sets) or 'none'}", "",
             "| seed | last warm-up loss | greedy: rule pass | greedy: own words | greedy: no advice | greedy: copied "
             "5-grams | greedy: words / ended | sampled at | sampled: rule pass | sampled: own words | sampled: copied "
             "5-grams | sampled: ended | sampled: KL to base (se) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        g = r["greedy"]
        greedy = (f"| {r['seed']} | {r['warmup_losses'][-1] if r['warmup_losses'] else float('nan'):.3f} | "
                  f"{g['rule_pass']:.0%} | {g['own_words']:.0%} | {g['no_advice']:.0%} | "
                  f"{g['copied_5grams']:.0%} | {g['words']:.0f} / {g['ended_share']:.0%} |")
        for temperature, s in r["sampled"].items():
            lines.append(f"{greedy} {temperature} | {s['rule_pass']:.0%} | {s['own_words']:.0%} | "
                         f"{s['copied_5grams']:.0%} | {s['ended_share']:.0%} | "
                         f"{s['kl_to_base']:.2f} ({s['kl_standard_error']:.2f}) |")
        if not r["sampled"]:
            lines.append(f"{greedy} - | - | - | - | - | - |")
    judged_runs = [r for r in results if r.get("evaluation")]
    if judged_runs:
        lines += ["", "| seed | warmed-up policy wins (the run's RM) | rule pass base → warmed up | KL to base (se) | "
                  "words base / warmed up | ended base / warmed up | repeated 4-grams base / warmed up |",
                  "|---|---|---|---|---|---|---|"]
        for r in judged_runs:
            e = r["evaluation"]
            lines.append(f"| {r['seed']} | {e['win_rate_vs_base']:.0%} | {e['rule_pass_rate_base']:.0%} → "
                         f"{e['rule_pass_rate_tuned']:.0%} | {e['kl_to_base']:.2f} ({e['kl_to_base_sampling']['standard_error']:.2f})"
                         f" | {e['base_mean_words']:.0f} / {e['tuned_mean_words']:.0f} | {e['base_ended_share']:.0%} / "
                         f"{e['tuned_ended_share']:.0%} | {e['base_repeated_ngram_share']:.1%} / "
                         f"{e['tuned_repeated_ngram_share']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a pipeline parameter for every seed (repeatable), as `rlhf run --set`")
    parser.add_argument("--samples", type=int, default=4,
                        help="completions sampled per eval post (default 4; 0: none)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[],
                        help="sample at each of these temperatures (default: the run's rollout temperature)")
    parser.add_argument("--runs", type=Path, nargs="+", default=[],
                        help="each seed's finished `rlhf run` directory, in the order of --seeds: judge the warmed-up "
                             "policy as that run's tuned policy was judged")
    args = parser.parse_args()
    if args.runs and len(args.runs) != len(args.seeds):
        raise SystemExit(f"--runs names {len(args.runs)} runs for {len(args.seeds)} seeds; give one per seed")
    for run in args.runs:
        if not (run / "run.json").is_file():
            raise SystemExit(f"--runs {run}: not a finished `rlhf run` output directory (no run.json)")
    args.output_dir.mkdir(parents=True, exist_ok=True)

    results = []
    for index, seed in enumerate(args.seeds):
        print(f"seed {seed}", flush=True)
        results.append(probe(seed, args.set, args.samples, args.temperatures,
                             args.runs[index] if args.runs else None, args.output_dir / f"seed-{seed}"))
        (args.output_dir / "warmup.json").write_text(json.dumps({"set": args.set, "results": results}, indent=1))
    (args.output_dir / "warmup.md").write_text(table(results, args.set))
    print(table(results, args.set))


if __name__ == "__main__":
    main()
