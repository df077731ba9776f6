"""Pipeline parameters: gathered from defaults, a YAML file and `--set name=value`, typed, and checked
before anything runs, so a bad value stops `rlhf run` or `rlhf submit` at once instead of deep in training.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml

from rlhf.errors import UserError
from rlhf.models.reference import ModelReferenceError, classify_model_reference, context_length
from rlhf.settings import PLAIN_TEXT
from rlhf.vertex.custom_job import MACHINE_SETTINGS, cpu_count, machine_type, memory_bytes
from rlhf.vertex.secrets import secret_problem

# (steps, epochs): epochs, when given, define the steps; giving both is ambiguous.
STEP_PARAMETERS = (("reward_model_train_steps", "reward_model_train_epochs"),
                   ("reinforcement_learning_train_steps", "reinforcement_learning_train_epochs"))
DATASET_PARAMETERS = ("preference_dataset", "prompt_dataset", "eval_dataset")
# The stages that run on an accelerator on Vertex AI, by the prefix of their resource parameters.
ACCELERATED_STAGES = ("reward_model", "reinforcement_learning", "inference")
# Accelerators the CUDA image can use on Vertex AI Pipelines (TPUs would need torch_xla, not in the image).
VERTEX_GPUS = ("NVIDIA_TESLA_T4", "NVIDIA_L4", "NVIDIA_TESLA_V100", "NVIDIA_TESLA_P100", "NVIDIA_TESLA_A100",
               "NVIDIA_A100_80GB", "NVIDIA_H100_80GB", "NVIDIA_H100_MEGA_80GB", "NVIDIA_H200_141GB", "NVIDIA_B200")


class ParameterError(UserError):
    """One or more bad pipeline parameters; the message lists each with what is wrong."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("bad pipeline parameters:\n" + "\n".join(f"  {p}" for p in problems))


# Each compiled pipeline's dataset that must be given, and its stages that run on an accelerator: each by the
# prefix of its machine parameters, with the work its memory estimate counts (`rlhf.models.memory.stage_bytes`).
REQUIRED_DATASET = {"rlhf": "preference_dataset", "infer": "prompt_dataset"}
PIPELINE_STAGES = {"rlhf": {stage: stage for stage in ACCELERATED_STAGES}, "infer": {"inference": "bulk_inference"}}


def pipeline_parameters(pipeline: str = "rlhf") -> dict[str, inspect.Parameter]:
    from rlhf.pipeline import definition

    return dict(inspect.signature(definition.PIPELINES[pipeline].pipeline_func).parameters)


def pipeline_defaults(pipeline: str = "rlhf") -> dict:
    """The pipeline's own defaults (sized for Vertex AI); required parameters are absent."""
    return {name: p.default for name, p in pipeline_parameters(pipeline).items()
            if p.default is not inspect.Parameter.empty}


def parameter_values(parameters: dict, pipeline: str = "rlhf"):
    """`value(name)`: the parameter as given, else the pipeline's default (None for a required one not given)."""
    defaults = pipeline_defaults(pipeline)
    return lambda name: parameters.get(name, defaults.get(name))


def _coerce(name: str, value, parameter: inspect.Parameter):
    kind = parameter.annotation
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{name} takes true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{name} takes a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"{name} takes a number, got {value!r}")
    return "" if value is None else str(value)


def read_given(params_file: Path | None, assignments: list[str]) -> dict:
    """What the user gave: the YAML file, then each `name=value` (values parsed as YAML scalars)."""
    given: dict = {}
    if params_file:
        try:
            loaded = yaml.safe_load(Path(params_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise UserError(f"{params_file}: cannot read the parameters: {error}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{params_file}: expected a mapping of parameter names to values")
        given.update(loaded)
    for assignment in assignments:
        name, separator, text = assignment.partition("=")
        if not separator:
            raise UserError(f"--set {assignment!r}: expected name=value")
        given[name.strip()] = yaml.safe_load(text) if text.strip() else ""
    return given


def resolve_parameters(params_file: Path | None, assignments: list[str], defaults: dict,
                       target: str = "local", pipeline: str = "rlhf") -> dict:
    """`defaults`, overridden by what the user gave, typed and checked for `target` (local or vertex) and
    `pipeline` (rlhf or infer)."""
    accepted = pipeline_parameters(pipeline)
    given = read_given(params_file, assignments)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise UserError(f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}")
    parameters = dict(defaults)
    for steps, epochs in STEP_PARAMETERS:
        # A default for one of the pair must not turn the user's choice of the other into "both given".
        if steps in given:
            parameters.pop(epochs, None)
        if epochs in given:
            parameters.pop(steps, None)
    parameters.update(given)
    typed = {name: _coerce(name, value, accepted[name]) for name, value in parameters.items()}
    if target == "vertex":
        typed.update(chosen_machines(typed, given, pipeline))
    problems = check_parameters(typed, given, target, pipeline)
    if problems:
        raise ParameterError(problems)
    return typed


def check_parameters(parameters: dict, given: dict, target: str, pipeline: str = "rlhf") -> list[str]:
    """Every problem with the parameters, one line each; empty when they are fine."""
    problems = []
    value = parameter_values(parameters, pipeline)

    def require(condition: bool, name: str, what: str) -> None:
        if not condition:
            problems.append(f"{name}={value(name)!r}: {what}")

    for steps, epochs in STEP_PARAMETERS if pipeline == "rlhf" else ():
        if steps in given and epochs in given:
            problems.append(f"{steps} and {epochs} are both given; give one of them")
        require(value(epochs) >= 0, epochs, "must not be negative (0 means: use the steps)")
    require(bool(value(REQUIRED_DATASET[pipeline])), REQUIRED_DATASET[pipeline], "is required")
    problems += _check_model(parameters, value, target)
    # The stages' own checks (the same the CLI's commands run), on the settings as each stage will get them,
    # before any stage runs.
    problems += [problem for config, names in stage_configs(value, pipeline) for problem in config.problems(names)]
    secret = value("huggingface_token_secret")
    if secret and (problem := secret_problem(secret)):
        problems.append(problem)
    replicated = [name for name in pipeline_parameters(pipeline) if name.endswith("_replica_count")]
    for name in replicated:
        require(value(name) >= 1, name, "a stage runs on at least one machine")
    if target == "vertex":
        problems += _check_vertex(value, PIPELINE_STAGES[pipeline])
        problems += _check_replicas(value, [name.removesuffix("_replica_count") for name in replicated])
    else:
        for name in replicated:
            require(value(name) <= 1, name, "several machines are a Vertex AI custom job; on this machine, give "
                    "the stage several processes with its *_accelerator_count")
        for name in DATASET_PARAMETERS:
            require(not str(value(name) or "").startswith("/gcs/"), name,
                    "a /gcs/ path exists only inside Vertex AI; use the gs:// URI")
    return problems


def stage_settings() -> list[tuple[type, dict[str, str]]]:
    """Each stage's config dataclass (data, reward model, PPO, bulk inference) and which of its fields each
    pipeline parameter sets (the one mapping, `parameter_names` on the dataclass: the components pass the same
    parameters to the same fields)."""
    from rlhf.data.config import DataConfig
    from rlhf.evaluation.config import InferenceConfig
    from rlhf.reward.config import RewardTrainingConfig
    from rlhf.rl.config import PPOConfig

    return [(kind, {name: field for field, name in kind.parameter_names.items()})
            for kind in (DataConfig, RewardTrainingConfig, PPOConfig, InferenceConfig)]


def stage_configs(value, pipeline: str = "rlhf") -> list:
    """The configs a run's parameters give each stage (the steps as given: epochs resolve later), each with the
    parameter names its fields go by. `infer_pipeline` has bulk inference alone, with GCPC's sampling strategy."""
    if pipeline == "infer":
        from rlhf.evaluation.config import InferenceConfig

        names = {**InferenceConfig.parameter_names, "sampling_strategy": "sampling_strategy"}
        return [(InferenceConfig.from_values({field: value(name) for field, name in names.items()}, value(PLAIN_TEXT)),
                 names)]
    return [(kind.from_values({field: value(name) for name, field in settings.items()}, value(PLAIN_TEXT)),
             kind.parameter_names) for kind, settings in stage_settings()]


def _check_model(parameters: dict, value, target: str) -> list[str]:
    reference = value("large_model_reference")
    try:
        kind, _ = classify_model_reference(reference)
        longest = context_length(reference)
    except ModelReferenceError as error:
        return [str(error)]
    problems = []
    if target == "vertex" and kind == "local":
        problems.append(f"large_model_reference={reference!r}: a local directory is not visible to Vertex AI; "
                        "copy it to gs://BUCKET/DIR and pass that")
    total = value("prompt_sequence_length") + value("target_sequence_length")
    if longest is not None and total > longest:
        problems.append(f"prompt_sequence_length + target_sequence_length = {total} tokens is beyond "
                        f"{reference}'s {longest}")
    return problems


def stage_memory(value, stages: dict[str, str] | None = None) -> dict[str, dict[str, int]] | None:
    """Each accelerated stage's estimated bytes per GPU (`rlhf.models.memory.stage_bytes`; `value(name)` gives a
    parameter's value), or None where the model's config is not known without a download (a hub id or gs://
    directory not in the course's list)."""
    from rlhf.models.memory import ModelShape, model_config, stage_bytes

    try:
        config = model_config(value("large_model_reference"))
    except (ModelReferenceError, OSError, ValueError):
        return None
    if config is None:
        return None
    shape = ModelShape.from_config(config)
    return {stage: stage_bytes(shape, work, value) for stage, work in (stages or PIPELINE_STAGES["rlhf"]).items()}


def chosen_machines(parameters: dict, given: dict, pipeline: str = "rlhf") -> dict[str, str]:
    """For each accelerated stage whose accelerator the user did not give, the smallest one (of
    `rlhf.models.memory.CHOICE_ORDER`) that holds the stage where the pipeline's default would not."""
    from rlhf.models.memory import fits, smallest_fitting

    defaults = pipeline_defaults(pipeline)
    needs = stage_memory(parameter_values(parameters, pipeline), PIPELINE_STAGES[pipeline])
    if needs is None:
        return {}
    chosen = {}
    for stage, parts in needs.items():
        name = f"{stage}_accelerator_type"
        if name in given or fits(defaults[name], parts["total"]):
            continue
        best = smallest_fitting(parts["total"])
        if best:
            chosen[name] = best
    return chosen


def machine_lines(parameters: dict, pipeline: str = "rlhf") -> list[str]:
    """One line per accelerated stage: its estimated memory a GPU, the GPU it will run on, and for a stage on
    several machines, how many and which."""
    from rlhf.models.memory import gib

    value = parameter_values(parameters, pipeline)
    needs = stage_memory(value, PIPELINE_STAGES[pipeline])
    if needs is None:
        return []
    lines = []
    for stage, parts in needs.items():
        line = f"{stage.replace('_', ' ')}: about {gib(parts['total'])} a GPU, on {value(f'{stage}_accelerator_type')}"
        replicas = value(f"{stage}_replica_count") or 1
        if replicas > 1:
            line += f", {replicas} machines of {_replica_machine(value, stage)}"
        lines.append(line)
    return lines


def _check_machines(value, stages: dict[str, str]) -> list[str]:
    """A stage whose accelerator cannot hold it, with the estimate and the smallest accelerator that can."""
    from rlhf.models.memory import SHARDING, fits, gib, smallest_fitting

    needs = stage_memory(value, stages)
    if needs is None:
        return []
    problems = []
    for stage, parts in needs.items():
        name, needed = f"{stage}_accelerator_type", parts["total"]
        if value(name) not in VERTEX_GPUS or fits(value(name), needed):
            continue
        best = smallest_fitting(needed)
        remedy = (f"the smallest that holds it is {best}" if best else
                  "no single GPU holds it; lower the batch or micro-batch sizes or turn gradient checkpointing on"
                  + (f", or shard its weights over several GPUs ({SHARDING[stage]})"
                     if stage in SHARDING and not value(SHARDING[stage]) else ""))
        detail = ", ".join(f"{part} {gib(size)}" for part, size in parts.items() if part != "total")
        problems.append(f"{name}={value(name)!r}: the {stage.replace('_', ' ')} stage needs about {gib(needed)} "
                        f"a GPU for {value('large_model_reference')} ({detail}); {remedy}")
    return problems


def _check_vertex(value, stages: dict[str, str]) -> list[str]:
    problems = []
    if str(value("accelerator_type")).upper() != "GPU":
        problems.append(f"accelerator_type={value('accelerator_type')!r}: this pipeline's stages run on GPUs (its "
                        "image has PyTorch for CUDA, not torch_xla for TPUs); use GPU and choose the GPU per stage "
                        "with *_accelerator_type")
    for name in DATASET_PARAMETERS:
        uri = value(name) or ""
        if uri and not uri.startswith("gs://"):
            problems.append(f"{name}={uri!r}: Vertex AI reads datasets from gs:// URIs; upload it and pass the URI")
    checkpoint = value("model_checkpoint") or ""
    if checkpoint and not checkpoint.startswith("gs://"):
        problems.append(f"model_checkpoint={checkpoint!r}: a local directory is not visible to Vertex AI; copy it "
                        "to gs://BUCKET/DIR and pass that")
    for stage in stages:
        kind, count = value(f"{stage}_accelerator_type"), value(f"{stage}_accelerator_count")
        if kind not in VERTEX_GPUS:
            problems.append(f"{stage}_accelerator_type={kind!r}: not a GPU the image can use; one of "
                            f"{', '.join(VERTEX_GPUS)}")
        if count not in (1, 2, 4, 8):
            problems.append(f"{stage}_accelerator_count={count!r}: must be 1, 2, 4 or 8")
        for limit, parse in (("cpu_limit", cpu_count), ("memory_limit", memory_bytes)):
            try:
                parse(value(f"{stage}_{limit}"))
            except UserError as error:
                problems.append(f"{stage}_{limit}={error}")
    problems += _check_machines(value, stages)
    if value("deploy_model") and not value("model_display_name"):
        problems.append("deploy_model=True: needs model_display_name (the model is uploaded, then deployed)")
    return problems


def _check_replicas(value, stages: list[str]) -> list[str]:
    """A stage on several machines runs as a custom job, which names its machine type: one must carry the
    stage's GPUs, CPUs and memory."""
    problems = []
    for stage in stages:
        if value(f"{stage}_replica_count") > 1:
            try:
                _replica_machine(value, stage)
            except UserError as error:
                problems.append(f"{stage}_replica_count={value(f'{stage}_replica_count')}: {error}")
    return problems


def _replica_machine(value, stage: str) -> str:
    """The machine type each replica of a stage on several machines runs on."""
    return machine_type(*(value(f"{stage}_{name}") for name in MACHINE_SETTINGS))
