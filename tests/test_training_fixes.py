"""Fixes to what the trainers learn from: the PPO schedule and value head, the unfinished-completion
penalty, reward normalisation, dropout, and full fine-tuning precision."""

import math
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_placement, stop_token_ids
from rlhf.reward.training import normalisation_sample, train_reward_model
from rlhf.rl.config import BASE_LEARNING_RATE
from rlhf.rl.policy import Policy
from rlhf.rl.ppo import Experience, collect, ppo_losses, train_policy
from rlhf.settings import CPU_PRECISION_VARIABLE
from tests.conftest import PROMPTS, TargetTokenShare, marker_pairs, reward_config, scalars
from tests.conftest import ppo_config as config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("batch,micro,minibatch", [(64, 8, 12), (64, 24, 32), (64, 16, 8)])
def test_minibatches_that_are_not_whole_micro_batches_or_do_not_divide_the_batch_are_refused(batch, micro, minibatch):
    with pytest.raises(ValueError, match="must be a multiple of micro_batch_size"):
        config(batch_size=batch, micro_batch_size=micro, ppo_minibatch_size=minibatch).validate()


def test_the_policy_needs_an_adapter():
    with pytest.raises(ValueError, match="lora_dim 0 must be at least 1: the reference model"):
        config(lora_dim=0).validate()


def test_the_learning_rate_follows_the_real_updates_and_reaches_zero_on_the_last(tiny_model_dir, tmp_path):
    settings = config(train_steps=3, batch_size=8, micro_batch_size=2, ppo_minibatch_size=4, ppo_epochs=2,
                      warmup_fraction=0.0, learning_rate_multiplier=1.0)
    train_policy(settings, PROMPTS, TargetTokenShare(), str(tiny_model_dir), tmp_path)
    rates, _ = scalars(tmp_path, "learning_rate")
    updates, total = settings.updates_per_step(), settings.updates_per_step() * settings.train_steps
    assert updates == 2 * (8 // 4)
    expected = [BASE_LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step * updates / total)) for step in (1, 2, 3)]
    assert rates == pytest.approx(expected, abs=1e-9)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


def rollout_experience(tiny_model_dir) -> tuple[Policy, Experience]:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    policy = Policy.create(model, 4, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    rows = PROMPTS[:4]
    prompts = [tokenizer(r["input_text"])["input_ids"] for r in rows]
    torch.manual_seed(0)
    experience = collect(policy, rows, prompts, TargetTokenShare(), config(target_sequence_length=6))
    return policy, experience


def test_the_value_head_starts_at_zero_and_its_loss_trains_the_head_alone(tiny_model_dir):
    policy, experience = rollout_experience(tiny_model_dir)
    assert torch.count_nonzero(policy.value_head.weight) == 0 and torch.count_nonzero(policy.value_head.bias) == 0
    assert torch.count_nonzero(experience.old_values) == 0
    # With values at 0, the advantages come from the rewards alone.
    assert torch.count_nonzero(experience.advantages) > 0
    adapter = [p for p in policy.model.parameters() if p.requires_grad]
    with torch.no_grad():  # a head that has learned something: a zero head would pass no gradient back anyway
        policy.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))

    ppo_losses(policy, experience, config())["value_loss"].backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in adapter)
    assert torch.count_nonzero(policy.value_head.weight.grad) > 0
    policy.zero_grad(set_to_none=True)
    ppo_losses(policy, experience, config())["policy_loss"].backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in adapter)
    assert policy.value_head.weight.grad is None


@pytest.fixture(scope="module")
def often_ending_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with half its vocabulary listed as end-of-turn ids in its generation config, as gemma
    lists <end_of_turn>: PPO must stop on them, so some completions end and some are cut."""
    import json
    import shutil

    directory = tmp_path_factory.mktemp("often-ending") / "model"
    shutil.copytree(tiny_model_dir, directory)
    path = directory / "generation_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    settings["eos_token_id"] = list(range(3, 120))
    path.write_text(json.dumps(settings))
    return directory


def test_gradient_norms_and_the_scores_of_ended_and_cut_completions_are_logged(often_ending_model_dir, tmp_path,
                                                                               capsys):
    # Scores are shares in [0, 1]: a penalty of 5 pays more than ending ever does, and the run says so.
    train_policy(config(train_steps=2, batch_size=8, micro_batch_size=8, ppo_minibatch_size=8,
                        target_sequence_length=3, penalize_unfinished=True, unfinished_reward=5.0),
                 PROMPTS, TargetTokenShare(), str(often_ending_model_dir), tmp_path)
    _, events = scalars(tmp_path, "reward")
    assert {"policy_grad_norm", "value_grad_norm", "score_finished", "score_unfinished"} <= set(events.Tags()["scalars"])
    ended = [e.value for e in events.Scalars("ended_share")]
    assert all(0 < share < 1 for share in ended)  # the listed ids end completions; the limit cuts the others
    for name in ("score_finished", "score_unfinished"):
        assert all(0.0 <= e.value <= 1.0 for e in events.Scalars(name))  # raw scores, not the penalty
    assert max(e.value for e in events.Scalars("reward")) > 1.0  # the penalty did replace them in the reward
    assert "never ending pays" in capsys.readouterr().err


def test_a_penalty_below_the_scores_of_ended_completions_is_not_warned(often_ending_model_dir, tmp_path, capsys):
    train_policy(config(train_steps=2, batch_size=8, micro_batch_size=8, ppo_minibatch_size=8,
                        target_sequence_length=3, penalize_unfinished=True, unfinished_reward=-5.0),
                 PROMPTS, TargetTokenShare(), str(often_ending_model_dir), tmp_path)
    assert "never ending pays" not in capsys.readouterr().err


def test_rewards_are_normalised_on_a_seeded_sample_of_the_training_pairs():
    pairs = list(range(2000))
    sample = normalisation_sample(pairs, 512, seed=0)
    assert len(sample) == 512 == len(set(sample))
    assert sample != pairs[:512] and max(sample) > 1500  # from the whole file, not its first rows
    assert normalisation_sample(pairs, 512, seed=0) == sample
    assert normalisation_sample(pairs, 512, seed=1) != sample
    assert sorted(normalisation_sample(pairs[:100], 512, seed=0)) == pairs[:100]


def tiny_models_with_dropout():
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

    # OPT calls the functional dropout with `activation_dropout` and drops layers with `layerdrop`; GPT-2 has
    # dropout modules set from its `*_pdrop` settings.
    yield OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16,
                                   dropout=0.5, attention_dropout=0.5, activation_dropout=0.5, layerdrop=0.5,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0))
    yield GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.5,
                                     embd_pdrop=0.5, attn_pdrop=0.5, bos_token_id=1, eos_token_id=2))


@pytest.mark.parametrize("model", list(tiny_models_with_dropout()), ids=lambda m: type(m).__name__)
def test_dropout_is_off_in_training_mode_whatever_the_architecture_calls_it(model):
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        loaded = load_causal_lm(directory, pick_placement("cpu"))
    loaded.train()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_full_fine_tuning_keeps_float32_weights_where_the_device_runs_bfloat16(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_PRECISION_VARIABLE, "bfloat16")
    rows = marker_pairs(24)
    train_reward_model(reward_config(train_steps=2, lora_dim=0, learning_rate_multiplier=0.1), rows[:16], rows[16:],
                       str(tiny_model_dir), tmp_path)
    trained = load_file(next((tmp_path / "backbone").glob("*.safetensors")))
    base = load_file(next(tiny_model_dir.glob("*.safetensors")))
    assert {tensor.dtype for tensor in trained.values()} == {torch.float32}
    moved = changed = 0
    for name, tensor in trained.items():
        original = base.get(f"model.{name}", base.get(name))
        if "layers." in name and original is not None and tensor.ndim == 2:  # not the embedding's unused rows
            moved += int((tensor != original.float()).sum())
            changed += tensor.numel()
    assert changed and moved / changed > 0.9  # at lr 1e-5, nearly every weight moves


def test_a_length_balanced_sample_leaves_length_no_predictive_power():
    from rlhf.reward.training import length_balanced

    rows = [{"input_text": f"p{i}", "candidate_0": "a" * (5 + i % 7), "candidate_1": "b" * 8, "choice": i % 3 % 2}
            for i in range(300)]
    kept = length_balanced(rows, seed=0)
    longer_wins = [len(r[f"candidate_{r['choice']}"]) > len(r[f"candidate_{1 - r['choice']}"]) for r in kept]
    shorter_wins = [len(r[f"candidate_{r['choice']}"]) < len(r[f"candidate_{1 - r['choice']}"]) for r in kept]
    assert sum(longer_wins) == sum(shorter_wins) > 0
    assert len(kept) < len(rows) and all(r in rows for r in kept)
    assert length_balanced(rows, seed=0) == kept and length_balanced(rows, seed=1) != kept
