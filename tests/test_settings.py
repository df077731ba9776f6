"""One definition per setting: the pipeline's parameters map onto the stages' config dataclasses, with the
same defaults, and the stages' own checks run on them before anything runs."""

import dataclasses

import pytest
import yaml

from rlhf.pipeline.compiler import PIPELINE_YAML
from rlhf.pipeline.local_run import LOCAL_DEFAULTS
from rlhf.pipeline.parameters import (
    POLICY_SETTINGS,
    REWARD_MODEL_SETTINGS,
    ParameterError,
    pipeline_defaults,
    resolve_parameters,
    stage_configs,
)


def test_pipeline_defaults_equal_the_stage_dataclasses_defaults():
    for config, names in stage_configs(pipeline_defaults().get):
        fresh = type(config)()
        differing = {names.get(f.name, f.name): (getattr(config, f.name), getattr(fresh, f.name))
                     for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(fresh, f.name)}
        assert not differing, f"{type(config).__name__}: pipeline default vs dataclass default {differing}"


@pytest.mark.parametrize("task,settings", [("train-reward-model", REWARD_MODEL_SETTINGS),
                                           ("train-policy", POLICY_SETTINGS)])
def test_every_mapped_parameter_reaches_its_stage_in_the_compiled_pipeline(task, settings):
    spec = yaml.safe_load(PIPELINE_YAML.read_text())
    assert set(settings) <= set(spec["root"]["inputDefinitions"]["parameters"])
    given = spec["root"]["dag"]["tasks"][task]["inputs"]["parameters"]
    passed = {value.get("componentInputParameter") for value in given.values()}
    steps = {name for name in settings if name.endswith("_train_steps")}  # resolved from epochs first
    assert set(settings) - steps <= passed
    assert all(name in given for name in ("train_steps",))


@pytest.mark.parametrize("assignments,phrase", [
    (["reinforcement_learning_minibatch_size=12"],
     "reinforcement_learning_minibatch_size 12 must be a multiple of reinforcement_learning_micro_batch_size 8"),
    (["reinforcement_learning_batch_size=64", "reinforcement_learning_micro_batch_size=24",
      "reinforcement_learning_minibatch_size=32"], "must be a multiple of reinforcement_learning_micro_batch_size 24"),
    (["reinforcement_learning_batch_size=64", "reinforcement_learning_micro_batch_size=16",
      "reinforcement_learning_minibatch_size=8"], "reinforcement_learning_minibatch_size 8 must be a multiple"),
    (["policy_lora_dim=0"], "policy_lora_dim=0: must be at least 1: the reference model"),
    (["eval_fraction=0"], "eval_fraction=0.0: must be above 0"),
])
def test_settings_that_would_fail_in_a_stage_are_refused_before_any_stage_runs(assignments, phrase):
    with pytest.raises(ParameterError, match=phrase):
        resolve_parameters(None, assignments, LOCAL_DEFAULTS)


def test_the_local_defaults_pass_every_stage_check():
    resolve_parameters(None, [], LOCAL_DEFAULTS)
