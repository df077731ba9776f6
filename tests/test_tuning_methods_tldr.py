"""The TL;DR method comparison's settings (experiments/tuning_methods_tldr.py): every method takes the local
run's policy settings, RLOO and GRPO as many rollouts a step as PPO, DPO no warm-up, and a bad `--set` stops it."""

import pytest

from rlhf.pipeline.local_run import LOCAL_DEFAULTS
from tests.conftest import load_experiment

SCRIPT = load_experiment("tuning_methods_tldr")


@pytest.mark.parametrize("method", ["ppo", "rloo", "grpo", "dpo"])
def test_each_method_takes_the_local_runs_settings(method):
    config = SCRIPT.stage_settings(method, [])
    config.validate()
    assert config.tuning_method == method
    assert config.kl_coeff == LOCAL_DEFAULTS["kl_coeff"]
    assert config.learning_rate_multiplier == LOCAL_DEFAULTS["reinforcement_learning_rate_multiplier"]
    assert config.train_steps == LOCAL_DEFAULTS["reinforcement_learning_train_steps"]
    if method == "dpo":
        assert config.dpo_warmup_steps == 0
    else:
        assert config.dpo_warmup_steps == LOCAL_DEFAULTS["dpo_warmup_steps"]
        assert config.rollouts_per_step() == LOCAL_DEFAULTS["reinforcement_learning_batch_size"]


def test_set_reads_numbers_and_text_by_parameter_name():
    config = SCRIPT.stage_settings("rloo", ["reinforcement_learning_train_steps=36",
                                            "reinforcement_learning_warmup_fraction=0.06", "instruction=Be brief."])
    assert (config.train_steps, config.warmup_fraction, config.instruction) == (36, 0.06, "Be brief.")


def test_a_setting_the_stage_does_not_have_stops_it():
    with pytest.raises(SystemExit, match="reward_model_train_epochs is not a setting of the policy stage"):
        SCRIPT.stage_settings("ppo", ["reward_model_train_epochs=2"])
