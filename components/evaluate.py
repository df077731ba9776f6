from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    base_predictions: Input[Dataset],
    tuned_predictions: Input[Dataset],
    reward_model: Input[Model],
    policy: Input[Model],
    run_parameters: dict,
    seed: int,
    processes: int,
    shard_weights: bool,
    huggingface_token_secret: str,
    project: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    report_markdown: Output[Markdown],
):
    """Base vs tuned: metrics.json, comparison.jsonl and the report, also shown in the KFP UI. `run_parameters`:
    every pipeline parameter of the run, with the steps as resolved, listed in the report. With `shard_weights`,
    one process per accelerator, the reward model's and the policy's weights sharded over them; else one."""
    import json
    import shutil
    from pathlib import Path

    from rlhf.components.processes import run_stage
    from rlhf.evaluation.compare import REPORT_HTML, REPORT_MARKDOWN
    from rlhf.vertex.secrets import use_hub_token

    use_hub_token(huggingface_token_secret, project)

    def shown(text):  # KFP puts each parameter into the dict as text: '64.0', 'false', 'gs://...'
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            return text
        return int(value) if isinstance(value, float) and value.is_integer() else value

    result = run_stage("evaluate", processes if shard_weights else 1, base_predictions=base_predictions.path,
                       tuned_predictions=tuned_predictions.path, reward_model=reward_model.path, policy=policy.path,
                       output=evaluation.path, parameters={name: shown(text) for name, text in run_parameters.items()},
                       seed=seed, shard_weights=shard_weights)
    shutil.copyfile(Path(evaluation.path) / REPORT_HTML, report.path)
    shutil.copyfile(Path(evaluation.path) / REPORT_MARKDOWN, report_markdown.path)
    for stage, values in result.items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.log_metric(f"{stage}.{name}", value)
