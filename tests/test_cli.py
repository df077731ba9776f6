import json

import pytest

from rlhf.errors import UserError
from rlhf.training.checkpoints import DiskFullError
from tests.conftest import rlhf

pytestmark = pytest.mark.slow


def test_help_lists_the_commands():
    result = rlhf("--help")
    assert result.returncode == 0
    for command in ("steps", "validate", "prepare-model"):
        assert command in result.stdout


def test_every_command_prints_its_help():
    """Each command's help renders (a setting's doc holding a % once broke argparse's formatting of it)."""
    from rlhf.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert len(commands) > 10
    for name, command in commands.items():
        assert command.format_help().startswith("usage: "), name


def test_steps_prints_the_count():
    assert rlhf("steps", "--rows", "3000", "--epochs", "30").stdout.strip() == "1410"
    assert rlhf("steps", "--rows", "2000", "--epochs", "10", "--batch-size", "64").stdout.strip() == "320"
    refused = rlhf("steps", "--rows", "0", "--epochs", "1")
    assert refused.returncode == 2 and "at least 1" in refused.stderr and "Traceback" not in refused.stderr


def test_validate_without_datasets_checks_the_bundled_sample():
    result = rlhf("validate")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["preference"]["rows"] >= 96 and summary["eval"]["rows"] >= 16
    assert "bundled sample" in result.stderr


def test_validate_prints_one_line_per_problem_and_fails(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_bytes(b'{"input_text": "a", "candidate_0": "x", "candidate_1": "y", "choice": "1"}\nnot json\n')
    result = rlhf("validate", "--preference-dataset", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"{bad}:1: 'choice' must be the integer 0 or 1, got a string (\"1\")"
    assert lines[1].startswith(f"{bad}:2: not valid JSON")
    assert "2 problem(s) found" in lines[2]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_validate_skip_policy_and_output_dir(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    rows = [{"input_text": f"p{i}", "candidate_0": "x", "candidate_1": "y", "choice": i % 2} for i in range(4)]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    out = tmp_path / "validated"
    result = rlhf("validate", "--preference-dataset", str(bad), "--on-invalid", "skip", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["preference"]["skipped_rows"] == {"not_json": 1}
    assert sorted(p.name for p in out.iterdir()) == [
        "eval_preference.jsonl", "eval_prompts.jsonl", "prompts.jsonl", "summary.json", "train_preference.jsonl"]
    again = rlhf("validate", "--preference-dataset", str(bad), "--output-dir", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_output_dir_never_holds_the_inputs(tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"input_text": "p", "candidate_0": "x", "candidate_1": "y", "choice": 0}\n')
    result = rlhf("validate", "--preference-dataset", str(data), "--output-dir", str(tmp_path))
    assert result.returncode == 2 and "contains the input" in result.stderr
    assert data.read_text().startswith('{"input_text"')


def test_run_goes_through_the_same_overwrite_check_before_anything_loads(tmp_path):
    """`rlhf run` refuses, with the stages' one check, a directory that holds anything but an earlier run, and
    one that holds its inputs; the files there are left as they were."""
    kept = tmp_path / "notes" / "notes.txt"
    kept.parent.mkdir()
    kept.write_text("mine")
    result = rlhf("run", "--output-dir", str(kept.parent))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"rlhf run: error: --output-dir {kept.parent} is not empty and holds no "
                                     "earlier run to resume; choose a new directory")
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"input_text": "p", "candidate_0": "x", "candidate_1": "y", "choice": 0}\n')
    inside = rlhf("run", "--output-dir", str(tmp_path), "--set", f"preference_dataset={data}")
    assert inside.returncode == 2 and f"--output-dir {tmp_path} contains the input {data}" in inside.stderr
    assert kept.read_text() == "mine" and sorted(p.name for p in kept.parent.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("reference", ["text-bison@001", "./missing-model"])
def test_prepare_model_refuses_unknown_references_clearly(reference, tmp_path):
    result = rlhf("prepare-model", "--large-model-reference", reference, "--cache-dir", str(tmp_path))
    assert result.returncode == 2 and "accepted:" in result.stderr and "Traceback" not in result.stderr


def test_each_stage_runs_from_the_command_line(tiny_model_dir, tmp_path):
    from rlhf.data.datasets import sample_dataset

    reward_model, policy = tmp_path / "rm", tmp_path / "policy"
    model = ["--prompt-sequence-length", "256", "--target-sequence-length", "12"]
    trained = rlhf("train-reward-model", "--preference-dataset", sample_dataset("preference.jsonl"),
                   "--large-model-reference", str(tiny_model_dir), "--output-dir", str(reward_model),
                   "--reward-model-train-epochs", "1", "--reward-model-batch-size", "16", *model)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads(trained.stdout)["steps"] == 8  # 126 training pairs after holding 3 of 24 prompts out

    evaluated = rlhf("evaluate-reward-model", "--reward-model", str(reward_model),
                     "--preference-dataset", sample_dataset("preference.jsonl"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    report = json.loads(evaluated.stdout)
    # The longer candidate (in characters) wins 66 pairs and one pair ties, which counts as half.
    assert report["pairs"] == 144 and report["length_baseline_accuracy"] == 66.5 / 144
    assert {"accuracy", "mean_margin", "model_prefers_longer", "accuracy_where_shorter_won"} <= set(report)

    other_base = rlhf("train-policy", "--prompt-dataset", sample_dataset("prompts.jsonl"), "--reward-model",
                      str(reward_model), "--output-dir", str(policy), "--large-model-reference", "llama-2-7b")
    assert other_base.returncode == 2 and "must use the same base model" in other_base.stderr

    tuned = rlhf("train-policy", "--prompt-dataset", sample_dataset("prompts.jsonl"), "--reward-model",
                 str(reward_model), "--output-dir", str(policy), "--reinforcement-learning-train-steps", "2",
                 "--reinforcement-learning-batch-size", "4", "--reinforcement-learning-micro-batch-size", "4",
                 "--reinforcement-learning-minibatch-size", "4", *model)
    assert tuned.returncode == 0, tuned.stderr[-2000:]
    assert json.loads(tuned.stdout)["steps"] == 2

    base_out, tuned_out = tmp_path / "base.jsonl", tmp_path / "tuned.jsonl"
    for extra, output in ((["--large-model-reference", str(tiny_model_dir)], base_out),
                          (["--policy", str(policy)], tuned_out)):
        inferred = rlhf("infer", "--eval-dataset", sample_dataset("eval.jsonl"), "--output", str(output), *extra,
                        *model)
        assert inferred.returncode == 0, inferred.stderr[-2000:]
        assert len(output.read_text().splitlines()) == 16
    with_adapter = tmp_path / "adapter.jsonl"
    inferred = rlhf("infer", "--eval-dataset", sample_dataset("eval.jsonl"), "--output", str(with_adapter),
                    "--large-model-reference", str(tiny_model_dir), "--adapter", str(policy / "adapter"), *model)
    assert inferred.returncode == 0, inferred.stderr[-2000:]
    refused = rlhf("infer", "--eval-dataset", sample_dataset("eval.jsonl"), "--output", str(base_out),
                   "--large-model-reference", str(tiny_model_dir))
    assert refused.returncode == 2 and "nothing is overwritten" in refused.stderr

    compared = rlhf("evaluate", "--base-outputs", str(base_out), "--tuned-outputs", str(tuned_out),
                    "--reward-model", str(reward_model), "--policy", str(policy), "--output-dir", str(tmp_path / "eval"))
    assert compared.returncode == 0, compared.stderr[-2000:]
    assert json.loads(compared.stdout)["evaluation"]["prompts"] == 16
    assert (tmp_path / "eval" / "report.html").is_file()


@pytest.mark.parametrize("raised, code, line", [
    (lambda: UserError("prefs.jsonl:3: 'choice' is missing"), 2, "rlhf steps: error: prefs.jsonl:3: 'choice' is missing"),
    (lambda: DiskFullError("no space left writing x; the checkpoint at step 4 is kept"), 1,
     "rlhf steps: failed: DiskFullError: no space left writing x; the checkpoint at step 4 is kept"),
])
def test_what_the_user_can_act_on_is_one_line_and_a_bug_shows_its_traceback(monkeypatch, capsys, raised, code, line):
    from rlhf import cli

    def fails(args):
        raise raised()

    monkeypatch.setattr(cli, "cmd_steps", fails)
    monkeypatch.delenv("RLHF_DEBUG", raising=False)
    assert cli.main(["steps", "--rows", "1", "--epochs", "1"]) == code
    assert capsys.readouterr().err == line + "\n"
    monkeypatch.setenv("RLHF_DEBUG", "1")
    assert cli.main(["steps", "--rows", "1", "--epochs", "1"]) == code
    assert "Traceback (most recent call last)" in capsys.readouterr().err

    def has_a_bug(args):
        return {}["missing key"]

    monkeypatch.setattr(cli, "cmd_steps", has_a_bug)
    monkeypatch.delenv("RLHF_DEBUG")
    with pytest.raises(KeyError):
        cli.main(["steps", "--rows", "1", "--epochs", "1"])
