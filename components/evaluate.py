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
    huggingface_token_secret: str,
    project: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    report_markdown: Output[Markdown],
):
    """Base vs tuned: metrics.json, comparison.jsonl and the report, also shown in the KFP UI. `run_parameters`:
    every pipeline parameter of the run, with the steps as resolved, listed in the report."""
    import json
    import shutil
    from pathlib import Path

    from rlhf.data.datasets import read_jsonl
    from rlhf.evaluation.compare import REPORT_HTML, REPORT_MARKDOWN, evaluate_run
    from rlhf.vertex.secrets import use_hub_token

    use_hub_token(huggingface_token_secret, project)

    def shown(text):  # KFP puts each parameter into the dict as text: '64.0', 'false', 'gs://...'
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            return text
        return int(value) if isinstance(value, float) and value.is_integer() else value

    result = evaluate_run(read_jsonl(Path(base_predictions.path)), read_jsonl(Path(tuned_predictions.path)),
                          Path(reward_model.path), Path(policy.path), Path(evaluation.path),
                          {name: shown(text) for name, text in run_parameters.items()}, seed=seed)
    shutil.copyfile(Path(evaluation.path) / REPORT_HTML, report.path)
    shutil.copyfile(Path(evaluation.path) / REPORT_MARKDOWN, report_markdown.path)
    for stage, values in result.items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.log_metric(f"{stage}.{name}", value)
