"""One definition per setting: the pipeline's parameters map onto the stages' config dataclasses, with the
same defaults, and the stages' own checks run on them before anything runs."""

import dataclasses
import subprocess
import sys

import pytest

from rlhf.cli import build_parser
from rlhf.data.config import DataConfig
from rlhf.evaluation.config import InferenceConfig
from rlhf.labeling.config import CandidateConfig
from rlhf.pipeline.compiler import PIPELINE_YAML
from rlhf.pipeline.local_run import LOCAL_DEFAULTS
from rlhf.pipeline.parameters import (
    ParameterError,
    pipeline_defaults,
    pipeline_parameters,
    resolve_parameters,
    stage_configs,
)
from rlhf.reward.config import RewardTrainingConfig
from rlhf.rl.config import PPOConfig
from rlhf.settings import PLAIN_TEXT, RUN_OPTIONS
from tests import compiled

STAGES = [("train-reward-model", RewardTrainingConfig, "reward_model"),
          ("train-policy", PPOConfig, "reinforcement_learning")]
# The commands that generate: settings the pipeline has go by its names, the sampling options by their own.
GENERATING = [("infer", InferenceConfig, {"sampling_strategy", "temperature", "top_p"}),
              ("generate-candidates", CandidateConfig, {"temperatures", "top_p", "max_attempts"})]


def command_flags(command: str) -> dict[str, str]:
    """The flags of a subcommand of `rlhf` (a flag's first long name: `--x` of `--x/--no-x`), each with the
    attribute it sets."""
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    return {[o for o in action.option_strings if o.startswith("--")][0]: action.dest
            for action in subcommands[command]._actions if action.dest != "help"}


def test_pipeline_defaults_equal_the_stage_dataclasses_defaults():
    for config, names in stage_configs(pipeline_defaults().get):
        fresh = type(config)()
        differing = {names.get(f.name, f.name): (getattr(config, f.name), getattr(fresh, f.name))
                     for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(fresh, f.name)}
        assert not differing, f"{type(config).__name__}: pipeline default vs dataclass default {differing}"


@pytest.mark.parametrize("task,settings,_", STAGES)
def test_every_parameter_reaches_its_own_field_in_the_compiled_pipeline(task, settings, _):
    spec = compiled.load(PIPELINE_YAML)
    # Each field is the stage's input of the same name, fed by the pipeline parameter that names it, on one
    # machine and on several; the steps come resolved from steps or epochs.
    for runs in (task, f"{task}-on-replicas"):
        given = compiled.tasks(spec)[runs][1]["inputs"]["parameters"]
        fed = {field: compiled.source(spec, runs, field).get("componentInputParameter")
               for field in settings.parameter_names if field in given and field != "train_steps"}
        assert fed == {field: name for field, name in settings.parameter_names.items() if field != "train_steps"}
        assert compiled.source(spec, runs, "train_steps")["taskOutputParameter"]["producerTask"] == "resolve-steps"
        assert compiled.source(spec, runs, PLAIN_TEXT) == {"componentInputParameter": PLAIN_TEXT}
    assert set(settings.parameter_names.values()) <= set(spec["root"]["inputDefinitions"]["parameters"])


@pytest.mark.parametrize("command,settings,prefix", STAGES)
def test_the_cli_and_the_pipeline_set_the_same_settings_under_the_same_names(command, settings, prefix):
    flags = command_flags(command)
    fields = {field.name for field in dataclasses.fields(settings)}
    setting_flags = {flag.removeprefix("--").replace("-", "_") for flag, dest in flags.items()
                     if dest in fields or dest == PLAIN_TEXT or dest.endswith(("_train_epochs", "_train_steps"))}
    setting_flags -= set(RUN_OPTIONS)
    parameters = set(pipeline_parameters())
    stage_parameters = {*settings.parameter_names.values(), PLAIN_TEXT, f"{prefix}_train_epochs"}
    assert setting_flags == stage_parameters and stage_parameters <= parameters
    # Every field is a setting both set, the chat-template choice (--plain-text), or a run option of the CLI's.
    run_options = fields - set(settings.parameter_names) - {"use_chat_template"}
    assert run_options <= set(RUN_OPTIONS) and not run_options & parameters
    assert {f"--{option.replace('_', '-')}" for option in run_options} <= set(flags)


@pytest.mark.parametrize("task,settings,not_inputs", [
    ("validate-datasets", DataConfig, ()),
    # The instruction and chat template come with the policy (what it was trained with); no seed: greedy.
    ("bulk-inference", InferenceConfig, ("instruction", "seed")),
    ("bulk-inference-2", InferenceConfig, ("instruction", "seed")),
])
def test_the_data_and_inference_steps_get_their_settings_from_the_parameters_that_name_them(task, settings,
                                                                                          not_inputs):
    spec = compiled.load(PIPELINE_YAML)
    given = compiled.tasks(spec)[task][1]["inputs"]["parameters"]  # bulk inference: in its one-machine branch
    fed = {field: compiled.source(spec, task, field)["componentInputParameter"] for field in settings.parameter_names
           if field in given}
    assert fed == {field: name for field, name in settings.parameter_names.items() if field not in not_inputs}


@pytest.mark.parametrize("command,settings,own", GENERATING)
def test_the_generating_commands_set_the_pipeline_settings_under_its_names(command, settings, own):
    flags = command_flags(command)
    fields = {field.name for field in dataclasses.fields(settings)}
    setting_flags = {flag.removeprefix("--").replace("-", "_") for flag, dest in flags.items()
                     if dest in fields or dest == PLAIN_TEXT}
    assert setting_flags - set(RUN_OPTIONS) == {*settings.parameter_names.values(), PLAIN_TEXT, *own}
    assert set(settings.parameter_names.values()) <= set(pipeline_parameters())
    # Every field is a pipeline setting, the chat-template choice, a sampling option or a run option.
    assert fields - set(settings.parameter_names) - {"use_chat_template"} - own <= set(RUN_OPTIONS)


@pytest.mark.parametrize("command,settings,_", STAGES + GENERATING + [("validate", DataConfig, None)])
def test_the_cli_flags_take_the_dataclass_defaults_and_docs(command, settings, _):
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    actions = {action.dest: action for action in subcommands[command]._actions}
    docs = settings.field_docs()
    for field in dataclasses.fields(settings):
        if field.name in ("train_steps", "use_chat_template") or actions[field.name].default is None:
            continue  # steps or epochs; --plain-text; a default from the input artifact (the instruction)
        assert actions[field.name].default == field.default, field.name
        assert actions[field.name].help.replace("%%", "%").startswith(docs[field.name]), field.name  # as printed
    assert len(docs) == len(dataclasses.fields(settings))


@pytest.mark.parametrize("assignments,phrase", [
    (["reinforcement_learning_minibatch_size=12"],
     "reinforcement_learning_minibatch_size 12 must be a multiple of reinforcement_learning_micro_batch_size 8"),
    (["reinforcement_learning_batch_size=64", "reinforcement_learning_micro_batch_size=24",
      "reinforcement_learning_minibatch_size=32"], "must be a multiple of reinforcement_learning_micro_batch_size 24"),
    (["reinforcement_learning_batch_size=64", "reinforcement_learning_micro_batch_size=16",
      "reinforcement_learning_minibatch_size=8"], "reinforcement_learning_minibatch_size 8 must be a multiple"),
    (["policy_lora_dim=0"], "reinforcement learning: policy_lora_dim 0 must be at least 1: the reference model"),
    (["reward_lora_dim=-1"], "reward model: reward_lora_dim -1 must be 0"),
    (["reward_lora_dim=0", "reward_model_shard_weights=true"],
     "reward model: reward_model_shard_weights True shards frozen weights, and reward_lora_dim 0 trains them all"),
    (["temperature=0"], "reinforcement learning: temperature 0.0 must be above 0"),
    (["reinforcement_learning_shard_weights=true", "export_merged_model=true"],
     "export_merged_model True: a merged copy needs the whole base model in one process"),
    (["inference_batch_size=0"], "inference: inference_batch_size 0 must be at least 1"),
    (["eval_fraction=0"], "data: eval_fraction 0.0 must be above 0 and below 1"),
    (["on_invalid=drop"], "data: on_invalid drop must be fail or skip"),
])
def test_settings_that_would_fail_in_a_stage_are_refused_before_any_stage_runs(assignments, phrase):
    with pytest.raises(ParameterError, match=phrase):
        resolve_parameters(None, assignments, LOCAL_DEFAULTS)


def test_the_local_defaults_pass_every_stage_check():
    resolve_parameters(None, [], LOCAL_DEFAULTS)


def test_the_settings_and_the_cli_parser_load_without_torch():
    # The pipeline compiles, and `rlhf --help` answers, without loading torch (seconds on a small machine).
    code = ("import sys\nfrom rlhf.cli import build_parser\nbuild_parser()\n"
            + "".join(f"import rlhf.{room}.config\n" for room in ("data", "reward", "rl", "evaluation", "labeling"))
            + "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
