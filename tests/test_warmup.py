"""The warm-ups before PPO, RLOO and GRPO on the training pairs: `sft_steps` supervised steps on their winners,
or `dpo_warmup_steps` DPO steps on them; after either, the KL penalty's reference is the warmed-up policy."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhf.errors import UserError
from rlhf.rl.policy import ADAPTER_DIR, WARMED_UP_ADAPTER
from rlhf.rl.ppo import train_policy
from rlhf.training.checkpoints import WEIGHTS
from rlhf.training.loop import CHECKPOINT_DIR
from tests.conftest import PROMPTS, TargetTokenShare, marker_pairs, rlhf, scalars
from tests.conftest import ppo_config as ppo_settings

pytestmark = pytest.mark.slow

PAIRS = marker_pairs(48, seed=2)


def assert_same_adapters(*runs):
    a, b = (load_file(run / ADAPTER_DIR / "adapter_model.safetensors") for run in runs)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


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
                                                   str(tiny_model_dir), output, train_pairs=PAIRS))
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


def test_ppo_starts_where_the_warm_up_left_the_policy_and_measures_its_kl_from_there(runs):
    """The first rollouts are sampled before any PPO update, from the warmed-up policy, which is also the
    reference: their KL is 0, as it is without a warm-up (reference and policy both the base); PPO's updates
    then move the policy away from it."""
    for sft_steps in (0, 12):
        kl, _ = scalars(runs[sft_steps][0], "kl")
        assert kl[0] == pytest.approx(0.0, abs=1e-4)
        assert max(kl[1:]) > 1e-3
    assert runs[0][1]["final_sft_loss"] is None


class StopAfter:
    """A stop request that comes after `steps` steps."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls == self.steps


def test_the_reference_is_the_adapter_the_warm_up_left_also_after_a_resume(tiny_model_dir, tmp_path):
    """Stopped at the warm-up's last step, then at PPO's first: the reference kept beside the checkpoints is the
    adapter of the warm-up's checkpoint (not the base's zero update), the first PPO step's KL to it is 0, and the
    run resumed from there ends as an uninterrupted one."""
    settings = dict(sft_steps=4, train_steps=3, checkpoint_every=10)
    straight = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "a",
                            train_pairs=PAIRS)
    checkpoints = tmp_path / "b" / CHECKPOINT_DIR
    for step in (4, 5):  # each call stops after its first step but the first, which runs the warm-up's four
        stopped = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "b",
                               train_pairs=PAIRS, stop_requested=StopAfter(4 if step == 4 else 1))
        assert stopped == {"interrupted": True, "step": step}
        if step == 4:
            warmed_up = load_file(checkpoints / "step-0000004" / WEIGHTS)  # the policy's: its adapter is `model.`
    reference = load_file(checkpoints / WARMED_UP_ADAPTER)
    assert reference.keys() and {f"model.{key}" for key in reference} <= set(warmed_up)
    for key in reference:
        torch.testing.assert_close(reference[key], warmed_up[f"model.{key}"], atol=0, rtol=0)
    assert max(float(v.abs().max()) for k, v in reference.items() if "lora_B" in k) > 0  # moved from the base
    kl, _ = scalars(tmp_path / "b", "kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-4)
    resumed = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "b",
                           train_pairs=PAIRS)
    assert resumed["final_kl"] == pytest.approx(straight["final_kl"], abs=1e-6)
    assert resumed["final_reward"] == pytest.approx(straight["final_reward"], abs=1e-6)
    assert_same_adapters(tmp_path / "a", tmp_path / "b")


def test_a_dpo_warm_up_learns_the_pairs_before_the_first_rollout(tiny_model_dir, tmp_path):
    """DPO against the base: its first loss is log 2 (policy and reference both the base), it falls as the
    implicit reward learns to rank the pairs, and PPO's steps follow, measured from the warmed-up policy."""
    metrics = train_policy(config(sft_steps=0, dpo_warmup_steps=8, beta=0.5), PROMPTS, TargetTokenShare(),
                           str(tiny_model_dir), tmp_path, train_pairs=PAIRS)
    losses, events = scalars(tmp_path, "dpo_loss")
    assert [event.step for event in events.Scalars("dpo_loss")] == list(range(1, 9))
    assert losses[0] == pytest.approx(0.6931, abs=1e-4)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1  # each step's pairs differ, hence a mean
    assert metrics["dpo_warmup_steps"] == 8 and metrics["final_dpo_warmup_loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert metrics["sft_steps"] == 0 and metrics["final_sft_loss"] is None
    rewards, events = scalars(tmp_path, "reward")
    assert [event.step for event in events.Scalars("reward")] == [9, 10, 11]
    kl, _ = scalars(tmp_path, "kl")
    assert kl[0] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("warm_up", [dict(sft_steps=3), dict(sft_steps=0, dpo_warmup_steps=3, beta=0.5)])
def test_ppo_rloo_and_grpo_at_equal_rollouts_a_step_start_from_the_same_warm_up(tiny_model_dir, tmp_path, warm_up):
    """RLOO and GRPO split a step's 16 rollouts into 8 prompts sampled twice, PPO into 16 prompts: the warm-up
    takes 16 pairs a step in each, so the three hand their first step the same warmed-up adapter."""
    kept = {}
    for method, prompts_a_step, samples in (("ppo", 16, 1), ("rloo", 8, 2), ("grpo", 8, 2)):
        settings = dict(**warm_up, train_steps=2, tuning_method=method, batch_size=prompts_a_step,
                        samples_per_prompt=samples)
        stopped = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir),
                               tmp_path / method, train_pairs=PAIRS, stop_requested=StopAfter(4))
        assert stopped == {"interrupted": True, "step": 4}  # the first RL step kept the warmed-up adapter
        kept[method] = load_file(tmp_path / method / CHECKPOINT_DIR / WARMED_UP_ADAPTER)
    assert max(float(v.abs().max()) for k, v in kept["ppo"].items() if "lora_B" in k) > 0  # moved from the base
    for method in ("rloo", "grpo"):
        assert kept[method].keys() == kept["ppo"].keys()
        for key in kept["ppo"]:
            torch.testing.assert_close(kept[method][key], kept["ppo"][key], atol=0, rtol=0)


def test_a_run_stopped_in_the_warm_up_resumes_to_the_same_adapter(tiny_model_dir, tmp_path):
    settings = dict(sft_steps=4, train_steps=2, checkpoint_every=2)
    straight = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "a",
                            train_pairs=PAIRS)
    calls = []
    first = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "b",
                         train_pairs=PAIRS, stop_requested=lambda: calls.append(1) or len(calls) == 3)
    assert first == {"interrupted": True, "step": 3}  # inside the warm-up: its third step of four
    resumed = train_policy(config(**settings), PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path / "b",
                           train_pairs=PAIRS)
    assert resumed["final_sft_loss"] == pytest.approx(straight["final_sft_loss"], rel=1e-5)
    assert resumed["final_reward"] == pytest.approx(straight["final_reward"], abs=1e-5)
    assert_same_adapters(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("changes,problem", [
    (dict(sft_steps=-1), "sft_steps -1 must not be negative"),
    (dict(sft_steps=0, dpo_warmup_steps=-1), "dpo_warmup_steps -1 must not be negative"),
    (dict(sft_steps=2, dpo_warmup_steps=2), "sft_steps 2 and dpo_warmup_steps 2: one warm-up or the other"),
    (dict(sft_steps=0, dpo_warmup_steps=2, beta=0.0), "beta 0.0 must be above 0"),
    (dict(sft_steps=0, dpo_warmup_steps=2, tuning_method="dpo"), "dpo_warmup_steps 2 is a warm-up before ppo"),
])
def test_bad_warm_ups_are_refused(changes, problem):
    with pytest.raises(ValueError, match=problem):
        config(**changes).validate()


@pytest.mark.parametrize("warm_up", [dict(sft_steps=4), dict(sft_steps=0, dpo_warmup_steps=4)])
def test_a_warm_up_without_pairs_is_refused_before_any_model_loads(tmp_path, warm_up):
    with pytest.raises(UserError, match="the warm-up .sft_steps, dpo_warmup_steps. needs the training pairs"):
        train_policy(config(**warm_up), PROMPTS, TargetTokenShare(), str(tmp_path / "no-such-model"), tmp_path)


@pytest.mark.parametrize("flag", ["--sft-steps", "--dpo-warmup-steps"])
def test_the_cli_asks_for_the_pairs_the_warm_up_learns(tmp_path, flag):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in PROMPTS) + "\n")
    result = rlhf("train-policy", "--prompt-dataset", str(prompts), "--reward-model", str(tmp_path / "reward"),
                  "--output-dir", str(tmp_path / "out"), flag, "2", "--reinforcement-learning-train-steps", "2")
    assert result.returncode == 2, result.stderr
    assert "the warm-up (--sft-steps, --dpo-warmup-steps) learns the training pairs: give --preference-dataset" in (
        result.stderr)
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
