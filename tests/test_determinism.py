"""The same seed and inputs give the same results twice on the CPU."""

import pytest

from rlhf.reward.training import train_reward_model
from rlhf.rl.ppo import train_policy
from tests.conftest import PROMPTS, TargetTokenShare, marker_pairs, ppo_config, reward_config, scalars

pytestmark = pytest.mark.slow

TIMING_KEYS = {"pairs_per_second", "episodes_per_second"}


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}


def test_reward_model_training_is_deterministic(tiny_model_dir, tmp_path):
    rows = marker_pairs(40, seed=5)
    first, second = (without_timings(train_reward_model(reward_config(train_steps=5), rows[:32], rows[32:],
                                                        str(tiny_model_dir), tmp_path / name)) for name in "ab")
    assert first == second


def test_ppo_is_deterministic(tiny_model_dir, tmp_path):
    first, second = (without_timings(train_policy(ppo_config(train_steps=4), PROMPTS, TargetTokenShare(),
                                                  str(tiny_model_dir), tmp_path / name)) for name in "ab")
    assert first == second
    assert scalars(tmp_path / "a", "reward")[0] == scalars(tmp_path / "b", "reward")[0]
