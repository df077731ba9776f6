
import pytest
import torch
from safetensors.torch import load_file

from rlhf.models.loading import add_lora, load_backbone, pick_placement
from rlhf.reward.model import RewardModel, load_reward_model, score_packed
from rlhf.reward.packing import pack
from rlhf.reward.training import train_reward_model
from rlhf.training.batching import batch_indices
from rlhf.training.checkpoints import CheckpointMismatch
from rlhf.training.loop import CHECKPOINT_DIR
from tests.conftest import marker_pairs
from tests.conftest import reward_config as config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    rows = marker_pairs(96)
    output = tmp_path_factory.mktemp("reward-model")
    metrics = train_reward_model(config(), rows[:80], rows[80:], str(tiny_model_dir), output)
    return output, metrics, rows


def test_learns_a_learnable_preference(trained):
    output, metrics, _ = trained
    assert metrics["eval_pairs"] == 16
    assert metrics["eval_accuracy"] >= 0.95
    assert metrics["final_train_accuracy"] >= 0.95
    assert metrics["eval_mean_margin"] > 1.0


def test_loss_decreases_and_tensorboard_has_the_vertex_scalar_names(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, metrics, _ = trained
    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    assert {"rank_loss", "accuracy", "learning_rate", "eval_accuracy"} <= set(events.Tags()["scalars"])
    losses = [e.value for e in events.Scalars("rank_loss")]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    rates = [e.value for e in events.Scalars("learning_rate")]
    assert rates[0] < rates[3] and rates[-1] < rates[3]  # warm-up, then decay
    assert max(rates) == pytest.approx(30 * 1e-4, rel=1e-3)


def test_artifact_is_safetensors_and_json_and_scores_are_normalised(trained, tiny_model_dir):
    output, metrics, rows = trained
    files = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()}
    model_files = {f for f in files if not f.startswith("tensorboard/")}
    assert model_files == {"reward_model.json", "head.safetensors", "metrics.json", "adapter/adapter_config.json",
                           "adapter/adapter_model.safetensors"}
    assert not (output / CHECKPOINT_DIR).exists()
    loaded = load_reward_model(output, pick_placement("cpu"))
    assert loaded.spec.score_std == pytest.approx(metrics["score_std"])
    encoder = loaded.encoder()
    train = rows[:80]
    scores = score_packed(loaded.model, [encoder.encode_prompt(r) for r in train],
                          [[encoder.encode_completion(r["candidate_0"]), encoder.encode_completion(r["candidate_1"])]
                           for r in train], loaded.tokenizer.pad_token_id, 4096)
    normalised = loaded.normalise(scores)
    assert abs(float(normalised.mean())) < 0.05
    assert float(normalised.std()) == pytest.approx(1.0, abs=0.05)


def test_packed_scores_equal_separate_runs_and_ignore_padding(tiny_model_dir):
    placement = pick_placement("cpu")
    torch.manual_seed(0)
    model = RewardModel.with_new_head(add_lora(load_backbone(str(tiny_model_dir), placement), 4), seed=0).eval()
    with torch.no_grad():
        for name, parameter in model.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a non-trivial adapter
    eos = 2
    prompt, winner, loser = [5, 6, 7, 8, 9], [10, 11, eos], [12, 13, 14, 15, eos]
    other_prompt = list(range(20, 60))
    with torch.no_grad():
        alone = model(pack([prompt], [[winner, loser]], pad_id=eos))[0]
        # the same pair in a batch with a much longer one: padded with 32+ pad tokens that equal EOS
        batched = model(pack([prompt, other_prompt], [[winner, loser], [[30, eos], [31, 32, eos]]], pad_id=eos))[0]
        padded_other_way = model(pack([prompt, other_prompt], [[winner, loser], [[30, eos], [31, 32, eos]]],
                                      pad_id=0))[0]
        winner_separately = model(pack([prompt], [[winner]], pad_id=eos))[0, 0]
        loser_separately = model(pack([prompt], [[loser]], pad_id=eos))[0, 0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded_other_way, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, torch.stack([winner_separately, loser_separately]), atol=1e-5, rtol=1e-5)
    assert abs(float(alone[0] - alone[1])) > 1e-3


def test_batches_follow_a_seeded_epoch_order():
    first_epoch = batch_indices(0, 5, 10, seed=3) + batch_indices(1, 5, 10, seed=3)
    assert sorted(first_epoch) == list(range(10))
    assert batch_indices(2, 5, 10, seed=3) != batch_indices(0, 5, 10, seed=3)
    assert batch_indices(0, 5, 10, seed=3) == batch_indices(0, 5, 10, seed=3)
    assert len(batch_indices(0, 25, 10, seed=0)) == 25


def test_resume_after_interruption_gives_the_same_adapter(tiny_model_dir, tmp_path):
    rows = marker_pairs(48, seed=1)
    settings = dict(train_steps=8, checkpoint_every=3)
    straight = train_reward_model(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "a")

    steps_done = []

    def stop_after_five():
        steps_done.append(1)
        return len(steps_done) == 5

    first = train_reward_model(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "b",
                               stop_requested=stop_after_five)
    assert first == {"interrupted": True, "step": 5}
    assert sorted(p.name for p in (tmp_path / "b" / CHECKPOINT_DIR).iterdir()) == ["step-0000003", "step-0000005"]
    resumed = train_reward_model(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "b")
    assert resumed["eval_accuracy"] == straight["eval_accuracy"]
    assert resumed["final_rank_loss"] == pytest.approx(straight["final_rank_loss"], rel=1e-5)
    for name in ("adapter/adapter_model.safetensors", "head.safetensors"):
        a, b = load_file(tmp_path / "a" / name), load_file(tmp_path / "b" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert train_reward_model(config(**settings), rows[:40], rows[40:], str(tiny_model_dir), tmp_path / "b") == resumed


def test_checkpoints_of_another_run_are_refused(tiny_model_dir, tmp_path):
    rows = marker_pairs(24, seed=2)
    stop = iter([False, True])
    train_reward_model(config(train_steps=4), rows[:20], rows[20:], str(tiny_model_dir), tmp_path,
                       stop_requested=lambda: next(stop))
    with pytest.raises(CheckpointMismatch, match="other data or settings"):
        train_reward_model(config(train_steps=4, seed=9), rows[:20], rows[20:], str(tiny_model_dir), tmp_path)


def test_a_non_finite_loss_stops_with_the_step_named(tiny_model_dir, tmp_path):
    rows = marker_pairs(24, seed=3)
    with pytest.raises(FloatingPointError, match="at step 2"):
        train_reward_model(config(learning_rate_multiplier=float("inf")), rows[:20], rows[20:], str(tiny_model_dir),
                           tmp_path)


def test_an_artifact_with_a_pickled_file_is_refused(trained, tmp_path):
    import shutil

    output, _, _ = trained
    copy = tmp_path / "rm"
    shutil.copytree(output, copy)
    (copy / "adapter" / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"pickled files \(adapter/adapter_model.bin\)"):
        load_reward_model(copy, pick_placement("cpu"))
