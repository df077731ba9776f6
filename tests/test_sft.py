"""The supervised warm-up before PPO, RLOO and GRPO: `sft_steps` steps on the training pairs' winners."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf.errors import UserError
from rlhf.rl.policy import ADAPTER_DIR
from rlhf.rl.ppo import train_policy
from tests.conftest import PROMPTS, TargetTokenShare, marker_pairs, rlhf, scalars
from tests.conftest import ppo_config as ppo_settings

pytestmark = pytest.mark.slow

PAIRS = marker_pairs(48, seed=2)


def config(**changes):
    settings = dict(sft_steps=12, train_steps=3, batch_size=16, micro_batch_size=8, ppo_minibatch_size=16,
                    ppo_epochs=1, learning_rate_multiplier=300.0, target_sequence_length=8, prompt_sequence_length=64)
    settings.update(changes)
    return ppo_settings(**settings)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same PPO run with and without the warm-up."""
    results = {}
    for sft_steps in (0, 12):
        output = tmp_path_factory.mktemp(f"sft-{sft_steps}")
        results[sft_steps] = (output, train_policy(config(sft_steps=sft_steps), PROMPTS, TargetTokenShare(),
                                                   str(tiny_model_dir), output, sft_rows=PAIRS))
    return results


def test_the_warm_up_learns_the_winners_before_the_first_rollout(runs):
    output, metrics = runs[12]
    losses, _ = scalars(output, "sft_loss")
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0  # nats a token; each step's pairs differ, hence means
    assert metrics["final_sft_loss"] == pytest.approx(losses[-1], rel=1e-5)
    rewards, events = scalars(output, "reward")
    assert [event.step for event in events.Scalars("reward")] == [13, 14, 15]  # PPO's steps follow the warm-up's
    assert metrics["steps"] == 3 and metrics["initial_reward"] == pytest.approx(rewards[0], rel=1e-5)


def test_ppo_starts_from_the_warmed_up_policy(runs):
    """The first rollouts are sampled before any PPO update: with the warm-up they come from a policy already
    away from the base (KL above 0), without it from the base itself (KL 0)."""
    kl_without, _ = scalars(runs[0][0], "kl")
    kl_with, _ = scalars(runs[12][0], "kl")
    assert kl_without[0] == pytest.approx(0.0, abs=1e-4)
    assert kl_with[0] > 0.1
    assert runs[0][1]["final_sft_loss"] is None


def test_a_run_stopped_in_the_warm_up_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    settings = dict(sft_steps=4, train_steps=2, checkpoint_every=2)
    straight = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "a",
                            sft_rows=PAIRS)
    calls = []
    first = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "b",
                         sft_rows=PAIRS, stop_requested=lambda: calls.append(1) or len(calls) == 3)
    assert first == {"interrupted": True, "step": 3}  # inside the warm-up: its third step of four
    resumed = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "b",
                           sft_rows=PAIRS)
    assert resumed["final_sft_loss"] == pytest.approx(straight["final_sft_loss"], rel=1e-5)
    assert resumed["final_reward"] == pytest.approx(straight["final_reward"], abs=1e-5)
    a, b = (load_file(tmp_path / side / ADAPTER_DIR / "adapter_model.safetensors") for side in "ab")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_bad_warm_ups_are_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match="sft_steps -1 must not be negative"):
        config(sft_steps=-1).validate()
    with pytest.raises(UserError, match="sft_steps needs the training pairs"):
        train_policy(config(sft_steps=4), PROMPTS, TargetTokenShare(), str(tmp_path / "no-such-model"), tmp_path)


def test_the_cli_asks_for_the_pairs_the_warm_up_learns(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in PROMPTS) + "\n")
    result = rlhf("train-policy", "--prompt-dataset", str(prompts), "--reward-model", str(tmp_path / "reward"),
                  "--output-dir", str(tmp_path / "out"), "--sft-steps", "2",
                  "--reinforcement-learning-train-steps", "2")
    assert result.returncode == 2, result.stderr
    assert "--sft-steps learns the training pairs' winners: give --preference-dataset" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
