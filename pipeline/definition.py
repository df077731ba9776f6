"""`rlhf_pipeline`: the DAG, with parameters named as in Google's Vertex AI RLHF pipeline.

validate -> resolve steps -> train reward model -> tune the policy (`tuning_method`: PPO, RLOO or GRPO against the
reward model, or DPO on the training pairs, where the reward model is still trained as a judge) ->
bulk inference of the base and the tuned model on the eval prompts -> evaluate (metrics.json, report.html)
-> optionally upload the tuned model to the Vertex AI Model Registry (and deploy it), and the training
curves to Vertex AI TensorBoard. It returns the model's and the endpoint's resource names, as GCPC's does.

The accelerator, CPU and memory settings apply on Vertex AI; the KFP local runner ignores them, but for one:
training and bulk inference run one process per accelerator of their `*_accelerator_count` (data parallel),
there too. A training or bulk-inference stage with `*_replica_count` above 1 runs on that many machines as a
Vertex AI custom job (a branch of its own; KFP's local runner is given none).
"""

import inspect
from typing import NamedTuple

from kfp import dsl

from rlhf.components.evaluate import evaluate
from rlhf.components.image import IMAGE
from rlhf.components.inference import bulk_inference, infer_prompts
from rlhf.components.policy import train_policy
from rlhf.components.replicas import on_replicas
from rlhf.components.resolve_steps import resolve_steps
from rlhf.components.reward_model import train_reward_model
from rlhf.components.tensorboard import upload_tensorboard
from rlhf.components.upload import skip_upload, upload_model
from rlhf.components.validate import validate_datasets
from rlhf.vertex.custom_job import MACHINE_SETTINGS

# Accelerator stages are the ones a preempted or failed machine interrupts; their outputs hold checkpoints,
# so a retry on the same output location resumes instead of starting over.
RETRIES = 2
RETRY_BACKOFF = "60s"


class PipelineOutput(NamedTuple):
    """What the pipeline returns, as GCPC's `rlhf_pipeline` does; empty where nothing was uploaded or deployed."""

    model_resource_name: str  # the tuned model in the Vertex AI Model Registry
    endpoint_resource_name: str  # the endpoint it was deployed to


def _on_machine(task, accelerator_type, accelerator_count, cpu_limit, memory_limit, retries: int):
    task = (task.set_accelerator_type(accelerator_type).set_accelerator_limit(accelerator_count)
            .set_cpu_limit(cpu_limit).set_memory_limit(memory_limit))
    return task.set_retry(num_retries=retries, backoff_duration=RETRY_BACKOFF) if retries else task


def _on_machines(component, stage: str, parameters: dict, retries: int, display_name: str, group: str = "",
                 **inputs) -> dict:
    """A stage on the machines its parameters (`<stage>_accelerator_*`, `_cpu_limit`, `_memory_limit`,
    `_replica_count`) ask for: one machine as a task of its own, several as a custom job with worker pools
    (`rlhf.components.replicas`); returns its outputs, from whichever ran. `group` names the two branches (the
    stage's name by default; a stage that runs more than once needs one per run)."""
    machine = {name: parameters[f"{stage}_{name}"] for name in MACHINE_SETTINGS}
    replicas = parameters[f"{stage}_replica_count"]
    group = group or stage.replace("_", "-")
    with dsl.If(replicas == 1, name=f"{group}-on-one-machine"):
        alone = _on_machine(component(**inputs).set_display_name(display_name), *machine.values(), retries)
    with dsl.Else(name=f"{group}-on-replicas"):
        launcher = on_replicas(component)(
            **inputs, replica_count=replicas, location=parameters["location"],
            encryption_spec_key_name=parameters["encryption_spec_key_name"],
            **{f"machine_{name}": value for name, value in machine.items()},
        ).set_display_name(f"{display_name} (several machines)")
        if retries:
            launcher.set_retry(num_retries=retries, backoff_duration=RETRY_BACKOFF)
    return {name: dsl.OneOf(alone.outputs[name], launcher.outputs[name]) for name in alone.outputs
            if name != "metrics"}


def _from_parameters(component, parameters: dict, settings=None) -> dict:
    """The component's inputs that come straight from pipeline parameters: a field of the stage's config
    dataclass from the parameter its `parameter_names` names (the one mapping), any other input from the
    parameter of the same name. The steps come from `resolve steps`."""
    names = settings.parameter_names if settings else {}
    return {field: parameters[names.get(field, field)] for field in component.component_spec.inputs
            if field != "train_steps" and names.get(field, field) in parameters}


def build_pipeline(retries: int = RETRIES):
    """The pipeline with `retries` per accelerator stage: RETRIES for Vertex AI; `rlhf run` builds it with 0,
    since on a laptop a failure is no preemption and a retry would undo a Ctrl-C."""
    from rlhf.data.config import DataConfig
    from rlhf.evaluation.config import InferenceConfig
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.rl.config import PPOConfig

    def rlhf_pipeline(
        preference_dataset: str,
        large_model_reference: str = "smollm2-135m-instruct",
        prompt_dataset: str = "",
        eval_dataset: str = "",
        on_invalid: str = "fail",
        eval_fraction: float = 0.1,
        seed: int = 0,
        model_display_name: str = "",
        deploy_model: bool = False,
        project: str = "",
        location: str = "us-central1",
        accelerator_type: str = "GPU",
        tensorboard_resource_id: str = "",
        encryption_spec_key_name: str = "",
        huggingface_token_secret: str = "",
        reward_model_train_steps: int = 1000,
        reward_model_train_epochs: int = 0,
        reward_model_batch_size: int = 64,
        reward_model_micro_batch_tokens: int = 4096,
        reward_model_learning_rate_multiplier: float = 1.0,
        reward_lora_dim: int = 4,
        reward_model_warmup_fraction: float = 0.1,
        reward_model_weight_decay: float = 0.0,
        reward_model_max_grad_norm: float = 1.0,
        reward_model_normalization_pairs: int = 512,
        reward_model_balance_lengths: bool = False,
        reward_model_gradient_checkpointing: bool = False,
        reward_model_shard_weights: bool = False,
        sft_steps: int = 0,
        dpo_warmup_steps: int = 0,
        reinforcement_learning_train_steps: int = 1000,
        reinforcement_learning_train_epochs: int = 0,
        reinforcement_learning_batch_size: int = 64,
        reinforcement_learning_micro_batch_size: int = 8,
        tuning_method: str = "ppo",
        samples_per_prompt: int = 1,
        reinforcement_learning_rollout_micro_batch_size: int = 0,
        reinforcement_learning_minibatch_size: int = 32,
        reinforcement_learning_ppo_epochs: int = 2,
        reinforcement_learning_rate_multiplier: float = 1.0,
        kl_coeff: float = 0.1,
        kl_target: float = 0.0,
        kl_horizon: int = 10000,
        policy_lora_dim: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        reinforcement_learning_warmup_fraction: float = 0.1,
        gamma: float = 1.0,
        gae_lambda: float = 1.0,
        clip_range: float = 0.2,
        value_clip_range: float = 0.2,
        value_loss_coeff: float = 0.1,
        reinforcement_learning_max_grad_norm: float = 1.0,
        penalize_unfinished: bool = True,
        unfinished_reward: float = -2.0,
        export_merged_model: bool = False,
        reinforcement_learning_gradient_checkpointing: bool = False,
        reinforcement_learning_shard_weights: bool = False,
        dpo_beta: float = 0.1,
        inference_batch_size: int = 8,
        inference_shard_weights: bool = False,
        prompt_sequence_length: int = 512,
        target_sequence_length: int = 64,
        instruction: str = "",
        plain_text: bool = False,
        reward_model_accelerator_type: str = "NVIDIA_L4",
        reward_model_accelerator_count: int = 1,
        reward_model_replica_count: int = 1,
        reward_model_cpu_limit: str = "8",
        reward_model_memory_limit: str = "32G",
        reinforcement_learning_accelerator_type: str = "NVIDIA_L4",
        reinforcement_learning_accelerator_count: int = 1,
        reinforcement_learning_replica_count: int = 1,
        reinforcement_learning_cpu_limit: str = "8",
        reinforcement_learning_memory_limit: str = "32G",
        inference_accelerator_type: str = "NVIDIA_L4",
        inference_accelerator_count: int = 1,
        inference_replica_count: int = 1,
        inference_cpu_limit: str = "8",
        inference_memory_limit: str = "32G",
        serving_container_image: str = IMAGE,
        deploy_machine_type: str = "g2-standard-8",
        deploy_accelerator_type: str = "NVIDIA_L4",
        deploy_accelerator_count: int = 1,
    ) -> PipelineOutput:
        given = dict(locals())  # the parameters, and `retries` (a free variable here)
        parameters = {name: given[name] for name in inspect.signature(rlhf_pipeline).parameters}  # by name
        validated = validate_datasets(
            **_from_parameters(validate_datasets, parameters, DataConfig),
        ).set_display_name("validate")
        steps = resolve_steps(
            train_pair_count=validated.outputs["train_pair_count"],
            prompt_count=validated.outputs["prompt_count"],
            **_from_parameters(resolve_steps, parameters),
        ).set_display_name("resolve steps")
        reward_model = _on_machines(train_reward_model, "reward_model", parameters, retries, "train reward model",
            train_pairs=validated.outputs["train_pairs"],
            held_out_pairs=validated.outputs["held_out_pairs"],
            train_steps=steps.outputs["reward_model_steps"],
            processes=reward_model_accelerator_count,
            **_from_parameters(train_reward_model, parameters, RewardTrainingConfig),
        )
        policy = _on_machines(train_policy, "reinforcement_learning", parameters, retries, "train policy",
            prompts=validated.outputs["prompts"],
            reward_model=reward_model["reward_model"],
            train_pairs=validated.outputs["train_pairs"],
            held_out_pairs=validated.outputs["held_out_pairs"],
            train_steps=steps.outputs["reinforcement_learning_steps"],
            processes=reinforcement_learning_accelerator_count,
            **_from_parameters(train_policy, parameters, PPOConfig),
        )
        predictions = {}
        for side, tuned in (("base", False), ("tuned", True)):
            predictions[side] = _on_machines(bulk_inference, "inference", parameters, retries,
                f"bulk inference ({side})", group=f"bulk-inference-{side}",
                prompts=validated.outputs["eval_prompts"],
                policy=policy["policy"],
                use_tuned_adapter=tuned,
                processes=inference_accelerator_count,
                **_from_parameters(bulk_inference, parameters, InferenceConfig),
            )
        # On one machine of the inference stage's kind, whatever its replica count: its GPUs hold the two models
        # together (sharded over them with `inference_shard_weights`), and a few eval prompts need no more.
        evaluation = evaluate(
            base_predictions=predictions["base"]["predictions"],
            tuned_predictions=predictions["tuned"]["predictions"],
            reward_model=reward_model["reward_model"],
            policy=policy["policy"],
            run_parameters={**parameters,
                            "reward_model_train_steps": steps.outputs["reward_model_steps"],
                            "reinforcement_learning_train_steps": steps.outputs["reinforcement_learning_steps"]},
            seed=seed,
            processes=inference_accelerator_count,
            shard_weights=inference_shard_weights,
            huggingface_token_secret=huggingface_token_secret,
            project=project,
        ).set_display_name("evaluate")
        _on_machine(evaluation, inference_accelerator_type, inference_accelerator_count, inference_cpu_limit,
                    inference_memory_limit, retries)
        with dsl.If(model_display_name != "", name="upload-requested"):
            uploaded = upload_model(
                policy=policy["policy"], **_from_parameters(upload_model, parameters),
            ).after(evaluation).set_display_name("upload model")
        with dsl.Else(name="no-upload"):
            skipped = skip_upload().set_display_name("no upload")
        with dsl.If(tensorboard_resource_id != "", name="tensorboard-requested"):
            upload_tensorboard(
                reward_model=reward_model["reward_model"], policy=policy["policy"],
                **_from_parameters(upload_tensorboard, parameters),
            ).set_display_name("upload TensorBoard logs")
        return PipelineOutput(**{name: dsl.OneOf(uploaded.outputs[name], skipped.outputs[name])
                                 for name in PipelineOutput._fields})

    return dsl.pipeline(name="rlhf-pipeline", description="Tune a language model from human preferences.")(
        rlhf_pipeline)


rlhf_pipeline = build_pipeline()


class InferOutput(NamedTuple):
    """What `infer_pipeline` returns, as GCPC's does."""

    output_prediction_gcs_path: str  # the predictions' JSONL (gs:// on Vertex AI)


def build_infer_pipeline(retries: int = RETRIES):
    """GCPC's `infer_pipeline`: bulk inference of a model, tuned or not, on a prompt dataset, with GCPC's
    parameters, and ours for the machine and the batch."""

    def infer_pipeline(
        prompt_dataset: str,
        large_model_reference: str = "smollm2-135m-instruct",
        model_checkpoint: str = "",
        prompt_sequence_length: int = 512,
        target_sequence_length: int = 64,
        sampling_strategy: str = "greedy",
        instruction: str = "",
        project: str = "",
        accelerator_type: str = "GPU",
        location: str = "us-central1",
        encryption_spec_key_name: str = "",
        huggingface_token_secret: str = "",
        plain_text: bool = False,
        on_invalid: str = "fail",
        seed: int = 0,
        inference_batch_size: int = 8,
        inference_shard_weights: bool = False,
        inference_accelerator_type: str = "NVIDIA_L4",
        inference_accelerator_count: int = 1,
        inference_replica_count: int = 1,
        inference_cpu_limit: str = "8",
        inference_memory_limit: str = "32G",
    ) -> InferOutput:
        given = dict(locals())
        parameters = {name: given[name] for name in inspect.signature(infer_pipeline).parameters}
        inference = _on_machines(infer_prompts, "inference", parameters, retries, "bulk inference",
            prompt_dataset=prompt_dataset, large_model_reference=large_model_reference,
            model_checkpoint=model_checkpoint, instruction=instruction, plain_text=plain_text,
            sampling_strategy=sampling_strategy, target_sequence_length=target_sequence_length,
            prompt_sequence_length=prompt_sequence_length, batch_size=inference_batch_size, seed=seed,
            on_invalid=on_invalid, processes=inference_accelerator_count, shard_weights=inference_shard_weights,
            huggingface_token_secret=huggingface_token_secret, project=project,
        )
        return InferOutput(output_prediction_gcs_path=inference["Output"])

    return dsl.pipeline(name="infer-pipeline", description="Bulk inference of a language model on a prompt dataset.")(
        infer_pipeline)


infer_pipeline = build_infer_pipeline()

# The compiled pipelines by the name `--pipeline` takes.
PIPELINES = {"rlhf": rlhf_pipeline, "infer": infer_pipeline}
