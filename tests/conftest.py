"""Fixtures, and the helpers several test modules share (tests never import each other)."""

import os
import random
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from rlhf.reward.config import RewardTrainingConfig
from rlhf.rl.config import PPOConfig
from rlhf.settings import CPU_PRECISION_VARIABLE
from tests.tiny_model import save_tiny_model

# The suite's numbers are float32's on every machine: a training stage on a CPU with AMX would otherwise run in
# bfloat16 (rlhf.settings.cpu_precision); test_precision.py sets the variable where it tests that choice.
os.environ[CPU_PRECISION_VARIABLE] = "float32"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # real data beside the checkout; tests that read it skip without it


def rlhf(*args, cwd=None, env=None, timeout=1800):
    """Run the `rlhf` command line in a child process, as a user would (the timeout only stops a hang)."""
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env} if env else None, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TARGETS = range(3, 100)  # a quarter of the tiny vocabulary


class TargetTokenShare:
    """A known reward: the share of completion tokens drawn from a fixed quarter of the vocabulary."""

    name = "target-token-share"

    def __call__(self, rows, completions):
        return torch.tensor([sum(t in TARGETS for t in c) / len(c) for c in completions])


PROMPTS = [{"input_text": f"post number {i} about a dog"} for i in range(32)]


def load_experiment(name: str, folder: str = "experiments"):
    """A script of experiments/ (or of `folder`, e.g. bench/) as a module, for testing its parts without running
    it; its folder is on the import path, as it is for the script run (scripts import each other's parts)."""
    import importlib.util
    import sys

    folder = str(Path(__file__).parents[1] / folder)
    if folder not in sys.path:
        sys.path.append(folder)
    path = Path(folder) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ppo_config(**changes) -> PPOConfig:
    settings = dict(train_steps=30, batch_size=64, micro_batch_size=32, ppo_minibatch_size=32, ppo_epochs=4,
                    target_sequence_length=4, learning_rate_multiplier=200.0, kl_coeff=0.01, warmup_fraction=0.0,
                    penalize_unfinished=False, checkpoint_every=1000, sample_every=10)
    settings.update(changes)
    return PPOConfig(**settings)


def scalars(output, name):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars(name)], events


def assert_reward_rose(output, steps: int, by: float = 0.2) -> None:
    """The run in `output` logged `steps` rewards, starting low and ending well above where it started: its
    last five steps' mean reward at least `by` above its first five's."""
    rewards, _ = scalars(output, "reward")
    assert len(rewards) == steps
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3
    assert last > first + by


WORDS = "dog cat sink job pay night post question answer summary short clear kind".split()


def marker_pairs(count: int, seed: int = 0) -> list[dict]:
    """A learnable preference: the candidate ending in 'great' beats the same text ending in 'terrible'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20)))
        stem = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        good, bad = f"{stem} great", f"{stem} terrible"
        choice = rng.randint(0, 1)
        rows.append({"input_text": prompt, "candidate_0": [good, bad][choice], "candidate_1": [bad, good][choice],
                     "choice": choice})
    return rows


def adapted_policy(tiny_model_dir, eos: int):
    """A policy on the tiny model whose adapter moves it (random LoRA B), so the reference (adapter off)
    differs from the policy."""
    from rlhf.models.loading import load_causal_lm, pick_placement
    from rlhf.rl.policy import Policy

    torch.manual_seed(0)
    policy = Policy.create(load_causal_lm(str(tiny_model_dir), pick_placement("cpu")), 4, [eos], eos)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return policy


def reward_config(**changes) -> RewardTrainingConfig:
    settings = dict(train_steps=30, batch_size=16, learning_rate_multiplier=30.0, checkpoint_every=1000,
                    target_sequence_length=32, prompt_sequence_length=64)
    settings.update(changes)
    return RewardTrainingConfig(**settings)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

EVALUATION = {"prompts": 3, "base_mean_reward": -0.2, "tuned_mean_reward": 0.4, "win_rate_vs_base": 2 / 3,
              "win_rate_ci95": [0.33, 1.0], "kl_to_base": 3.2, "base_mean_words": 35.0, "tuned_mean_words": 28.0}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny causal LM saved as a model directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real Cloud Storage emulator on loopback; yields a google-cloud-storage client for it."""
    from gcp_storage_emulator.server import create_server

    from rlhf.data.storage import gcs_client

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    gcs_client.cache_clear()
    try:
        yield gcs_client()
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        gcs_client.cache_clear()


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """A fresh bucket for one test."""
    return gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def unloadable_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's config and tokenizer with weights that are not safetensors data: any stage that
    loads this model fails, and one that does not load it cannot tell it from a good one."""
    directory = tmp_path_factory.mktemp("unloadable-model")
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, directory / file.name)
    (directory / "model.safetensors").write_bytes(b"these bytes are not a safetensors file")
    return directory
