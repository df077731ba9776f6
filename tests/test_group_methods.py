"""RLOO and GRPO: PPO's loop with a baseline from several samples of the same prompt instead of a value."""

import json

import pytest
import torch

from rlhf.rl.ppo import Experience, group_advantages, group_baseline, train_policy
from rlhf.rl.rollouts import Rollout
from rlhf.training.distributed import ALONE
from rlhf.training.loop import CHECKPOINT_DIR
from tests.conftest import PROMPTS, TargetTokenShare, assert_reward_rose, scalars
from tests.conftest import ppo_config as config

pytestmark = pytest.mark.slow

# PPO's test run (64 rollouts a step) as 16 prompts sampled 4 times each.
GROUPS = dict(batch_size=16, samples_per_prompt=4)


def test_rloo_subtracts_the_mean_of_the_other_samples_of_the_prompt():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(group_baseline(rewards, "rloo"), expected)


def test_grpo_normalises_each_group_and_gives_equal_rewards_no_advantage():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    advantages = group_baseline(rewards, "grpo")
    torch.testing.assert_close(advantages[0].mean(), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(advantages[0].std(), torch.tensor(1.0, dtype=torch.float64), atol=1e-3, rtol=0)
    assert torch.equal(advantages[1], torch.zeros(4, dtype=torch.float64))


def _experience(scores: list[float], kl: list[float]) -> Experience:
    rows, zeros = len(scores), torch.zeros(len(scores), 3)
    rollout = Rollout(torch.zeros(rows, 5, dtype=torch.long), torch.ones(rows, 5, dtype=torch.long),
                      torch.tensor([[1, 1, 0]] * rows), torch.ones(rows, dtype=torch.bool))
    return Experience(rollout, zeros, zeros, zeros, zeros, torch.tensor(scores), torch.tensor(scores),
                      torch.tensor(kl), zeros)


def test_groups_are_consecutive_rollouts_across_micro_batches_held_in_any_order():
    # Two prompts sampled 4 times, in micro-batches of 2 held as numbers 3, 0, 2, 1.
    scores = [[1.0, 2.0], [3.0, 6.0], [0.0, 4.0], [8.0, 0.0]]  # micro-batch 0 | 1 | 2 | 3
    kl = [[0.0, 10.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    numbers = [3, 0, 2, 1]
    held = [_experience(scores[n], kl[n]) for n in numbers]
    group_advantages(held, numbers, config(tuning_method="rloo", samples_per_prompt=4, micro_batch_size=2,
                                           kl_coeff=0.1), ALONE)
    rewards = torch.tensor([[1.0, 2.0 - 1.0, 3.0, 6.0], [0.0, 4.0, 8.0, 0.0]])  # the KL penalty is in the reward
    expected = group_baseline(rewards, "rloo").flatten().view(4, 2)
    for number, experience in zip(numbers, held):
        torch.testing.assert_close(experience.advantages, expected[number][:, None] * torch.tensor([1.0, 1.0, 0.0]))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    results = {}
    for method in ("rloo", "grpo"):
        output = tmp_path_factory.mktemp(method)
        results[method] = (output, train_policy(config(tuning_method=method, **GROUPS), PROMPTS, TargetTokenShare(),
                                                str(tiny_model_dir), output))
    return results


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_each_method_raises_the_known_reward(runs, method):
    output, metrics = runs[method]
    assert_reward_rose(output, 30)
    assert metrics["tuning_method"] == method
    assert 0 < metrics["final_kl"] < 100
    values, _ = scalars(output, "value_loss")
    assert set(values) == {0.0}  # no value is learned


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_a_group_spread_over_micro_batches_resumes_to_the_same_result(tiny_model_dir, tmp_path, method):
    # Groups of 4 over micro-batches of 2: each group's baseline needs rollouts of two micro-batches.
    settings = dict(train_steps=4, checkpoint_every=2, tuning_method=method, batch_size=4, samples_per_prompt=4,
                    micro_batch_size=2, ppo_minibatch_size=8, ppo_epochs=2)
    straight = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "a")
    calls = []
    first = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "b",
                         stop_requested=lambda: calls.append(1) or len(calls) == 2)
    assert first == {"interrupted": True, "step": 2}
    state = json.loads((tmp_path / "b" / CHECKPOINT_DIR / "step-0000002" / "state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 2 * 2 * 2  # steps x epochs x minibatches of the 16 rollouts
    resumed = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "b")
    assert resumed["steps"] == 4
    rewards_a, _ = scalars(tmp_path / "a", "reward")
    rewards_b, _ = scalars(tmp_path / "b", "reward")
    assert rewards_b == pytest.approx(rewards_a, abs=1e-6)
    assert resumed["final_kl"] == pytest.approx(straight["final_kl"], rel=1e-4)


@pytest.mark.parametrize("changes, message", [
    (dict(tuning_method="rloo"), "samples_per_prompt 1 must be at least 2 for rloo"),
    (dict(tuning_method="grpo", samples_per_prompt=1), "samples_per_prompt 1 must be at least 2 for grpo"),
    (dict(tuning_method="sft"), "tuning_method sft must be one of ppo, rloo, grpo, dpo"),
    (dict(samples_per_prompt=0), "samples_per_prompt 0 must be at least 1"),
    (dict(tuning_method="rloo", batch_size=3, samples_per_prompt=3, micro_batch_size=2, ppo_minibatch_size=2),
     "9 rollouts"),
])
def test_bad_group_settings_are_refused_before_any_model_loads(changes, message):
    with pytest.raises(ValueError, match=message):
        config(**changes).validate()
