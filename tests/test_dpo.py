"""DPO: the policy trained on the preference pairs directly, packed as the reward model packs them."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rlhf.models.loading import add_lora, load_causal_lm, pick_placement
from rlhf.reward.packing import pack
from rlhf.rl.dpo import ReferenceLogProbs, dpo_loss, train_dpo
from rlhf.rl.policy import ADAPTER_DIR, Policy, completion_log_probs, read_policy_spec
from rlhf.training.loop import CHECKPOINT_DIR
from tests.conftest import marker_pairs, rlhf, scalars
from tests.conftest import ppo_config as ppo_settings

pytestmark = pytest.mark.slow

EOS = 2


def config(**changes):
    settings = dict(tuning_method="dpo", train_steps=30, batch_size=16, micro_batch_size=8, learning_rate_multiplier=30.0,
                    beta=0.5, warmup_fraction=0.0, prompt_sequence_length=64, target_sequence_length=32,
                    checkpoint_every=1000)
    settings.update(changes)
    return ppo_settings(**settings)


def _lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = add_lora(load_causal_lm(str(tiny_model_dir), pick_placement("cpu")), 4).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a non-trivial adapter
    return model


def _alone(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The completion's summed log-prob from a plain forward pass over prompt + completion."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    log_probs = F.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return log_probs.gather(-1, torch.tensor(completion)[:, None]).sum()


def test_packed_log_probs_equal_separate_runs_and_ignore_padding(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    prompt, winner, loser = [5, 6, 7, 8, 9], [10, 11, EOS], [12, 13, 14, 15, EOS]
    other_prompt, other = list(range(20, 60)), [[30, EOS], [31, 32, EOS]]
    with torch.no_grad():
        packed = completion_log_probs(model, pack([prompt], [[winner, loser]], pad_id=EOS))[0]
        batched = completion_log_probs(model, pack([prompt, other_prompt], [[winner, loser], other], pad_id=EOS))
        separate = torch.stack([_alone(model, prompt, winner), _alone(model, prompt, loser)])
        other_separate = torch.stack([_alone(model, other_prompt, c) for c in other])
        with model.disable_adapter():
            reference = completion_log_probs(model, pack([prompt], [[winner, loser]], pad_id=EOS))[0]
            reference_separate = torch.stack([_alone(model, prompt, winner), _alone(model, prompt, loser)])
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batched[0], separate, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(batched[1], other_separate, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(reference, reference_separate, atol=1e-4, rtol=1e-5)
    assert float((packed - reference).abs().min()) > 1e-2  # the adapter changes both candidates' log-probs


def test_the_loss_is_minus_log_sigmoid_of_the_beta_scaled_log_ratio_margin():
    policy = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    reference = torch.tensor([[-2.0, -2.0], [-1.0, -3.0]])
    losses, rewards = dpo_loss(policy, reference, beta=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[0.5, -0.5], [-0.5, 0.5]]))
    torch.testing.assert_close(losses, -F.logsigmoid(torch.tensor([1.0, -1.0])))


def test_reference_log_probs_are_computed_once_per_pair(tiny_model_dir, tiny_tokenizer):
    from rlhf.data.prompts import PromptEncoder, PromptFormat
    from rlhf.reward.training import encode_pairs

    model = _lora_model(tiny_model_dir)
    policy = Policy(model, None, [EOS], EOS)
    pairs = encode_pairs(marker_pairs(6), PromptEncoder(tiny_tokenizer, PromptFormat(), 64, 32))
    passes = []
    model.get_base_model().get_decoder().register_forward_hook(lambda module, args, output: passes.append(1))
    reference = ReferenceLogProbs(policy, EOS)
    first = reference.of([0, 1, 2], pairs)
    again = reference.of([2, 1, 0, 3], pairs)
    assert len(passes) == 4  # one pass for each of pairs 0-2, then one for pair 3: never two pairs in one pass
    torch.testing.assert_close(again[:3], first.flip(0), rtol=0, atol=0)
    # A pair's reference is the same number whichever pairs were missing with it (a resumed run, another rank).
    torch.testing.assert_close(ReferenceLogProbs(policy, EOS).of([1], pairs)[0], first[1], rtol=0, atol=0)
    with torch.no_grad(), model.disable_adapter():
        fresh = completion_log_probs(model, pack([pairs[3].prompt], [[pairs[3].winner, pairs[3].loser]], EOS))
    torch.testing.assert_close(again[3], fresh[0], rtol=0, atol=0)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    rows = marker_pairs(96)
    output = tmp_path_factory.mktemp("dpo")
    return output, train_dpo(config(), rows[:80], rows[80:], str(tiny_model_dir), output)


def test_dpo_learns_a_preference_the_held_out_implicit_reward_ranks(trained):
    output, metrics = trained
    assert metrics["tuning_method"] == "dpo"
    assert metrics["eval_pairs"] == 16
    assert metrics["eval_accuracy"] >= 0.9  # chance is 0.5; before training every margin is 0
    assert metrics["eval_mean_margin"] > 0.5
    losses, _ = scalars(output, "dpo_loss")
    assert len(losses) == 30
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as the reference
    assert sum(losses[-5:]) / 5 < 0.3
    margins, _ = scalars(output, "reward_margin")
    assert margins[-1] > 0.5


def test_the_artifact_is_a_policy_like_every_other_method_s(trained, tiny_model_dir):
    from peft import PeftModel

    output, metrics = trained
    spec = read_policy_spec(output)
    assert spec.large_model_reference == str(tiny_model_dir)
    assert not (output / CHECKPOINT_DIR).exists()
    base = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    tuned = PeftModel.from_pretrained(base, output / ADAPTER_DIR)
    assert any("lora" in name for name, _ in tuned.named_parameters())
    assert json.loads((output / "metrics.json").read_text())["eval_accuracy"] == metrics["eval_accuracy"]


def test_resume_after_interruption_gives_the_same_adapter(tiny_model_dir, tmp_path):
    rows = marker_pairs(48, seed=1)
    settings = dict(train_steps=8, checkpoint_every=3)
    straight = train_dpo(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "a")
    calls = []

    def stop_after_five():
        calls.append(1)
        return len(calls) == 5

    first = train_dpo(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "b",
                      stop_requested=stop_after_five)
    assert first == {"interrupted": True, "step": 5}
    resumed = train_dpo(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "b")
    assert resumed["eval_accuracy"] == straight["eval_accuracy"]
    assert resumed["final_dpo_loss"] == pytest.approx(straight["final_dpo_loss"], rel=1e-5)
    a, b = (load_file(tmp_path / side / ADAPTER_DIR / "adapter_model.safetensors") for side in "ab")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_after_a_warm_up_the_reference_is_the_warmed_up_policy(tiny_model_dir, tmp_path):
    """As in the DPO paper (the reference is the SFT model): the first DPO step's loss is log 2, every margin 0,
    though the warm-up has moved the policy away from the base."""
    rows = marker_pairs(48, seed=1)
    metrics = train_dpo(config(sft_steps=6, train_steps=4, learning_rate_multiplier=100.0), rows[:40], rows[40:],
                        str(tiny_model_dir), tmp_path)
    sft_losses, _ = scalars(tmp_path, "sft_loss")
    losses, events = scalars(tmp_path, "dpo_loss")
    assert len(sft_losses) == 6 and sft_losses[-1] < sft_losses[0] - 0.5  # the warm-up learned the winners
    assert [event.step for event in events.Scalars("dpo_loss")] == [7, 8, 9, 10]
    assert losses[0] == pytest.approx(0.6931, abs=1e-4)
    assert metrics["sft_steps"] == 6 and metrics["final_sft_loss"] == pytest.approx(sft_losses[-1], rel=1e-5)
    assert not (tmp_path / CHECKPOINT_DIR).exists()  # the warmed-up adapter went with the checkpoints


def test_a_run_resumed_after_the_warm_up_keeps_its_reference(tiny_model_dir, tmp_path):
    rows = marker_pairs(48, seed=1)
    settings = dict(sft_steps=3, train_steps=5, checkpoint_every=2, learning_rate_multiplier=100.0)
    straight = train_dpo(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "a")
    calls = []
    first = train_dpo(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "b",
                      stop_requested=lambda: calls.append(1) or len(calls) == 5)
    assert first == {"interrupted": True, "step": 5}  # two DPO steps after the three of the warm-up
    resumed = train_dpo(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "b")
    assert resumed["final_dpo_loss"] == pytest.approx(straight["final_dpo_loss"], rel=1e-5)
    assert resumed["eval_mean_margin"] == pytest.approx(straight["eval_mean_margin"], rel=1e-5)
    a, b = (load_file(tmp_path / side / ADAPTER_DIR / "adapter_model.safetensors") for side in "ab")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("flags,problem", [(["--dpo-beta", "0"], "--dpo-beta 0.0 must be above 0"),
                                           (["--dpo-beta", "-1"], "--dpo-beta -1.0 must be above 0")])
def test_the_cli_refuses_a_beta_not_above_zero_before_any_model_loads(tmp_path, flags, problem):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in marker_pairs(8)) + "\n")
    result = rlhf("train-policy", "--tuning-method", "dpo", "--preference-dataset", str(data), "--output-dir",
                  str(tmp_path / "out"), "--large-model-reference", str(tmp_path / "no-such-model"),
                  "--reinforcement-learning-train-steps", "2", *flags)
    assert result.returncode == 2, result.stderr
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_dpo_parameters_are_refused_before_the_pipeline_runs():
    from rlhf.pipeline.local_run import LOCAL_DEFAULTS
    from rlhf.pipeline.parameters import resolve_parameters

    with pytest.raises(ValueError, match="reinforcement learning: dpo_beta 0.0 must be above 0"):
        resolve_parameters(None, ["tuning_method=dpo", "dpo_beta=0"], LOCAL_DEFAULTS)
    with pytest.raises(ValueError, match="dpo_warmup_steps 8 is a warm-up before ppo, rloo or grpo; with dpo, set it"):
        resolve_parameters(None, ["tuning_method=dpo"], LOCAL_DEFAULTS)  # the local run's warm-up is PPO's
    resolved = resolve_parameters(None, ["tuning_method=dpo", "dpo_warmup_steps=0", "dpo_beta=0.2"], LOCAL_DEFAULTS)
    assert resolved["dpo_beta"] == 0.2


def test_the_pipeline_runs_dpo_end_to_end_with_the_same_report(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    settings = ["tuning_method=dpo", "dpo_warmup_steps=0", "sft_steps=2", "dpo_beta=0.5",
                "reinforcement_learning_train_epochs=1", "reinforcement_learning_batch_size=16",
                "reinforcement_learning_micro_batch_size=8",
                "reward_model_train_epochs=1", "reward_model_batch_size=16", "target_sequence_length=12",
                "prompt_sequence_length=256", f"large_model_reference={tiny_model_dir}"]
    result = rlhf("run", "--output-dir", str(output), *[a for s in settings for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output / "metrics.json").read_text())
    pairs = metrics["reward_model"]["train_pairs"]  # the same split as the reward model's
    steps = -(-pairs // 16)  # epochs count the training pairs for DPO: ceil(pairs / batch) * 1
    warm_up = 2  # the supervised warm-up comes first, and is then DPO's reference
    assert warm_up > 0 and f"policy (DPO): {warm_up + steps}/{warm_up + steps} steps (100%)" in result.stderr
    policy = metrics["policy"]
    assert policy["tuning_method"] == "dpo" and policy["steps"] == steps and policy["train_pairs"] == pairs
    assert policy["sft_steps"] == warm_up and policy["final_sft_loss"] > 0
    assert policy["eval_pairs"] == metrics["reward_model"]["eval_pairs"] and 0 <= policy["eval_accuracy"] <= 1
    assert {"win_rate_vs_base", "kl_to_base", "rule_pass_rate_tuned"} <= set(metrics["evaluation"])
    page = (output / "report.html").read_text()
    assert "DPO: loss" in page and "DPO: implicit reward margin" in page and "PPO" not in page
