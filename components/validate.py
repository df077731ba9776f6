from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Metrics, Output

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate_datasets(
    preference_dataset: str,
    prompt_dataset: str,
    eval_dataset: str,
    on_invalid: str,
    eval_fraction: float,
    seed: int,
    train_pairs: Output[Dataset],
    held_out_pairs: Output[Dataset],
    prompts: Output[Dataset],
    eval_prompts: Output[Dataset],
    summary: Output[Artifact],
    metrics: Output[Metrics],
) -> NamedTuple("ValidationCounts", train_pair_count=int, prompt_count=int, eval_prompt_count=int):
    """Validate the datasets (URIs: local, gs://, globs) and pass them on as artifacts.

    Empty strings stand for datasets not given. Every problem is raised as `FILE:LINE: ...` lines.
    """
    import json
    from collections import namedtuple
    from pathlib import Path

    from rlhf.data.config import DataConfig
    from rlhf.data.datasets import DatasetError, prepare_datasets, write_jsonl

    try:
        data = prepare_datasets(preference_dataset, prompt_dataset or None, eval_dataset or None,
                                DataConfig(on_invalid=on_invalid, eval_fraction=eval_fraction, seed=seed))
    except DatasetError as error:
        raise SystemExit("dataset validation failed:\n" + str(error)) from None
    for artifact, rows in ((train_pairs, data.train_pairs), (held_out_pairs, data.held_out_pairs),
                           (prompts, data.prompts), (eval_prompts, data.eval_prompts)):
        write_jsonl(Path(artifact.path), rows)
        artifact.metadata["rows"] = len(rows)
    Path(summary.path).write_text(json.dumps(data.summary, indent=2))
    for name, value in (("train_pairs", len(data.train_pairs)), ("held_out_pairs", len(data.held_out_pairs)),
                        ("prompts", len(data.prompts)), ("eval_prompts", len(data.eval_prompts))):
        metrics.log_metric(name, value)
    counts = namedtuple("ValidationCounts", ["train_pair_count", "prompt_count", "eval_prompt_count"])
    return counts(len(data.train_pairs), len(data.prompts), len(data.eval_prompts))
