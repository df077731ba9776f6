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
    predictions: Output[Dataset],
):
    """Greedy completions for every prompt, in order; the base model, or the tuned one (base + adapter)."""
    from pathlib import Path

    from rlhf.data.datasets import read_jsonl, write_jsonl
    from rlhf.evaluation.config import InferenceConfig
    from rlhf.evaluation.inference import bulk_infer
    from rlhf.models.reference import resolve_model_reference
    from rlhf.rl.policy import ADAPTER_DIR, read_policy_spec

    spec = read_policy_spec(Path(policy.path))
    config = InferenceConfig(target_sequence_length=target_sequence_length,
                             prompt_sequence_length=prompt_sequence_length, batch_size=batch_size,
                             instruction=spec.instruction, use_chat_template=spec.use_chat_template)
    adapter = Path(policy.path) / ADAPTER_DIR if use_tuned_adapter else None
    rows = bulk_infer(read_jsonl(Path(prompts.path)), resolve_model_reference(spec.large_model_reference), config,
                      adapter)
    write_jsonl(Path(predictions.path), rows)
    predictions.metadata["rows"] = len(rows)
    predictions.metadata["model"] = "tuned" if use_tuned_adapter else "base"
