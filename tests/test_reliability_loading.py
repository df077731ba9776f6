"""Only safetensors and JSON are read from artifacts and models: a pickled file is refused, or left
unread, by every loader, and a model's own Python code never runs.

The pickles here are real: unpickling one creates a marker file, so a loader that unpickled it would
leave the marker behind."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.evaluation.compare import evaluate_run
from rlhf.evaluation.config import InferenceConfig
from rlhf.evaluation.inference import bulk_infer
from rlhf.models.loading import ModelLoadError, load_backbone, load_causal_lm, load_tokenizer, pick_placement
from rlhf.reward.config import RewardTrainingConfig
from rlhf.reward.model import load_reward_model
from rlhf.reward.training import train_reward_model
from rlhf.rl.config import PPOConfig
from rlhf.rl.ppo import train_policy
from rlhf.rl.rewards import RewardModelReward
from tests.conftest import REPO, TargetTokenShare, marker_pairs

pytestmark = pytest.mark.slow

PROMPTS = [{"input_text": f"post number {i} about a dog"} for i in range(4)]


class _Payload:
    """Unpickling this opens (so creates) the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    """A small reward model and a policy tuned against it, as their stages write them."""
    root = tmp_path_factory.mktemp("artifacts")
    rows = marker_pairs(12, seed=4)
    train_reward_model(RewardTrainingConfig(train_steps=2, batch_size=4, prompt_sequence_length=64,
                                            target_sequence_length=16), rows[:10], rows[10:], str(tiny_model_dir),
                       root / "reward-model")
    train_policy(PPOConfig(train_steps=1, batch_size=4, micro_batch_size=4, ppo_minibatch_size=4, ppo_epochs=1,
                           target_sequence_length=4), PROMPTS, TargetTokenShare(), str(tiny_model_dir),
                 root / "policy")
    return root


@pytest.fixture
def planted(artifacts, tmp_path):
    """Copies of the artifacts; `plant(relative path)` puts a pickle there and returns its marker."""
    for name in ("reward-model", "policy"):
        shutil.copytree(artifacts / name, tmp_path / name)
    markers = []

    def plant(relative: str) -> Path:
        marker = tmp_path / f"unpickled-{len(markers)}"
        (tmp_path / relative).write_bytes(pickle.dumps(_Payload(marker)))
        markers.append(marker)
        return marker

    yield tmp_path, plant
    assert not any(marker.exists() for marker in markers), "a pickle was unpickled"


def test_the_marker_pickle_does_run_code_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


REFUSED = "refusing to load an artifact holding pickled files"


@pytest.mark.parametrize("relative", ["reward-model/head.pt", "reward-model/adapter/adapter_model.bin",
                                      "reward-model/training_args.pkl"])
def test_the_reward_model_loaders_refuse_pickles(planted, relative):
    root, plant = planted
    plant(relative)
    placement = pick_placement("cpu")
    for load in (lambda: load_reward_model(root / "reward-model", placement),
                 lambda: RewardModelReward(root / "reward-model", placement)):
        with pytest.raises(ValueError, match=f"{REFUSED} \\({relative.removeprefix('reward-model/')}\\)"):
            load()


@pytest.mark.parametrize("relative", ["policy/adapter/adapter_model.bin", "policy/adapter/optimizer.pt",
                                      "policy/adapter/state.pickle"])
def test_inference_and_evaluation_refuse_a_policy_adapter_holding_pickles(planted, tiny_model_dir, relative):
    root, plant = planted
    plant(relative)
    name = relative.removeprefix("policy/adapter/")
    with pytest.raises(ValueError, match=f"{REFUSED} \\({name}\\)"):
        bulk_infer(PROMPTS, str(tiny_model_dir), InferenceConfig(target_sequence_length=4), root / "policy" / "adapter")
    outputs = [{**row, "prediction": "a dog", "ended": True} for row in PROMPTS]
    with pytest.raises(ValueError, match=f"{REFUSED} \\({name}\\)"):
        evaluate_run(outputs, outputs, root / "reward-model", root / "policy", root / "evaluation", {})
    assert not (root / "evaluation").exists()


def rlhf_together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    started = [subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO) for args in commands]
    outputs = [p.communicate() for p in started]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(started, outputs)]


def test_the_commands_refuse_pickled_artifacts_with_a_clear_message(planted, tmp_path):
    root, plant = planted
    plant("reward-model/adapter/adapter_model.bin")
    plant("policy/adapter/adapter_model.pt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    tuned, inferred = rlhf_together(
        ["train-policy", "--prompt-dataset", str(prompts), "--reward-model", str(root / "reward-model"),
         "--output-dir", str(tmp_path / "tuned"), "--reinforcement-learning-train-steps", "1"],
        ["infer", "--eval-dataset", str(prompts), "--policy", str(root / "policy"),
         "--output", str(tmp_path / "predictions.jsonl")])
    for result, where, name in ((tuned, root / "reward-model", "adapter/adapter_model.bin"),
                                (inferred, root / "policy" / "adapter", "adapter_model.pt")):
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"error: {where}: {REFUSED} ({name}); only safetensors and JSON are read" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "predictions.jsonl").exists()


def test_pickled_weights_beside_a_models_safetensors_are_never_read(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    markers = [tmp_path / "unpickled-weights", tmp_path / "unpickled-arguments"]
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(markers[0])))
    (model / "training_args.bin").write_bytes(pickle.dumps(_Payload(markers[1])))
    load_tokenizer(str(model))
    load_backbone(str(model), pick_placement("cpu"))
    load_causal_lm(str(model), pick_placement("cpu"))
    (model / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no file named model.safetensors"):
        load_causal_lm(str(model), pick_placement("cpu"))
    assert not any(marker.exists() for marker in markers)


MODEL_CODE = """
from pathlib import Path
Path({marker!r}).touch()
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast
class CustomConfig(LlamaConfig): pass
class CustomModel(LlamaModel): config_class = CustomConfig
class CustomLM(LlamaForCausalLM): config_class = CustomConfig
class CustomTokenizer(PreTrainedTokenizerFast): pass
"""


def test_a_models_own_code_never_runs(tiny_model_dir, tmp_path):
    """A model directory that asks for its own Python code (`auto_map`) loads with the library's classes;
    its code would run only with trust_remote_code, which no loader turns on."""
    model, marker = tmp_path / "model", tmp_path / "model-code-ran"
    shutil.copytree(tiny_model_dir, model)
    (model / "custom.py").write_text(MODEL_CODE.format(marker=str(marker)))
    for name, auto_map in (("config.json", {"AutoConfig": "custom.CustomConfig", "AutoModel": "custom.CustomModel",
                                            "AutoModelForCausalLM": "custom.CustomLM"}),
                           ("tokenizer_config.json", {"AutoTokenizer": [None, "custom.CustomTokenizer"]})):
        config = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**config, "auto_map": auto_map}))
    assert type(load_tokenizer(str(model))).__module__.startswith("transformers.")
    assert type(load_backbone(str(model), pick_placement("cpu"))).__name__ == "LlamaModel"
    assert type(load_causal_lm(str(model), pick_placement("cpu"))).__name__ == "LlamaForCausalLM"
    assert not marker.exists()

    # The same directory with trust_remote_code on does run it: the marker is a fair witness.
    modules = tmp_path / "hf-modules"
    trusted = subprocess.run(
        [sys.executable, "-c", f"from transformers import AutoConfig; AutoConfig.from_pretrained({str(model)!r}, "
                               "trust_remote_code=True)"],
        capture_output=True, text=True, env={**os.environ, "HF_MODULES_CACHE": str(modules)})
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.exists()
