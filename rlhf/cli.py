"""The `rlhf` command: one subcommand per job, each a thin layer over a core function."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import traceback
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from rlhf.errors import RunFailure, UserError
from rlhf.pipeline.compiler import COMPILED
from rlhf.settings import PLAIN_TEXT, PromptSettings, cpu_precision

MAX_PROBLEM_LINES = 200


def _problem_lines(problems) -> str:
    """One `FILE:LINE: ...` line per problem, at most MAX_PROBLEM_LINES of them."""
    lines = [str(p) for p in problems[:MAX_PROBLEM_LINES]]
    if len(problems) > MAX_PROBLEM_LINES:
        lines.append(f"... and {len(problems) - MAX_PROBLEM_LINES} more problems")
    return "\n".join(lines)


class UsageError(UserError):
    """Bad input from the user: printed as one clear message, never as a traceback."""


# Arguments read or written as local files (a gs:// URI there would silently become a local folder "gs:").
LOCAL_PATH_ARGUMENTS = {"output_dir": "--output-dir", "reward_model": "--reward-model", "policy": "--policy",
                        "adapter": "--adapter", "params": "--params", "template": "--template"}
LOCAL_OUTPUT_COMMANDS = ("compile", "infer")
def _require_local_paths(args) -> None:
    names = dict(LOCAL_PATH_ARGUMENTS)
    if args.command in LOCAL_OUTPUT_COMMANDS:
        names["output"] = "--output"
    for attribute, flag in names.items():
        value = getattr(args, attribute, None)
        if isinstance(value, str) and value.startswith("gs://"):
            raise UsageError(f"{flag} {value}: a local path is required here, not a gs:// URI "
                             "(copy it with `gcloud storage cp -r`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def cmd_steps(args) -> int:
    """Print ceil(rows / batch_size) * epochs."""
    from rlhf.training.steps import steps_from_epochs

    print(steps_from_epochs(args.rows, args.epochs, args.batch_size))
    return 0


def cmd_validate(args) -> int:
    """Validate preference, prompt and eval datasets (local paths, gs:// URIs, globs). Exits 0 and prints a JSON
    summary, or exits 1 with one 'FILE:LINE: problem' line per problem (line 0: the whole file). With no
    dataset, checks the bundled sample."""
    from rlhf.data.config import DataConfig
    from rlhf.data.datasets import DatasetError, prepare_datasets, sample_dataset, write_prepared

    preference = args.preference_dataset
    prompt, eval_set = args.prompt_dataset, args.eval_dataset
    if preference is None:
        if prompt or eval_set:
            raise UsageError("--preference-dataset is required when other datasets are given")
        preference, prompt, eval_set = (sample_dataset(n) for n in ("preference.jsonl", "prompts.jsonl", "eval.jsonl"))
        print(f"No dataset given: validating the bundled sample in {Path(preference).parent}", file=sys.stderr)
    if args.output_dir:
        _refuse_to_overwrite("--output-dir", args.output_dir, [preference, prompt, eval_set])
    settings = _stage_config(DataConfig, args)
    try:
        data = prepare_datasets(preference, prompt, eval_set, settings)
    except DatasetError as error:
        print(_problem_lines(error.problems), file=sys.stderr)
        print(f"{len(error.problems)} problem(s) found; nothing was written. "
              "Fix them, or pass --on-invalid skip to drop bad rows.", file=sys.stderr)
        return 1
    if args.output_dir:
        write_prepared(data, Path(args.output_dir))
        print(f"Wrote the validated datasets and summary.json to {args.output_dir}", file=sys.stderr)
    print(json.dumps(data.summary, indent=2))
    return 0


def _refuse_to_overwrite(flag: str, target: str, inputs: list[str | None] = (), resumable: tuple[str, ...] = ()):
    """The one check before a command writes: nothing the user has is overwritten. A file (`--output`,
    `--export`) must not exist yet; a directory (`--output-dir`) must be new or empty, or hold an earlier run
    of the same command to resume (`resumable` names the files that mark one; whether its settings match is
    the trainer's or the run's to check), and must not hold an input."""
    if flag != "--output-dir":
        if _uri_exists(target):
            raise UsageError(f"{flag} {target} exists; choose a new file (nothing is overwritten)")
        return
    out = Path(target).resolve()
    for uri in inputs:
        if uri and not uri.startswith("gs://") and out in Path(uri).resolve().parents:
            raise UsageError(f"{flag} {target} contains the input {uri}; choose another directory")
    earlier_run = any((out / marker).exists() for marker in resumable)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not earlier_run:
        held = " and holds no earlier run to resume" if resumable else ""
        raise UsageError(f"{flag} {target} is not empty{held}; choose a new directory")


def cmd_prepare_model(args) -> int:
    """Resolve large_model_reference and print the directory or hub id it loads from. The default model is
    converted once from its GGUF file into safetensors."""
    from rlhf.models.reference import resolve_model_reference

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cache = Path(args.cache_dir) if args.cache_dir else None
    print(resolve_model_reference(args.large_model_reference, cache, progress))
    return 0


def cmd_compile(args) -> int:
    """Compile rlhf_pipeline, or with --pipeline infer the bulk-inference pipeline, to YAML (what `python
    compile.py` does for both)."""
    from rlhf.pipeline.compiler import compile_pipeline

    output = Path(args.output or COMPILED[args.pipeline].name)
    print(f"Wrote {compile_pipeline(output, args.pipeline)}")
    return 0


def _vertex_settings(args):
    from rlhf.pipeline.vertex import VertexSettings

    labels = {}
    for label in args.label or []:
        key, separator, value = label.partition("=")
        if not separator:
            raise UsageError(f"--label {label!r}: expected key=value")
        labels[key] = value
    return VertexSettings(
        project=args.project or "", location=args.location, pipeline_root=args.pipeline_root or "",
        display_name=args.display_name or f"{args.pipeline}-pipeline", job_id=getattr(args, "job_id", None) or "",
        service_account=args.service_account or "", network=args.network or "", labels=labels,
        enable_caching=False if args.no_caching else None,
        encryption_spec_key_name=args.encryption_spec_key_name or "", image=args.image or "",
        api_endpoint=args.api_endpoint or "")


def _vertex_job(args, schedule=None):
    """The settings and the job's request body and id, or a UsageError listing every problem."""
    from rlhf.data.storage import bucket_exists
    from rlhf.pipeline.parameters import ParameterError, machine_lines, resolve_parameters
    from rlhf.pipeline.vertex import build_job, check_settings

    settings = _vertex_settings(args)
    problems = check_settings(settings, schedule)
    try:
        parameters = resolve_parameters(Path(args.params) if args.params else None, args.set or [], {}, "vertex",
                                        args.pipeline)
    except ParameterError as error:
        problems += error.problems
        parameters = {}
    if problems:
        raise UsageError("cannot submit:\n" + "\n".join(f"  {p}" for p in problems))
    for line in machine_lines(parameters, args.pipeline):
        print(f"memory estimate: {line}", file=sys.stderr)
    # The job's own project, region and key also serve the upload stage unless given as parameters.
    parameters.setdefault("project", settings.project)
    parameters.setdefault("location", settings.location)
    if settings.encryption_spec_key_name:
        parameters.setdefault("encryption_spec_key_name", settings.encryption_spec_key_name)
    if settings.image and args.pipeline == "rlhf":
        parameters.setdefault("serving_container_image", settings.image)
    if not args.dry_run and not bucket_exists(settings.pipeline_root):
        raise UsageError(f"--pipeline-root {settings.pipeline_root}: the bucket does not exist (or these credentials "
                         "cannot see it); create it in the job's region first")
    template = Path(args.template) if args.template else COMPILED[args.pipeline]
    if not template.is_file():
        raise UsageError(f"--template {template}: no such file; run `rlhf compile` first")
    return (settings, *build_job(template, parameters, settings))


def cmd_submit(args) -> int:
    """Submit the compiled pipeline to Vertex AI Pipelines."""
    from rlhf.pipeline.vertex import as_json, submit

    settings, body, job_id = _vertex_job(args)
    if args.dry_run:
        print(json.dumps(as_json(body), indent=2, sort_keys=True))
        return 0
    name = submit(body, job_id, settings)
    print(f"Submitted {name}", file=sys.stderr)
    print(name)
    return 0


def cmd_schedule(args) -> int:
    """Schedule the compiled pipeline on Vertex AI Pipelines (cron)."""
    from rlhf.pipeline.vertex import ScheduleSettings, as_json, create_schedule, schedule_body

    schedule = ScheduleSettings(cron=args.cron, display_name=args.schedule_name, start_time=args.start_time or "",
                                end_time=args.end_time or "", max_concurrent_run_count=args.max_concurrent_runs,
                                max_run_count=args.max_runs, allow_queueing=args.allow_queueing)
    settings, job_body, _ = _vertex_job(args, schedule)
    body = schedule_body(job_body, settings, schedule)
    if args.dry_run:
        print(json.dumps(as_json(body), indent=2, sort_keys=True))
        return 0
    name = create_schedule(body, settings)
    print(f"Created schedule {name}", file=sys.stderr)
    print(name)
    return 0


def cmd_serve(args) -> int:
    """Answer Vertex AI prediction requests {"instances": [...], "parameters": {...}} with completions of the
    tuned policy. Port and routes follow AIP_HTTP_PORT, AIP_HEALTH_ROUTE and AIP_PREDICT_ROUTE when set."""
    from rlhf.serving import create_app, load_predictor, vertex_routes

    port, health_route, predict_route = vertex_routes()
    policy = args.policy or os.environ.get("AIP_STORAGE_URI")
    if not policy:
        raise UsageError("give --policy DIR|gs://URI (on Vertex AI, AIP_STORAGE_URI names it)")
    host = args.host or ("0.0.0.0" if os.environ.get("AIP_HTTP_PORT") else "127.0.0.1")
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"Loading the policy from {policy}")
    generator = load_predictor(policy, device=args.device)
    port = args.port or port
    say(f"Serving on http://{host}:{port}: GET {health_route}, POST {predict_route}")
    from waitress import serve

    serve(create_app(generator, health_route, predict_route), host=host, port=port, threads=1)
    return 0


def _add_processes(parser) -> None:
    parser.add_argument("--nproc-per-node", type=_positive_int, default=1, metavar="N",
                        help="processes on this machine, one per GPU, each taking its share of every batch "
                             "(default 1)")


def _in_processes(args) -> int | None:
    """With `--nproc-per-node` above 1, or on one of several Vertex AI replicas, the command again in that many
    processes per machine (after its checks, which run once, here); None in a process that is one of them, or
    alone."""
    from rlhf.training.distributed import Machines, launch

    if "LOCAL_RANK" in os.environ or (args.nproc_per_node == 1 and Machines.from_environment().count == 1):
        return None
    return launch(args.nproc_per_node, args.argv)


def _stop_flag():
    from rlhf.training.stopping import StopFlag

    return StopFlag().install()


def _prepare_or_exit(args):
    from rlhf.data.config import DataConfig
    from rlhf.data.datasets import DatasetError, prepare_datasets

    data = _stage_config(DataConfig, args)
    try:
        return prepare_datasets(args.preference_dataset, None, args.eval_dataset, data)
    except DatasetError as error:
        raise UsageError("the datasets have problems:\n" + _problem_lines(error.problems)) from None


def cmd_train_reward_model(args) -> int:
    """Train {prompt, completion} -> score on preference pairs with -log sigmoid(r_winner - r_loser). Running
    the same command again resumes from the last checkpoint. The settings' flags are the pipeline's parameters
    of the same names."""
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.reward.training import train_reward_model
    from rlhf.training.loop import CHECKPOINT_DIR, METRICS_FILE
    from rlhf.training.steps import resolve_steps

    _refuse_to_overwrite("--output-dir", args.output_dir, resumable=(CHECKPOINT_DIR, METRICS_FILE))
    output_dir = Path(args.output_dir)
    data = _prepare_or_exit(args)
    steps = resolve_steps(len(data.train_pairs), args.reward_model_train_steps, args.reward_model_train_epochs,
                          args.batch_size, "reward model")
    config = _stage_config(RewardTrainingConfig, args, train_steps=steps)
    print(f"Training the reward model: {len(data.train_pairs)} pairs, {steps} steps of {args.batch_size}, "
          f"{len(data.held_out_pairs)} held-out pairs", file=sys.stderr)
    launched = _in_processes(args)
    if launched is not None:
        return launched
    metrics = train_reward_model(config, data.train_pairs, data.held_out_pairs, args.large_model_reference,
                                 output_dir, stop_requested=_stop_flag())
    print(json.dumps(metrics, indent=2))
    if metrics.get("interrupted"):
        return 75
    print(f"Reward model saved in {output_dir}", file=sys.stderr)
    return 0


def cmd_evaluate_reward_model(args) -> int:
    """Print JSON: accuracy, pairs, mean margin, and on the same pairs how often 'the longer candidate wins'
    agrees with the labels, so one sees whether the model learned more than length."""
    from rlhf.reward.evaluation import evaluate_reward_model

    rows = _read_rows_or_exit(args.preference_dataset, "preference", args.on_invalid)
    print(json.dumps(evaluate_reward_model(Path(args.reward_model), rows, args.device), indent=2))
    return 0


def cmd_train_policy(args) -> int:
    """A LoRA adapter over the base model. PPO, RLOO, GRPO: rollouts on the prompt dataset, rewards from the
    reward model, a kl_coeff * KL(policy || base) penalty. DPO (--tuning-method dpo): the preference pairs
    directly, no reward model. Running the same command again resumes from the last checkpoint. The settings'
    flags are the pipeline's parameters of the same names."""
    from rlhf.rl.config import PPOConfig
    from rlhf.training.loop import CHECKPOINT_DIR, METRICS_FILE
    from rlhf.training.steps import resolve_steps

    _refuse_to_overwrite("--output-dir", args.output_dir, resumable=(CHECKPOINT_DIR, METRICS_FILE))
    output_dir = Path(args.output_dir)
    if args.tuning_method == "dpo":
        if not args.preference_dataset:
            raise UsageError("--tuning-method dpo trains on preference pairs: give --preference-dataset")
        from rlhf.models.reference import DEFAULT_MODEL

        data = _prepare_or_exit(args)
        reference = args.large_model_reference or DEFAULT_MODEL
        steps = resolve_steps(len(data.train_pairs), args.reinforcement_learning_train_steps,
                              args.reinforcement_learning_train_epochs, args.batch_size, "dpo")
        config = _stage_config(PPOConfig, args, train_steps=steps, instruction=args.instruction or "")
        print(f"Tuning the policy with DPO: {len(data.train_pairs)} pairs, {steps} steps of {args.batch_size}, "
              f"{len(data.held_out_pairs)} held-out pairs", file=sys.stderr)
    else:
        if not (args.prompt_dataset and args.reward_model):
            raise UsageError(f"--tuning-method {args.tuning_method} samples prompts and scores them: give "
                             "--prompt-dataset and --reward-model")
        if (args.sft_steps or args.dpo_warmup_steps) and not args.preference_dataset:
            raise UsageError("the warm-up (--sft-steps, --dpo-warmup-steps) learns the training pairs: give "
                             "--preference-dataset")
        from rlhf.reward.model import read_spec

        prompts = _read_rows_or_exit(args.prompt_dataset, "prompt", args.on_invalid)
        reward_spec = read_spec(Path(args.reward_model))
        reference = args.large_model_reference or reward_spec.large_model_reference
        if reference != reward_spec.large_model_reference:
            raise UsageError(f"the reward model was trained on {reward_spec.large_model_reference!r}; the policy must "
                             f"use the same base model (its tokenizer), not {reference!r}")
        steps = resolve_steps(len(prompts), args.reinforcement_learning_train_steps,
                              args.reinforcement_learning_train_epochs, args.batch_size, "reinforcement learning")
        instruction = reward_spec.instruction if args.instruction is None else args.instruction
        config = _stage_config(PPOConfig, args, train_steps=steps, instruction=instruction)
        warmup_pairs = _prepare_or_exit(args).train_pairs if config.warmup_steps() else []
        warmup = (f" after {config.sft_steps} supervised steps on {len(warmup_pairs)} winners" if config.sft_steps
                  else f" after {config.dpo_warmup_steps} DPO steps on {len(warmup_pairs)} pairs" if warmup_pairs
                  else "")
        print(f"Tuning the policy: {len(prompts)} prompts, {steps} steps of {args.batch_size}{warmup}",
              file=sys.stderr)
    launched = _in_processes(args)
    if launched is not None:
        return launched
    if args.tuning_method == "dpo":
        from rlhf.rl.dpo import train_dpo

        metrics = train_dpo(config, data.train_pairs, data.held_out_pairs, reference, output_dir,
                            stop_requested=_stop_flag())
    else:
        from rlhf.rl.ppo import train_policy
        from rlhf.rl.rewards import RewardModelReward

        reward = RewardModelReward.for_stage(Path(args.reward_model), config)
        metrics = train_policy(config, prompts, reward, reference, output_dir, stop_requested=_stop_flag(),
                               train_pairs=warmup_pairs)
    print(json.dumps(metrics, indent=2))
    if metrics.get("interrupted"):
        return 75
    print(f"Policy adapter saved in {output_dir / 'adapter'}", file=sys.stderr)
    return 0


def _read_rows_or_exit(uri: str, kind: str, on_invalid: str) -> list[dict]:
    from rlhf.data.validation import read_dataset

    dataset = read_dataset(uri, kind, on_invalid)
    if dataset.problems:
        raise UsageError("the dataset has problems:\n" + _problem_lines(dataset.problems))
    return dataset.rows


def cmd_infer(args) -> int:
    """Generate one completion per prompt (greedy by default, as Vertex's bulk inferrer), batched by length.
    Writes JSONL rows {input_text, prediction, inputs: {inputs_pretokenized}}."""
    from rlhf.data.datasets import write_jsonl
    from rlhf.evaluation.config import InferenceConfig
    from rlhf.evaluation.inference import bulk_infer, model_to_infer
    from rlhf.models.reference import resolve_model_reference
    from rlhf.training.distributed import join

    _refuse_to_overwrite("--output", args.output)
    output = Path(args.output)
    rows = _read_rows_or_exit(args.eval_dataset, "eval", args.on_invalid)
    if args.policy and args.adapter:
        raise UsageError("give --policy or --adapter, not both")
    # A policy names its base model and prompt format (instruction, chat template), unless the flags say otherwise.
    target = (model_to_infer("", args.policy, Path(), "--policy") if args.policy else
              model_to_infer(args.large_model_reference, args.adapter or "", Path(), "--adapter"))
    config = _stage_config(InferenceConfig, args, **target.prompt_format(args.instruction, args.plain_text))
    launched = _in_processes(args)
    if launched is not None:
        return launched
    outputs = bulk_infer(rows, resolve_model_reference(target.large_model_reference), config, target.adapter)
    if not join().main:
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(output, outputs)
    print(f"Wrote {len(outputs)} predictions to {output}", file=sys.stderr)
    return 0


def cmd_evaluate(args) -> int:
    """Score base and tuned predictions with the reward model; win rate with a bootstrap interval, KL of tuned
    to base on the tuned completions, lengths; writes metrics.json, comparison.jsonl, report.html and report.md."""
    from rlhf.data.datasets import DatasetError, read_jsonl
    from rlhf.evaluation.compare import REPORT_HTML, evaluate_run
    from rlhf.training.distributed import join

    _refuse_to_overwrite("--output-dir", args.output_dir)
    output_dir = Path(args.output_dir)
    if args.nproc_per_node > 1 and not args.shard_weights:
        raise UsageError(f"--nproc-per-node {args.nproc_per_node}: the evaluation runs in several processes only to "
                         "shard its models' weights over them; add --inference-shard-weights, or run one process")
    try:
        base, tuned = read_jsonl(Path(args.base_outputs)), read_jsonl(Path(args.tuned_outputs))
    except DatasetError as error:
        raise UsageError("the model outputs have problems:\n" + _problem_lines(error.problems)) from None
    launched = _in_processes(args)
    if launched is not None:
        return launched
    metrics = evaluate_run(base, tuned,
                           Path(args.reward_model), Path(args.policy), output_dir,
                           {"base_outputs": args.base_outputs, "tuned_outputs": args.tuned_outputs,
                            "reward_model": args.reward_model, "policy": args.policy}, args.device, args.seed,
                           args.shard_weights)
    if not join().main:
        return 0
    print(json.dumps(metrics, indent=2))
    print(f"Report: {output_dir / REPORT_HTML}", file=sys.stderr)
    return 0


def _uri_exists(uri: str) -> bool:
    from rlhf.data.storage import StorageError, is_gcs, read_bytes

    if not is_gcs(uri):
        return Path(uri).expanduser().exists()
    try:
        read_bytes(uri)
    except StorageError as error:
        if error.reason == "not found":
            return False
        raise
    return True


def cmd_generate_candidates(args) -> int:
    """Sample two completions per prompt, with different seeds and temperatures, batched by length. Writes one
    JSONL row per prompt {pair_id, input_text|messages, candidate_0, candidate_1, source, generation}; a pair
    that comes out identical or empty is sampled again, up to --max-attempts times, then its prompt is left out
    and reported."""
    from rlhf.data.storage import write_bytes
    from rlhf.labeling.candidates import generate_candidates
    from rlhf.labeling.config import CandidateConfig
    from rlhf.models.reference import resolve_model_reference

    _refuse_to_overwrite("--output", args.output)
    rows = _read_rows_or_exit(args.prompt_dataset, "prompt", args.on_invalid)
    config = _stage_config(CandidateConfig, args)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    model_path = resolve_model_reference(args.large_model_reference, progress=say)
    say(f"Generating two candidates for each of {len(rows)} prompts with {args.large_model_reference}")
    result = generate_candidates(rows, model_path, config, model_name=args.large_model_reference)
    if result.unusable:
        say(f"{len(result.unusable)} prompt(s) gave identical or empty candidates {config.max_attempts} times "
            "and were left out:\n" + _problem_lines(result.unusable))
    if not result.pairs:
        raise UsageError("no prompt gave two different, non-empty candidates; nothing was written")
    write_bytes(args.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.pairs).encode("utf-8"))
    say(f"Wrote {len(result.pairs)} pairs to {args.output} ({result.resampled} sampled again because both "
        f"candidates were the same or one was empty). Next: rlhf label --pairs {args.output} --output LABELS.jsonl")
    return 0


def _read_labels_or_exit(path: Path) -> list:
    from rlhf.labeling.labels import LabelsError, read_labels

    try:
        return read_labels(path)
    except LabelsError as error:
        raise UsageError("the labels file has problems:\n" + _problem_lines(error.problems)) from None


def cmd_label(args) -> int:
    """Serve a labelling page on 127.0.0.1: the text and two candidates side by side (in an order shuffled per
    pair), chosen by click or the keys 1 / 2, S skips. Every decision is appended to the labels file at once;
    starting again resumes at the first undecided pair. With --export or --stats, serve nothing: write the
    preference dataset and/or print progress and agreement."""
    import getpass

    from rlhf.data.pairs import PairsError, read_pairs
    from rlhf.data.storage import write_bytes
    from rlhf.labeling.app import LabelingSession, check_host, serve
    from rlhf.labeling.labels import LabelsError, LabelStore, export_preferences, summary

    try:
        pairs = read_pairs(args.pairs)
    except PairsError as error:
        raise UsageError("the pairs file has problems:\n" + _problem_lines(error.problems)) from None
    label_files = [Path(f) for f in args.output]
    if args.export or args.stats:
        missing = [str(f) for f in label_files if not f.is_file()]
        if missing:
            raise UsageError(f"no labels file {', '.join(missing)}")
        labels = [label for f in label_files for label in _read_labels_or_exit(f)]
        report = summary(pairs, labels)
        if args.export:
            _refuse_to_overwrite("--export", args.export)
            rows, report["export"] = export_preferences(pairs, labels)
            if not rows:
                raise UsageError("no pair has a choice yet; nothing was exported")
            write_bytes(args.export, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
            print(f"Wrote {len(rows)} preference rows to {args.export}", file=sys.stderr)
        print(json.dumps(report, indent=2))
        return 0

    if len(label_files) > 1:
        raise UsageError("label into one --output file (several are for --export and --stats)")
    try:
        annotator = (args.annotator or getpass.getuser()).strip()
    except (KeyError, OSError):
        raise UsageError("cannot tell who you are; give --annotator NAME") from None
    if not annotator:
        raise UsageError("--annotator must not be empty")
    check_host(args.host, args.allow_remote)
    try:
        store = LabelStore(label_files[0])
    except LabelsError as error:
        raise UsageError("the labels file has problems:\n" + _problem_lines(error.problems)) from None
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    unknown = summary(pairs, store.labels)["labels_of_unknown_pairs"]
    if unknown:
        say(f"Note: {unknown} label(s) in {store.path} are for pairs not in {args.pairs} and are left aside")
    serve(LabelingSession(pairs, store, annotator), args.host, args.port, args.allow_remote, say)
    return 0

def _add_data_settings(parser, *only: str) -> None:
    """The dataset settings (`DataConfig`), or `only` those of them the command reads."""
    from rlhf.data.config import DataConfig

    _add_settings(parser, DataConfig, only=only)


def _add_model_reference(parser, from_artifact: str | None = None) -> None:
    """--large-model-reference; with `from_artifact`, it defaults to that artifact's."""
    from rlhf.models.reference import DEFAULT_MODEL

    default = f"the {from_artifact}'s" if from_artifact else DEFAULT_MODEL
    parser.add_argument("--large-model-reference", default=None if from_artifact else DEFAULT_MODEL, metavar="REF",
                        help=f"the base model (default {default}); see `rlhf prepare-model --help`")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_device(parser) -> None:
    """`--device` of the commands whose stage has no settings dataclass (the others take it from theirs): the
    field every stage's settings share."""
    parser.add_argument("--device", default=PromptSettings.device, help=PromptSettings.field_docs()["device"])


def _add_plain_text(parser) -> None:
    """--plain-text, the pipeline's `plain_text`: how every command sets `use_chat_template`."""
    parser.add_argument(_flag(PLAIN_TEXT), action="store_true", help="do not use the tokenizer's chat template")


def _add_steps_or_epochs(parser, prefix: str, rows: str) -> None:
    """The stage's steps, or its epochs (which the pipeline turns into steps): as the pipeline's two parameters."""
    parser.add_argument(_flag(f"{prefix}_train_steps"), type=_positive_int, metavar="N", help="optimizer steps")
    parser.add_argument(_flag(f"{prefix}_train_epochs"), type=_positive_int, metavar="E",
                        help=f"epochs instead of steps: ceil({rows} / batch) * E")


def _add_settings(parser, settings, from_artifact: Mapping[str, str] = MappingProxyType({}),
                  only: tuple[str, ...] = ()) -> None:
    """A flag for every field of the stage's config dataclass (or `only` these) but its steps (given as steps or
    epochs): named as its pipeline parameter, with the field's type, default and one-line doc. The
    chat-template choice is --plain-text, as in the pipeline. `from_artifact` names the fields whose default
    comes from an input artifact instead."""
    hints = typing.get_type_hints(settings)
    docs, names = settings.field_docs(), settings.user_names()
    group = parser.add_argument_group(f"{settings.stage} settings")
    for field in dataclasses.fields(settings):
        if field.name == "train_steps" or (only and field.name not in only):
            continue
        if field.name == "use_chat_template":
            _add_plain_text(group)
            continue
        default = None if field.name in from_artifact else field.default
        shown = from_artifact.get(field.name, repr(field.default) if field.default == "" else field.default)
        help_text = f"{docs[field.name]} (default {shown})".replace("%", "%%")  # argparse formats help with %
        group.add_argument(_flag(names[field.name]), dest=field.name, default=default, help=help_text,
                           **_flag_kind(hints[field.name]))


def _flag_kind(kind) -> dict:
    """How argparse reads a field of this type: a switch for a bool, N values for a tuple of N."""
    metavars = {int: "N", float: "X", str: "TEXT"}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": typing.get_args(kind)}
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        return {"type": items[0], "nargs": len(items), "metavar": tuple(metavars[item] for item in items)}
    return {"type": kind, "metavar": metavars[kind]}


def _stage_config(settings, args, **given):
    """The stage's config from the flags `_add_settings` made (and `given`), or a UsageError naming each bad
    setting by its flag; a field the command has no flag for keeps its default."""
    values = {field.name: _field_value(getattr(args, field.name)) for field in dataclasses.fields(settings)
              if field.name not in ("train_steps", "use_chat_template") and hasattr(args, field.name)}
    config = settings.from_values({**values, **given}, getattr(args, PLAIN_TEXT, False))
    problems = config.problems({field: _flag(name) for field, name in settings.user_names().items()})
    if problems:
        raise UsageError("; ".join(problems))
    return config


def _field_value(value):
    return tuple(value) if isinstance(value, list) else value  # argparse gives nargs values as a list


def cmd_run(args) -> int:
    """Run rlhf_pipeline on the Kubeflow Pipelines local runner (no container, no network). With nothing given
    it tunes the default model on the bundled sample, sized for a laptop CPU. Leaves report.html, metrics.json
    and one log per stage in the output directory."""
    import time

    from rlhf.pipeline.local_run import (
        DATASET_PARAMETERS,
        LOCAL_DEFAULTS,
        RUN_RECORD,
        RunError,
        RunStopped,
        resumes,
        run_local,
    )
    from rlhf.pipeline.parameters import resolve_parameters

    parameters = resolve_parameters(Path(args.params) if args.params else None, args.set or [], LOCAL_DEFAULTS)
    output_dir = Path(args.output_dir or f"runs/run-{time.strftime('%Y%m%d-%H%M%S')}")
    _refuse_to_overwrite("--output-dir", str(output_dir), [parameters.get(n) for n in DATASET_PARAMETERS],
                         resumable=(RUN_RECORD,))
    resuming = resumes(parameters, output_dir)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"Resuming the run in {output_dir}" if resuming else f"Running the pipeline locally into {output_dir}")
    try:
        report = run_local(parameters, output_dir, echo=say)
    except RunStopped as error:
        print(f"rlhf run: {error}", file=sys.stderr)
        return 130
    except RunError as error:
        print(f"rlhf run: failed: {error}", file=sys.stderr)
        return 1
    say(f"Metrics: {output_dir / 'metrics.json'}")
    print(f"Report: {report}")
    return 0


PIPELINES = tuple(COMPILED)  # rlhf (`rlhf_pipeline`) and infer (`infer_pipeline`)
VERTEX_JOB_NOTES = ("Parameters as for `rlhf run` (--params, --set), with the pipeline's own defaults; checked "
                    "before anything is sent. Credentials come from the environment (Application Default "
                    "Credentials) and are never printed. --dry-run prints the exact request body and touches no "
                    "network.")


def _command(commands, name: str, handler, summary: str) -> argparse.ArgumentParser:
    """A subcommand: `summary` in `rlhf --help`, its handler's docstring as its own --help description."""
    command = commands.add_parser(name, help=summary, description=inspect.getdoc(handler))
    command.set_defaults(handler=handler)
    return command


def build_parser() -> argparse.ArgumentParser:
    from rlhf.evaluation.config import InferenceConfig
    from rlhf.labeling.config import CandidateConfig
    from rlhf.models.reference import DEFAULT_MODEL
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.rl.config import PPOConfig

    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="Tune a language model from human preferences (reward model + PPO), locally or on Vertex AI.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    steps = _command(commands, "steps", cmd_steps, "print the training steps for a number of rows and epochs")
    steps.add_argument("--rows", type=_positive_int, required=True, help="rows in the dataset")
    steps.add_argument("--epochs", type=_positive_int, required=True, help="passes over the dataset")
    steps.add_argument("--batch-size", type=_positive_int, default=64, help="rows per step (default 64)")

    validate = _command(commands, "validate", cmd_validate, "check datasets; one FILE:LINE line per problem")
    validate.add_argument("--preference-dataset", metavar="URI",
                          help="JSONL rows {input_text|messages, candidate_0, candidate_1, choice}")
    validate.add_argument("--prompt-dataset", metavar="URI", help="JSONL rows {input_text|messages}")
    validate.add_argument("--eval-dataset", metavar="URI",
                          help="JSONL prompt rows, or preference rows to hold out for reward-model accuracy")
    _add_data_settings(validate)
    validate.add_argument("--output-dir", metavar="DIR", help="write the normalised datasets and summary.json here")

    prepare = _command(commands, "prepare-model", cmd_prepare_model,
                       "resolve a model reference, converting or copying it into the cache once")
    prepare.add_argument("--large-model-reference", default=DEFAULT_MODEL, metavar="REF",
                         help=f"default {DEFAULT_MODEL}; also a local or gs:// model directory, or a hub id")
    prepare.add_argument("--cache-dir", metavar="DIR", help="model cache (default $RLHF_CACHE_DIR or ~/.cache/rlhf)")

    run = _command(commands, "run", cmd_run, "run the whole pipeline locally on the KFP local runner")
    run.add_argument("--params", metavar="FILE.yaml", help="pipeline parameters as a YAML mapping")
    run.add_argument("--set", action="append", metavar="NAME=VALUE",
                     help="one pipeline parameter (repeatable; wins over --params)")
    run.add_argument("--output-dir", metavar="DIR", help="where the run goes (default runs/run-DATE-TIME)")

    compile_ = _command(commands, "compile", cmd_compile, "write the compiled Kubeflow pipeline YAML")
    compile_.add_argument("--pipeline", choices=PIPELINES, default="rlhf",
                          help="rlhf (default): the tuning pipeline; infer: bulk inference only")
    compile_.add_argument("--output", metavar="FILE",
                          help="where to write it (default: pipeline.yaml or infer_pipeline.yaml in the current "
                               "directory)")

    for name, summary in (("submit", "submit the compiled pipeline to Vertex AI Pipelines"),
                          ("schedule", "schedule the compiled pipeline on Vertex AI Pipelines (cron)")):
        vertex = _command(commands, name, cmd_submit if name == "submit" else cmd_schedule, summary)
        vertex.description += " " + VERTEX_JOB_NOTES
        vertex.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT"),
                            help="Google Cloud project (default $GOOGLE_CLOUD_PROJECT)")
        vertex.add_argument("--location", default=os.environ.get("GOOGLE_CLOUD_REGION", "us-central1"),
                            help="Vertex AI region (default $GOOGLE_CLOUD_REGION, else us-central1)")
        vertex.add_argument("--pipeline-root", metavar="gs://BUCKET/PATH", help="where the run's artifacts go (required)")
        vertex.add_argument("--params", metavar="FILE.yaml", help="pipeline parameters as a YAML mapping")
        vertex.add_argument("--set", action="append", metavar="NAME=VALUE", help="one pipeline parameter (repeatable)")
        vertex.add_argument("--pipeline", choices=PIPELINES, default="rlhf",
                            help="rlhf (default): tune; infer: bulk inference only (GCPC's infer_pipeline)")
        vertex.add_argument("--display-name", help="the run's name in the console (default: rlhf-pipeline or "
                                                   "infer-pipeline)")
        if name == "submit":
            vertex.add_argument("--job-id", help="the job's id (default: made from the display name and time)")
        vertex.add_argument("--service-account", help="run-as service account (default: the project's compute account)")
        vertex.add_argument("--network", help="VPC network to peer with: projects/NUMBER/global/networks/NAME")
        vertex.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label on the job (repeatable)")
        vertex.add_argument("--no-caching", action="store_true", help="rerun every stage instead of reusing results")
        vertex.add_argument("--encryption-spec-key-name", metavar="KEY",
                            help="Cloud KMS key for the job, its artifacts and the uploaded model (CMEK)")
        vertex.add_argument("--image", help="container image for every stage (default: the one in the template)")
        vertex.add_argument("--template", metavar="FILE", help="compiled pipeline (default: the one this package ships)")
        vertex.add_argument("--api-endpoint", metavar="HOST",
                            help="Vertex AI API endpoint (default: the region's; e.g. a Private Service Connect one)")
        vertex.add_argument("--dry-run", action="store_true", help="print the request body; send nothing")
        if name == "schedule":
            vertex.add_argument("--cron", required=True, help='cron expression, e.g. "TZ=Europe/Paris 0 3 * * 1"')
            vertex.add_argument("--schedule-name", default="rlhf-pipeline-schedule", help="the schedule's name")
            vertex.add_argument("--start-time", help="RFC 3339 time of the first possible run (default: now)")
            vertex.add_argument("--end-time", help="RFC 3339 time after which no run starts (default: never)")
            vertex.add_argument("--max-concurrent-runs", type=int, default=1, help="runs at once (default 1)")
            vertex.add_argument("--max-runs", type=int, default=0, help="stop after this many runs (0: no limit)")
            vertex.add_argument("--allow-queueing", action="store_true",
                                help="queue runs beyond --max-concurrent-runs instead of skipping them")

    serve = _command(commands, "serve", cmd_serve,
                     "serve a tuned policy over HTTP (the Model Registry's serving container runs this)")
    serve.add_argument("--policy", metavar="DIR|gs://URI", help="a policy from `rlhf train-policy` (default "
                                                                "$AIP_STORAGE_URI)")
    serve.add_argument("--host", help="interface (default 127.0.0.1; 0.0.0.0 inside Vertex AI)")
    serve.add_argument("--port", type=_positive_int, help="port (default $AIP_HTTP_PORT, else 8080)")
    _add_device(serve)

    train_rm = _command(commands, "train-reward-model", cmd_train_reward_model, "train the pairwise LoRA reward model")
    train_rm.add_argument("--preference-dataset", required=True, metavar="URI",
                          help="JSONL rows {input_text|messages, candidate_0, candidate_1, choice}")
    train_rm.add_argument("--eval-dataset", metavar="URI",
                          help="JSONL preference rows held out for accuracy (default: a split by prompt)")
    _add_data_settings(train_rm, "on_invalid", "eval_fraction")  # the split's seed is the stage's --seed
    _add_model_reference(train_rm)
    train_rm.add_argument("--output-dir", required=True, metavar="DIR", help="where the reward model goes")
    _add_steps_or_epochs(train_rm, "reward_model", "pairs")
    _add_processes(train_rm)
    _add_settings(train_rm, RewardTrainingConfig)

    eval_rm = _command(commands, "evaluate-reward-model", cmd_evaluate_reward_model,
                       "accuracy of a reward model on labelled pairs, against the length baseline")
    eval_rm.add_argument("--reward-model", required=True, metavar="DIR", help="a trained reward model directory")
    eval_rm.add_argument("--preference-dataset", required=True, metavar="URI", help="labelled pairs")
    _add_data_settings(eval_rm, "on_invalid")
    _add_device(eval_rm)

    train_pol = _command(commands, "train-policy", cmd_train_policy,
                         "tune the policy: PPO, RLOO or GRPO against a reward model, or DPO on the pairs")
    train_pol.add_argument("--prompt-dataset", metavar="URI",
                           help="JSONL rows {input_text|messages} (ppo, rloo, grpo)")
    train_pol.add_argument("--reward-model", metavar="DIR", help="from `rlhf train-reward-model` (ppo, rloo, grpo)")
    train_pol.add_argument("--preference-dataset", metavar="URI",
                           help="JSONL rows {input_text|messages, candidate_0, candidate_1, choice} (dpo; a warm-up)")
    train_pol.add_argument("--eval-dataset", metavar="URI",
                           help="dpo: JSONL preference rows held out for accuracy; a warm-up: kept out of its "
                                "winners (default: a split by prompt)")
    _add_data_settings(train_pol, "on_invalid", "eval_fraction")
    _add_model_reference(train_pol, from_artifact="reward model")
    train_pol.add_argument("--output-dir", required=True, metavar="DIR", help="where the policy adapter goes")
    _add_steps_or_epochs(train_pol, "reinforcement_learning", "prompts")
    _add_settings(train_pol, PPOConfig, from_artifact={"instruction": "the reward model's"})
    _add_processes(train_pol)

    infer = _command(commands, "infer", cmd_infer,
                     "bulk inference: a completion for every prompt, in order, Vertex-shaped JSONL")
    infer.add_argument("--eval-dataset", required=True, metavar="URI", help="JSONL prompt rows")
    infer.add_argument("--output", required=True, metavar="FILE", help="JSONL file to write (must not exist)")
    infer.add_argument("--policy", metavar="DIR", help="a tuned policy from `rlhf train-policy` (base model + adapter)")
    infer.add_argument("--adapter", metavar="DIR", help="any peft LoRA adapter directory to apply to the base model")
    _add_data_settings(infer, "on_invalid")
    _add_model_reference(infer)
    _add_settings(infer, InferenceConfig, from_artifact={"instruction": "the --policy's, else none"})
    _add_processes(infer)

    evaluate = _command(commands, "evaluate", cmd_evaluate,
                        "base vs tuned: rewards, win rate, KL, lengths, report.html and metrics.json")
    evaluate.add_argument("--base-outputs", required=True, metavar="FILE", help="`rlhf infer` output of the base model")
    evaluate.add_argument("--tuned-outputs", required=True, metavar="FILE", help="`rlhf infer --policy` output")
    evaluate.add_argument("--reward-model", required=True, metavar="DIR")
    evaluate.add_argument("--policy", required=True, metavar="DIR")
    evaluate.add_argument("--output-dir", required=True, metavar="DIR")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="seed of the bootstrap and of the KL's samples (default 0; the pipeline passes the run's)")
    _add_device(evaluate)
    _add_settings(evaluate, InferenceConfig, only=("shard_weights",))
    _add_processes(evaluate)

    candidates = _command(commands, "generate-candidates", cmd_generate_candidates,
                          "two candidate completions per prompt, ready for people to label")
    candidates.add_argument("--prompt-dataset", required=True, metavar="URI", help="JSONL rows {input_text|messages}")
    candidates.add_argument("--output", required=True, metavar="URI", help="pairs file to write (must not exist)")
    _add_data_settings(candidates, "on_invalid")
    _add_model_reference(candidates)
    _add_settings(candidates, CandidateConfig)

    label = _command(commands, "label", cmd_label,
                     "a local page where a person picks the better candidate of each pair; export the choices")
    label.add_argument("--pairs", required=True, metavar="URI", help="pairs file from `rlhf generate-candidates`")
    label.add_argument("--output", required=True, action="append", metavar="FILE",
                       help="labels file (JSONL, appended to); with --export/--stats repeat it to merge annotators")
    label.add_argument("--annotator", metavar="NAME", help="who is labelling (default: your user name)")
    label.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    label.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    label.add_argument("--allow-remote", action="store_true",
                       help="allow a --host other than loopback: the page has no login")
    label.add_argument("--export", metavar="URI",
                       help="write the labels as a preference dataset (majority per pair; ties left out)")
    label.add_argument("--stats", action="store_true", help="print progress per annotator and agreement")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command. What the user can fix (`UserError`, exit 2) or what stopped the work from outside
    (`RunFailure`, exit 1) is one line, with its traceback only under RLHF_DEBUG=1; any other exception is a
    bug here and shows its traceback."""
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cpu_precision()  # a bad value stops here, before any stage starts
        _require_local_paths(args)
        status = args.handler(args)
        if "LOCAL_RANK" in os.environ:  # one of a stage's processes
            from rlhf.training.distributed import leave

            leave()
        return status
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    except (UserError, RunFailure) as error:
        if os.environ.get("RLHF_DEBUG"):
            traceback.print_exc()
        if isinstance(error, UserError):
            print(f"rlhf {args.command}: error: {error}", file=sys.stderr)
            return 2
        print(f"rlhf {args.command}: failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
