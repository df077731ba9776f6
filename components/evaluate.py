from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    base_predictions: Input[Dataset],
    tuned_predictions: Input[Dataset],
    reward_model: Input[Model],
    policy: Input[Model],
    preference_dataset: str,
    prompt_dataset: str,
    eval_dataset: str,
    large_model_reference: str,
    reward_model_train_steps: int,
    reinforcement_learning_train_steps: int,
    reward_model_learning_rate_multiplier: float,
    reinforcement_learning_rate_multiplier: float,
    kl_coeff: float,
    instruction: str,
    target_sequence_length: int,
    seed: int,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
    report_markdown: Output[Markdown],
):
    """Base vs tuned: metrics.json, comparison.jsonl and the report, also shown in the KFP UI."""
    import shutil
    from pathlib import Path

    from rlhf.data.datasets import read_jsonl
    from rlhf.evaluation.compare import REPORT_HTML, REPORT_MARKDOWN, evaluate_run

    parameters = {
        "preference_dataset": preference_dataset, "prompt_dataset": prompt_dataset, "eval_dataset": eval_dataset,
        "large_model_reference": large_model_reference, "reward_model_train_steps": reward_model_train_steps,
        "reinforcement_learning_train_steps": reinforcement_learning_train_steps,
        "reward_model_learning_rate_multiplier": reward_model_learning_rate_multiplier,
        "reinforcement_learning_rate_multiplier": reinforcement_learning_rate_multiplier, "kl_coeff": kl_coeff,
        "instruction": instruction, "target_sequence_length": target_sequence_length, "seed": seed,
    }
    result = evaluate_run(read_jsonl(Path(base_predictions.path)), read_jsonl(Path(tuned_predictions.path)),
                          Path(reward_model.path), Path(policy.path), Path(evaluation.path),
                          parameters, seed=seed)
    shutil.copyfile(Path(evaluation.path) / REPORT_HTML, report.path)
    shutil.copyfile(Path(evaluation.path) / REPORT_MARKDOWN, report_markdown.path)
    for stage, values in result.items():
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics.log_metric(f"{stage}.{name}", value)
