from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from rlhf.components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def bulk_inference(
    prompts: Input[Dataset],
    policy: Input[Model],
    use_tuned_adapter: bool,
    target_sequence_length: int,
    prompt_sequence_length: int,
    batch_size: int,
    processes: int,
    shard_weights: bool,
    huggingface_token_secret: str,
    project: str,
    predictions: Output[Dataset],
):
    """Greedy completions for every prompt, in order, in one process per accelerator; the base model, or the
    tuned one (base + adapter)."""
    from pathlib import Path

    from rlhf.components.processes import run_stage
    from rlhf.models.reference import resolve_model_reference
    from rlhf.rl.policy import ADAPTER_DIR, read_policy_spec
    from rlhf.vertex.secrets import use_hub_token

    use_hub_token(huggingface_token_secret, project)
    spec = read_policy_spec(Path(policy.path))
    settings = {"target_sequence_length": target_sequence_length, "prompt_sequence_length": prompt_sequence_length,
                "batch_size": batch_size, "shard_weights": shard_weights, "instruction": spec.instruction,
                "use_chat_template": spec.use_chat_template}
    adapter = str(Path(policy.path) / ADAPTER_DIR) if use_tuned_adapter else None
    result = run_stage("bulk_inference", processes, settings=settings, prompts=prompts.path,
                       model=resolve_model_reference(spec.large_model_reference), adapter=adapter,
                       output=predictions.path)
    predictions.metadata["rows"] = result["rows"]
    predictions.metadata["model"] = "tuned" if use_tuned_adapter else "base"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def infer_prompts(
    prompt_dataset: str,
    large_model_reference: str,
    model_checkpoint: str,
    instruction: str,
    plain_text: bool,
    sampling_strategy: str,
    target_sequence_length: int,
    prompt_sequence_length: int,
    batch_size: int,
    seed: int,
    on_invalid: str,
    processes: int,
    shard_weights: bool,
    huggingface_token_secret: str,
    project: str,
    predictions: Output[Dataset],
) -> str:
    """`infer_pipeline`'s one stage: the prompts checked (every problem as `FILE:LINE: ...`, before any model
    loads), then a completion for each, in order, by the base model or a checkpoint of it. Returns where the
    predictions are (GCPC's `output_prediction_gcs_path`)."""
    import tempfile
    from pathlib import Path

    from rlhf.components.processes import run_stage
    from rlhf.data.datasets import write_jsonl
    from rlhf.data.validation import read_dataset
    from rlhf.evaluation.inference import model_to_infer
    from rlhf.models.reference import resolve_model_reference
    from rlhf.vertex.secrets import use_hub_token

    dataset = read_dataset(prompt_dataset, "prompt", on_invalid)
    if dataset.problems:
        raise SystemExit("dataset validation failed:\n" + "\n".join(str(p) for p in dataset.problems))
    use_hub_token(huggingface_token_secret, project)
    with tempfile.TemporaryDirectory() as scratch:
        target = model_to_infer(large_model_reference, model_checkpoint, Path(scratch))
        prompts = Path(scratch) / "prompts.jsonl"
        write_jsonl(prompts, dataset.rows)
        settings = {"target_sequence_length": target_sequence_length, "prompt_sequence_length": prompt_sequence_length,
                    "batch_size": batch_size, "sampling_strategy": sampling_strategy, "seed": seed,
                    "shard_weights": shard_weights, **target.prompt_format(instruction, plain_text)}
        result = run_stage("bulk_inference", processes, settings=settings, prompts=str(prompts),
                           model=resolve_model_reference(target.large_model_reference),
                           adapter=str(target.adapter) if target.adapter else None, output=predictions.path)
    predictions.metadata["rows"] = result["rows"]
    predictions.metadata["model"] = target.large_model_reference + (f" + {model_checkpoint}" if model_checkpoint else "")
    return predictions.uri
