"""The `rlhf` command: one subcommand per job, each a thin layer over a core function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

MAX_PROBLEM_LINES = 200


class UsageError(Exception):
    """Bad input from the user: printed as one clear message, never as a traceback."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def cmd_steps(args) -> int:
    from rlhf.steps import steps_from_epochs

    print(steps_from_epochs(args.rows, args.epochs, args.batch_size))
    return 0


def cmd_validate(args) -> int:
    from rlhf.datasets import DatasetError, prepare_datasets, sample_dataset, write_prepared

    preference = args.preference_dataset
    prompt, eval_set = args.prompt_dataset, args.eval_dataset
    if preference is None:
        if prompt or eval_set:
            raise UsageError("--preference-dataset is required when other datasets are given")
        preference, prompt, eval_set = (sample_dataset(n) for n in ("preference.jsonl", "prompts.jsonl", "eval.jsonl"))
        print(f"No dataset given: validating the bundled sample in {Path(preference).parent}", file=sys.stderr)
    if args.output_dir:
        _require_empty_output_dir(args.output_dir, [preference, prompt, eval_set])
    try:
        data = prepare_datasets(preference, prompt, eval_set, on_invalid=args.on_invalid,
                                eval_fraction=args.eval_fraction, seed=args.seed)
    except DatasetError as error:
        for problem in error.problems[:MAX_PROBLEM_LINES]:
            print(problem, file=sys.stderr)
        hidden = len(error.problems) - MAX_PROBLEM_LINES
        if hidden > 0:
            print(f"... and {hidden} more problems", file=sys.stderr)
        print(f"{len(error.problems)} problem(s) found; nothing was written. "
              "Fix them, or pass --on-invalid skip to drop bad rows.", file=sys.stderr)
        return 1
    if args.output_dir:
        write_prepared(data, Path(args.output_dir))
        print(f"Wrote the validated datasets and summary.json to {args.output_dir}", file=sys.stderr)
    print(json.dumps(data.summary, indent=2))
    return 0


def _require_empty_output_dir(output_dir: str, inputs: list[str | None]) -> None:
    out = Path(output_dir).resolve()
    for uri in inputs:
        if uri and not uri.startswith("gs://") and out in Path(uri).resolve().parents:
            raise UsageError(f"--output-dir {output_dir} contains the input {uri}; choose another directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--output-dir {output_dir} exists and is not empty; choose a new directory")


def cmd_prepare_model(args) -> int:
    from rlhf.model_reference import resolve_model_reference

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cache = Path(args.cache_dir) if args.cache_dir else None
    print(resolve_model_reference(args.large_model_reference, cache, progress))
    return 0


def cmd_compile(args) -> int:
    from pipeline.compiler import PIPELINE_YAML, compile_pipeline

    print(f"Wrote {compile_pipeline(Path(args.output) if args.output else PIPELINE_YAML)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rlhf.model_reference import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="Tune a language model from human preferences (reward model + PPO), locally or on Vertex AI.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    steps = commands.add_parser("steps", help="print the training steps for a number of rows and epochs",
                                description="Print ceil(rows / batch_size) * epochs.")
    steps.add_argument("--rows", type=_positive_int, required=True, help="rows in the dataset")
    steps.add_argument("--epochs", type=_positive_int, required=True, help="passes over the dataset")
    steps.add_argument("--batch-size", type=_positive_int, default=64, help="rows per step (default 64)")
    steps.set_defaults(handler=cmd_steps)

    validate = commands.add_parser(
        "validate", help="check datasets; one FILE:LINE line per problem",
        description="Validate preference, prompt and eval datasets (local paths, gs:// URIs, globs). "
                    "Exits 0 and prints a JSON summary, or exits 1 with one 'FILE:LINE: problem' line "
                    "per problem (line 0: the whole file). With no dataset, checks the bundled sample.")
    validate.add_argument("--preference-dataset", metavar="URI",
                          help="JSONL rows {input_text|messages, candidate_0, candidate_1, choice}")
    validate.add_argument("--prompt-dataset", metavar="URI", help="JSONL rows {input_text|messages}")
    validate.add_argument("--eval-dataset", metavar="URI",
                          help="JSONL prompt rows, or preference rows to hold out for reward-model accuracy")
    validate.add_argument("--on-invalid", choices=("fail", "skip"), default="fail",
                          help="fail (default) lists every problem; skip drops bad rows and counts them")
    validate.add_argument("--eval-fraction", type=float, default=0.1,
                          help="share of prompts held out when the eval dataset has no pairs (default 0.1)")
    validate.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    validate.add_argument("--output-dir", metavar="DIR", help="write the normalised datasets and summary.json here")
    validate.set_defaults(handler=cmd_validate)

    prepare = commands.add_parser(
        "prepare-model", help="resolve a model reference, converting or copying it into the cache once",
        description="Resolve large_model_reference and print the directory or hub id it loads from. The "
                    "default model is converted once from its GGUF file into safetensors.")
    prepare.add_argument("--large-model-reference", default=DEFAULT_MODEL, metavar="REF",
                         help=f"default {DEFAULT_MODEL}; also a local or gs:// model directory, or a hub id")
    prepare.add_argument("--cache-dir", metavar="DIR", help="model cache (default $RLHF_CACHE_DIR or ~/.cache/rlhf)")
    prepare.set_defaults(handler=cmd_prepare_model)

    compile_ = commands.add_parser("compile", help="write the compiled Kubeflow pipeline YAML",
                                   description="Compile rlhf_pipeline to YAML (what `python compile.py` does).")
    compile_.add_argument("--output", metavar="FILE", help="where to write it (default: pipeline.yaml in the repo)")
    compile_.set_defaults(handler=cmd_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from rlhf.model_reference import ModelReferenceError
    from rlhf.storage import StorageError

    try:
        return args.handler(args)
    except (UsageError, ModelReferenceError, StorageError, ValueError) as error:
        print(f"rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("RLHF_DEBUG"):
            traceback.print_exc()
        print(f"rlhf {args.command}: failed: {type(error).__name__}: {error}\n"
              "(set RLHF_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
