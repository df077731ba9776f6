"""The whole pipeline on the KFP local runner with the tiny model, as `rlhf run` runs it."""

import json
import subprocess
import sys

import pytest

from pipeline.local_run import LOCAL_DEFAULTS, resolve_parameters

TINY_RUN = ["reward_model_train_epochs=1", "reward_model_batch_size=8", "reinforcement_learning_train_steps=2",
            "reinforcement_learning_batch_size=4", "reinforcement_learning_micro_batch_size=4",
            "target_sequence_length=12", "prompt_sequence_length=256"]


def rlhf(*args):
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], capture_output=True, text=True)


def test_parameters_come_from_defaults_then_file_then_set(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("kl_coeff: 0.5\nreward_model_train_epochs: 3\n")
    resolved = resolve_parameters(params, ["kl_coeff=0.2", "instruction=Be brief.", "plain_text=true"])
    assert resolved["kl_coeff"] == 0.2 and resolved["reward_model_train_epochs"] == 3
    assert resolved["instruction"] == "Be brief." and resolved["plain_text"] is True
    assert resolved["preference_dataset"] == LOCAL_DEFAULTS["preference_dataset"]


@pytest.mark.parametrize("assignment,phrase", [
    ("no_such_parameter=1", "unknown parameter(s) no_such_parameter; accepted:"),
    ("reward_model_train_epochs=two", "takes a whole number"),
    ("kl_coeff=high", "takes a number"),
    ("plain_text=maybe", "takes true or false"),
    ("kl_coeff", "expected name=value"),
])
def test_bad_parameters_are_named(assignment, phrase):
    with pytest.raises(ValueError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        resolve_parameters(None, [assignment])


def test_run_goes_end_to_end_and_leaves_report_and_metrics(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    sets = [arg for pair in TINY_RUN + [f"large_model_reference={tiny_model_dir}"] for arg in ("--set", pair)]
    result = rlhf("run", "--output-dir", str(output), *sets)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"Report: {output / 'report.html'}"
    for stage in ("validate-datasets", "train-reward-model", "train-policy", "evaluate"):
        assert f"{stage}: started" in result.stderr and f"{stage}: success in" in result.stderr
        assert (output / "logs" / f"{stage}.log").is_file()
    assert "policy (PPO): 2/2 steps (100%)" in result.stderr  # stage progress reaches the terminal
    assert "bulk inference: 8/8 prompts (100%)" in result.stderr
    metrics = json.loads((output / "metrics.json").read_text())
    assert {"eval_accuracy", "eval_pairs", "final_rank_loss"} <= set(metrics["reward_model"])
    assert {"final_reward", "final_kl", "steps"} <= set(metrics["policy"])
    assert metrics["policy"]["steps"] == 2
    assert {"base_mean_reward", "tuned_mean_reward", "win_rate_vs_base", "kl_to_base", "base_mean_words",
            "tuned_mean_words", "prompts"} <= set(metrics["evaluation"])
    assert metrics["evaluation"]["prompts"] == 8
    page = (output / "report.html").read_text()
    assert page.count("<svg") == 6 and page.count('<td class="prompt">') == 8
    again = rlhf("run", "--output-dir", str(output))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_a_failed_stage_is_named_with_its_log(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    sets = [arg for pair in TINY_RUN + [f"large_model_reference={tiny_model_dir}", "reward_lora_dim=-1"]
            for arg in ("--set", pair)]
    result = rlhf("run", "--output-dir", str(output), *sets)
    assert result.returncode == 1
    log = output / "logs" / "train-reward-model.log"
    assert f"rlhf run: failed: stage 'train-reward-model' failed; its log: {log}" in result.stderr
    assert "lora_dim must be 0 (full fine-tuning) or more" in result.stderr
    assert "Traceback" not in result.stderr.split("its log:")[0]
