"""Training that is killed (SIGKILL: a preempted machine, an OOM kill, a KFP or Vertex retry) picks up
from its last complete checkpoint and ends where an uninterrupted run with the same seed ends; a
half-written checkpoint is never loaded; a full disk stops a run with a clear message and keeps the last
good checkpoint; an output directory of another run is refused. Every command runs as a user runs it, in
its own process, with credentials in its environment that must never reach an output."""

from __future__ import annotations

import errno
import http.server
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.data.datasets import prepare_datasets, write_jsonl
from rlhf.training.checkpoints import STATE, discard_incomplete, is_complete, latest_checkpoint, load_checkpoint
from tests.conftest import REPO, marker_pairs

pytestmark = pytest.mark.slow

REWARD_STEPS, POLICY_STEPS = 150, 8
PROMPTS = [{"input_text": f"post number {i} about a dog and a cat"} for i in range(16)]


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("step-"))


@dataclass
class Secrets:
    """Made-up credentials, as a user's environment would hold real ones."""

    service_account: Path
    private_key_line: str
    private_key_id: str
    access_token: str
    hf_token: str
    token_requests: list

    def strings(self) -> list[str]:
        return [self.private_key_line, self.private_key_id, self.access_token, self.hf_token, "PRIVATE KEY"]


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    """A service-account key file whose token endpoint is a local server refusing every grant."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    requests = []

    class TokenEndpoint(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            requests.append(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenEndpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    key_id = uuid.uuid4().hex + uuid.uuid4().hex[:8]
    account = tmp_path_factory.mktemp("credentials") / "service-account.json"
    account.write_text(json.dumps({
        "type": "service_account", "project_id": "rlhf-test-project", "private_key_id": key_id, "private_key": pem,
        "client_email": "trainer@rlhf-test-project.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"http://127.0.0.1:{server.server_port}/token"}))
    yield Secrets(account, pem.splitlines()[2], key_id, f"ya29.{uuid.uuid4().hex}{uuid.uuid4().hex}",
                  f"hf_{uuid.uuid4().hex}", requests)
    server.shutdown()


class Cli:
    """`rlhf` commands in their own processes; their stdout and stderr are kept as files, like logs."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
        for stream, suffix in (("stdout", "out"), ("stderr", "err")):
            if stream not in popen:
                popen[stream] = open(self.logs / f"{name}.{suffix}", "w")
        process = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], env=env or self.env, cwd=REPO, **popen)
        process.name = name
        return process

    def finish(self, process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
        process.wait(timeout)
        for stream in (process.stdout, process.stderr):
            if stream:
                stream.close()
        return subprocess.CompletedProcess(process.args, process.returncode,
                                           (self.logs / f"{process.name}.out").read_text(),
                                           (self.logs / f"{process.name}.err").read_text())

    def run(self, name: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
        return self.finish(self.start(name, args, env))

    def run_together(self, commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
        started = [self.start(name, args) for name, args in commands.items()]
        return {process.name: self.finish(process) for process in started}


def wait_for_checkpoint(process: subprocess.Popen, checkpoints: Path, at_least: int, timeout: float = 300) -> Path:
    """The newest complete checkpoint once one of step `at_least` or later exists; the process still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.name} ended (exit {process.returncode}) before step {at_least}"
        latest = latest_checkpoint(checkpoints)
        if latest is not None and step_of(latest) >= at_least:
            return latest
        time.sleep(0.005)
    raise AssertionError(f"{process.name}: no checkpoint of step {at_least} within {timeout} s")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"{process.name} had already ended (exit {process.returncode})"


def reward_model_command(tiny_model_dir: Path, preference: str, output: Path, *extra: str) -> list[str]:
    return ["train-reward-model", "--preference-dataset", preference, "--large-model-reference", str(tiny_model_dir),
            "--output-dir", str(output), "--reward-model-train-steps", str(REWARD_STEPS), "--reward-model-batch-size", "8",
            "--checkpoint-every", "10", "--prompt-sequence-length", "64", "--target-sequence-length", "32",
            "--reward-model-learning-rate-multiplier", "30", *extra]


def policy_command(prompts: str, reward_model: Path, output: Path) -> list[str]:
    return ["train-policy", "--prompt-dataset", prompts, "--reward-model", str(reward_model),
            "--output-dir", str(output), "--reinforcement-learning-train-steps", str(POLICY_STEPS),
            "--reinforcement-learning-batch-size", "4", "--reinforcement-learning-micro-batch-size", "4",
            "--reinforcement-learning-minibatch-size", "4", "--reinforcement-learning-ppo-epochs", "1",
            "--checkpoint-every", "1", "--target-sequence-length", "6", "--prompt-sequence-length", "64",
            "--no-penalize-unfinished"]


def scalars(run: Path, name: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(name)]


def assert_same_tensors(expected: Path, got: Path) -> None:
    a, b = load_file(expected), load_file(got)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


def assert_same_series(expected: list, got: list) -> None:
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5, abs=1e-6)


def assert_same_reward_model(expected: Path, got: Path) -> None:
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (expected, got))
    assert b["fingerprint"] == a["fingerprint"] and b["eval_accuracy"] == a["eval_accuracy"]
    for key in ("final_rank_loss", "final_train_accuracy", "eval_rank_loss", "eval_mean_margin", "score_mean",
                "score_std"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for name in ("adapter/adapter_model.safetensors", "head.safetensors"):
        assert_same_tensors(expected / name, got / name)
    assert_same_series(scalars(expected, "rank_loss"), scalars(got, "rank_loss"))
    assert len(scalars(got, "rank_loss")) == REWARD_STEPS
    assert not (got / "checkpoints").exists()


def assert_same_policy(expected: Path, got: Path) -> None:
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (expected, got))
    assert b["fingerprint"] == a["fingerprint"]
    for key in ("final_reward", "final_kl", "initial_reward", "final_ended_share"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert_same_tensors(expected / adapter, got / adapter)
    assert_same_series(scalars(expected, "reward"), scalars(got, "reward"))
    assert len(scalars(got, "reward")) == POLICY_STEPS


def leave_half_written_checkpoints(checkpoints: Path, kept: Path) -> list[Path]:
    """What a kill during a save leaves (files but no state.json yet), and what a copy cut short leaves (a
    state.json, and a file shorter than it says): both after the last complete checkpoint."""
    step = step_of(kept)
    killed_while_saving = checkpoints / f"step-{step + 1:07d}"
    shutil.copytree(kept, killed_while_saving)
    (killed_while_saving / STATE).unlink()
    (killed_while_saving / f".{STATE}.partial").write_text('{"step": ')
    cut_short = checkpoints / f"step-{step + 2:07d}"
    shutil.copytree(kept, cut_short)
    state = json.loads((cut_short / STATE).read_text())
    (cut_short / STATE).write_text(json.dumps({**state, "step": step + 2}))
    for leftover in (killed_while_saving, cut_short):
        weights = leftover / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert latest_checkpoint(checkpoints) == kept
    return [killed_while_saving, cut_short]


@dataclass
class Runs:
    root: Path
    cli: Cli
    preference: str
    prompts: str
    reward_model: Path
    reward_model_resumed: Path
    reward_model_kept: Path
    reward_model_leftovers: list
    reward_model_resume: subprocess.CompletedProcess
    policy: Path
    policy_resumed: Path
    policy_kept: Path
    policy_resume: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def runs(tiny_model_dir, gcs_emulator, secrets, tmp_path_factory) -> Runs:
    """Each stage once straight through and once killed mid-run and run again, side by side.

    The straight reward model reads its data from gs:// (the emulator), the interrupted one from a local
    copy: the same rows, so the same run.
    """
    root = tmp_path_factory.mktemp("runs")
    # One thread each: two runs side by side on a small machine would otherwise spin against each other.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GOOGLE_APPLICATION_CREDENTIALS": str(secrets.service_account),
           "GOOGLE_OAUTH_ACCESS_TOKEN": secrets.access_token, "HF_TOKEN": secrets.hf_token}
    cli = Cli(env, root / "cli-logs")
    rows = "".join(json.dumps(r) + "\n" for r in marker_pairs(48, seed=1))
    preference = root / "preference.jsonl"
    preference.write_text(rows)
    bucket = gcs_emulator.create_bucket(f"runs-{uuid.uuid4().hex[:12]}")
    bucket.blob("data/preference.jsonl").upload_from_string(rows)
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, PROMPTS)

    straight = cli.start("reward-model", reward_model_command(
        tiny_model_dir, f"gs://{bucket.name}/data/preference.jsonl", root / "reward-model"))
    resumed = root / "reward-model-resumed"
    command = reward_model_command(tiny_model_dir, str(preference), resumed)
    interrupted = cli.start("reward-model-killed", command)
    wait_for_checkpoint(interrupted, resumed / "checkpoints", at_least=20)
    kill(interrupted)
    reward_model_kept = latest_checkpoint(resumed / "checkpoints")
    leftovers = leave_half_written_checkpoints(resumed / "checkpoints", reward_model_kept)
    again = cli.start("reward-model-resumed", command)
    results = {"reward-model": cli.finish(straight), "reward-model-resumed": cli.finish(again)}
    for result in results.values():
        assert result.returncode == 0, result.stderr[-3000:]

    policy_resumed = root / "policy-resumed"
    command = policy_command(str(prompts), root / "reward-model", policy_resumed)
    straight = cli.start("policy", policy_command(str(prompts), root / "reward-model", root / "policy"))
    interrupted = cli.start("policy-killed", command)
    wait_for_checkpoint(interrupted, policy_resumed / "checkpoints", at_least=3)
    kill(interrupted)
    policy_kept = latest_checkpoint(policy_resumed / "checkpoints")
    results.update({"policy": cli.finish(straight), "policy-resumed": cli.run("policy-resumed", command)})
    for result in results.values():
        assert result.returncode == 0, result.stderr[-3000:]
    return Runs(root, cli, str(preference), str(prompts), root / "reward-model", resumed, reward_model_kept,
                leftovers, results["reward-model-resumed"], root / "policy", policy_resumed, policy_kept,
                results["policy-resumed"])


def test_a_killed_reward_model_run_resumes_and_ends_as_an_uninterrupted_one(runs):
    kept = runs.reward_model_kept
    assert 20 <= step_of(kept) < REWARD_STEPS
    assert (f"Resuming the reward model from {kept} (step {step_of(kept)} of {REWARD_STEPS})"
            in runs.reward_model_resume.stderr)
    assert_same_reward_model(runs.reward_model, runs.reward_model_resumed)


def test_half_written_checkpoints_are_never_loaded(runs):
    # Both were newer than the checkpoint the run resumed from; loading either would have failed on its
    # truncated weights, or given another result than the uninterrupted run's.
    resume = runs.reward_model_resume.stderr
    assert all(step_of(leftover) > step_of(runs.reward_model_kept) for leftover in runs.reward_model_leftovers)
    assert resume.count("Resuming the reward model from") == 1
    assert f"Resuming the reward model from {runs.reward_model_kept} " in resume
    assert not any(leftover.name in resume for leftover in runs.reward_model_leftovers)
    assert_same_reward_model(runs.reward_model, runs.reward_model_resumed)


def test_a_killed_policy_run_resumes_and_ends_as_an_uninterrupted_one(runs):
    kept = runs.policy_kept
    assert 3 <= step_of(kept) < POLICY_STEPS
    assert f"Resuming the policy from {kept} (step {step_of(kept)} of {POLICY_STEPS})" in runs.policy_resume.stderr
    assert_same_policy(runs.policy, runs.policy_resumed)


SAVE_FOREVER = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch

    from rlhf.training.checkpoints import save_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 4096)  # 16 MB of weights and 32 MB of optimizer state: a save takes a while
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 1024)).sum().backward()
    optimizer.step()
    step = 0
    while True:
        step += 1
        save_checkpoint(Path(sys.argv[1]), step, model, optimizer, {"fingerprint": "run"})
""")


def test_a_process_killed_while_saving_leaves_nothing_that_loads(tmp_path):
    """A real kill in the middle of a save, caught while the optimizer state is not yet written."""
    checkpoints = tmp_path / "checkpoints"
    process = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(checkpoints)], cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    process.name = "the saving process"
    wait_for_checkpoint(process, checkpoints, at_least=1)
    deadline = time.monotonic() + 120
    while not any(d.is_dir() and not (d / "optimizer.safetensors").exists() for d in checkpoints.glob("step-*")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.001)
    kill(process)
    kept = latest_checkpoint(checkpoints)
    interrupted = [d for d in checkpoints.glob("step-*") if not is_complete(d)]
    assert len(interrupted) == 1 and step_of(interrupted[0]) > step_of(kept)
    assert discard_incomplete(checkpoints) == interrupted
    assert not interrupted[0].exists() and latest_checkpoint(checkpoints) == kept

    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 4096)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 1024)).sum().backward()
    optimizer.step()
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    state = load_checkpoint(kept, model, torch.optim.AdamW(model.parameters()), "run")
    assert state["step"] == step_of(kept)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter, saved[name], atol=0, rtol=0)


def test_a_run_killed_before_its_first_checkpoint_runs_again(runs, tiny_model_dir, tmp_path):
    output = tmp_path / "reward-model"
    command = reward_model_command(tiny_model_dir, runs.preference, output, "--checkpoint-every", "1000")
    process = runs.cli.start("reward-model-killed-early", command)
    deadline = time.monotonic() + 300
    while not (output / "tensorboard").exists() and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it wrote anything"
        time.sleep(0.005)
    kill(process)
    assert latest_checkpoint(output / "checkpoints") is None and not (output / "metrics.json").exists()
    again = runs.cli.run("reward-model-after-early-kill", command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_reward_model(runs.reward_model, output)


COMPONENT_RUN = textwrap.dedent("""
    import sys
    from kfp.dsl import Dataset, Metrics, Model
    from rlhf.components.reward_model import train_reward_model

    train_pairs, held_out_pairs, model, output = sys.argv[1:]
    train_reward_model.python_func(
        train_pairs=Dataset(uri=train_pairs), held_out_pairs=Dataset(uri=held_out_pairs),
        large_model_reference=model, train_steps={steps}, batch_size=8, micro_batch_tokens=4096,
        learning_rate_multiplier=30.0, lora_dim=4, warmup_fraction=0.1, weight_decay=0.0, max_grad_norm=1.0,
        normalization_pairs=512, balance_lengths=False, prompt_sequence_length=64, target_sequence_length=32,
        instruction="", plain_text=False, seed=0, gradient_checkpointing=False, shard_weights=False, processes=1,
        huggingface_token_secret="", project="", reward_model=Model(uri=output + "/reward_model"),
        metrics=Metrics(uri=output + "/metrics"))
""").format(steps=REWARD_STEPS)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "preempted"])
def test_a_retried_component_resumes_from_its_checkpoint(runs, tiny_model_dir, tmp_path, stop):
    """A KFP or Vertex retry runs the component again with the same output location. It is trained as
    `rlhf train-reward-model` trained the reference run, so it must end the same. A preempted machine
    gets SIGTERM first: the component checkpoints, then fails, so that the retry happens."""
    data = prepare_datasets(runs.preference)
    train, held_out = tmp_path / "train_pairs", tmp_path / "held_out_pairs"
    write_jsonl(train, data.train_pairs)
    write_jsonl(held_out, data.held_out_pairs)

    def attempt(name: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.err", "w") as log:
            process = subprocess.Popen([sys.executable, "-c", COMPONENT_RUN, str(train), str(held_out),
                                        str(tiny_model_dir), str(tmp_path / "component")],
                                       cwd=REPO, env=runs.cli.env, stdout=subprocess.DEVNULL, stderr=log)
        process.name = f"the component's {name}"
        return process

    first = attempt("first attempt")
    checkpoints = tmp_path / "component" / "reward_model" / "checkpoints"
    wait_for_checkpoint(first, checkpoints, at_least=50)  # the component checkpoints every 50 steps
    if stop == signal.SIGKILL:
        kill(first)
    else:
        first.send_signal(signal.SIGTERM)
        assert first.wait() not in (0, -signal.SIGTERM)
        assert "stopped on request after step" in (tmp_path / "first attempt.err").read_text()
    kept = latest_checkpoint(checkpoints)
    retry = attempt("retry")
    log = tmp_path / "retry.err"
    assert retry.wait() == 0, log.read_text()[-3000:]
    assert f"Resuming the reward model from {kept} (step {step_of(kept)} of {REWARD_STEPS})" in log.read_text()
    assert_same_reward_model(runs.reward_model, tmp_path / "component" / "reward_model")


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a real file system that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root; test_a_file_size_limit_while_saving covers the same path without")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); "
                    "test_a_file_size_limit_while_saving covers the same path without")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    with open(path, "wb", buffering=0) as out:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise


def assert_stopped_cleanly(result: subprocess.CompletedProcess, output: Path, reason: str) -> Path:
    """The run failed with one clear message naming the checkpoint kept, which is complete; nothing
    half-written is left. Returns that checkpoint."""
    checkpoints = output / "checkpoints"
    kept = latest_checkpoint(checkpoints)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "failed: DiskFullError: " in result.stderr and reason in result.stderr, result.stderr[-3000:]
    assert f"the last good checkpoint, {kept}, is kept" in result.stderr
    assert "Traceback" not in result.stderr
    assert all(is_complete(entry) for entry in checkpoints.iterdir()), sorted(checkpoints.iterdir())
    assert not (output / "metrics.json").exists()
    return kept


def test_a_full_disk_while_saving_stops_clearly_and_keeps_the_last_good_checkpoint(runs, tiny_model_dir, small_disk):
    output = small_disk / "reward-model"
    command = reward_model_command(tiny_model_dir, runs.preference, output)
    process = runs.cli.start("reward-model-disk-full", command)
    before = wait_for_checkpoint(process, output / "checkpoints", at_least=20)
    fill(small_disk / "filler")
    kept = assert_stopped_cleanly(runs.cli.finish(process), output, "no space left on the device (disk full)")
    assert step_of(kept) >= step_of(before)

    (small_disk / "filler").unlink()
    resumed = runs.cli.run("reward-model-after-disk-full", command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming the reward model from {kept} (step {step_of(kept)} of {REWARD_STEPS})" in resumed.stderr
    assert_same_reward_model(runs.reward_model, output)


def test_a_file_size_limit_while_saving_stops_clearly_and_keeps_the_last_good_checkpoint(runs, tiny_model_dir,
                                                                                        tmp_path):
    """The same without root: a file-size limit set on the running process makes every later write of a
    file past 4 KiB fail (EFBIG, with SIGXFSZ ignored as a job scheduler may leave it), checkpoints too."""
    output = tmp_path / "reward-model"
    process = runs.cli.start("reward-model-size-limit", reward_model_command(tiny_model_dir, runs.preference, output),
                             preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                             stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    before = wait_for_checkpoint(process, output / "checkpoints", at_least=20)
    assert (before / "trainable.safetensors").stat().st_size > 4096
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (4096, 4096))
    stdout, stderr = process.communicate(timeout=600)
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    kept = assert_stopped_cleanly(result, output, "file too large")
    assert step_of(kept) >= step_of(before)
    for name in ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors"):
        assert load_file(kept / name)
    assert json.loads((kept / STATE).read_text())["step"] == step_of(kept)


def test_an_output_directory_of_another_run_is_refused_and_inputs_are_never_overwritten(runs, tiny_model_dir,
                                                                                        tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(runs.preference, inputs / "preference.jsonl")
    finished = tmp_path / "finished-reward-model"
    shutil.copytree(runs.reward_model, finished)
    before = {p: p.read_bytes() for p in [*inputs.rglob("*"), *finished.rglob("*")] if p.is_file()}
    results = runs.cli.run_together({
        "into-its-inputs": reward_model_command(tiny_model_dir, str(inputs / "preference.jsonl"), inputs),
        "other-seed": reward_model_command(tiny_model_dir, runs.preference, finished, "--seed", "1"),
        "other-stage": policy_command(runs.prompts, runs.reward_model, finished),
        "same-run": reward_model_command(tiny_model_dir, runs.preference, finished),
    })
    assert results["into-its-inputs"].returncode == 2
    assert "is not empty and holds no earlier run to resume" in results["into-its-inputs"].stderr
    for refused in ("other-seed", "other-stage"):
        assert results[refused].returncode == 1, results[refused].stderr[-3000:]
        assert f"{finished} holds the result of another run" in results[refused].stderr
        assert "Traceback" not in results[refused].stderr
    assert results["same-run"].returncode == 0, results["same-run"].stderr[-3000:]
    assert "already holds this reward model; returning it" in results["same-run"].stderr
    assert {p: p.read_bytes() for p in before} == before


def test_no_credential_reaches_logs_metrics_or_reports(runs, secrets, tiny_model_dir, tmp_path):
    # A gs:// read made with the service account: its token request is refused, and the pipeline stops
    # at validation saying so, in its logs too.
    env = {k: v for k, v in runs.cli.env.items() if k != "STORAGE_EMULATOR_HOST"}
    uri = "gs://rlhf-private-bucket/preference.jsonl"
    run = runs.cli.run("run-with-service-account", [
        "run", "--output-dir", str(tmp_path / "run"), "--set", f"preference_dataset={uri}",
        "--set", f"large_model_reference={tiny_model_dir}"], env=env)
    assert run.returncode == 1 and f"{uri}:0: cannot reach Cloud Storage" in run.stderr, run.stderr[-3000:]
    assert secrets.token_requests, "the service account was never used"

    predictions = {side: tmp_path / f"{side}.jsonl" for side in ("base", "tuned")}
    for side, path in predictions.items():
        write_jsonl(path, [{**row, "prediction": f"a {side} summary of post {i}", "ended": True}
                           for i, row in enumerate(PROMPTS)])
    evaluated = runs.cli.run("evaluate", ["evaluate", "--base-outputs", str(predictions["base"]), "--tuned-outputs",
                                          str(predictions["tuned"]), "--reward-model", str(runs.reward_model),
                                          "--policy", str(runs.policy), "--output-dir", str(tmp_path / "evaluation")])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert {"report.html", "report.md", "metrics.json"} <= {p.name for p in (tmp_path / "evaluation").iterdir()}

    searched = [p for root in (runs.root, tmp_path) for p in root.rglob("*") if p.is_file()]
    kinds = {p.suffix or p.name.split(".")[0] for p in searched}
    assert {".log", ".err", ".json", ".html", ".md", ".safetensors"} <= kinds
    assert any(p.name.startswith("events.out.tfevents") for p in searched)
    for path in searched:
        content = path.read_bytes()
        for secret in secrets.strings():
            assert secret.encode() not in content, f"{path} holds a credential"
