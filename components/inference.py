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
    predictions: Output[Dataset],
):
    """Greedy completions for every prompt, in order, in one process per accelerator; the base model, or the
    tuned one (base + adapter)."""
    from pathlib import Path

    from rlhf.components.processes import run_stage
    from rlhf.models.reference import resolve_model_reference
    from rlhf.rl.policy import ADAPTER_DIR, read_policy_spec

    spec = read_policy_spec(Path(policy.path))
    settings = {"target_sequence_length": target_sequence_length, "prompt_sequence_length": prompt_sequence_length,
                "batch_size": batch_size, "instruction": spec.instruction, "use_chat_template": spec.use_chat_template}
    adapter = str(Path(policy.path) / ADAPTER_DIR) if use_tuned_adapter else None
    result = run_stage("bulk_inference", processes, settings=settings, prompts=prompts.path,
                       model=resolve_model_reference(spec.large_model_reference), adapter=adapter,
                       output=predictions.path)
    predictions.metadata["rows"] = result["rows"]
    predictions.metadata["model"] = "tuned" if use_tuned_adapter else "base"
