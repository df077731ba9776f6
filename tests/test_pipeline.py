import json
import subprocess
import sys

import pytest
import yaml

from pipeline.compiler import PIPELINE_YAML, REPO_ROOT, compile_pipeline


def test_committed_pipeline_yaml_is_fresh(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert fresh.read_text() == PIPELINE_YAML.read_text(), "pipeline.yaml is stale: run `python compile.py`"


def test_compiling_does_not_import_torch(tmp_path):
    code = ("import sys; from pipeline.compiler import compile_pipeline; "
            f"compile_pipeline(__import__('pathlib').Path({str(tmp_path / 'p.yaml')!r})); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_yaml_loads_back_with_its_parameters_and_tasks():
    from kfp.components import load_component_from_file

    component = load_component_from_file(str(PIPELINE_YAML))
    assert component.name == "rlhf-pipeline"
    spec = yaml.safe_load(PIPELINE_YAML.read_text())
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"preference_dataset", "prompt_dataset", "eval_dataset", "reward_model_train_steps",
            "reinforcement_learning_train_steps"} <= set(parameters)
    assert "defaultValue" not in parameters["preference_dataset"]
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"validate-datasets", "resolve-steps", "train-reward-model"}
    assert tasks["resolve-steps"]["dependentTasks"] == ["validate-datasets"]
    assert sorted(tasks["train-reward-model"]["dependentTasks"]) == ["resolve-steps", "validate-datasets"]


@pytest.fixture
def local_runner(tmp_path):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    return tmp_path / "root"


def test_pipeline_runs_on_the_kfp_local_runner(local_runner, tiny_model_dir):
    from pipeline.definition import rlhf_pipeline
    from rlhf.datasets import sample_dataset

    rlhf_pipeline(preference_dataset=sample_dataset("preference.jsonl"), prompt_dataset=sample_dataset("prompts.jsonl"),
                  eval_dataset=sample_dataset("eval.jsonl"), large_model_reference=str(tiny_model_dir),
                  reward_model_train_epochs=2, reward_model_batch_size=8, prompt_sequence_length=128,
                  target_sequence_length=32)
    run_dir = next(local_runner.iterdir())
    outputs = json.loads((run_dir / "resolve-steps" / "executor_output.json").read_text())
    steps = outputs["parameterValues"]
    assert steps == {"reward_model_steps": 12, "reinforcement_learning_steps": 1000}
    train_pairs = (run_dir / "validate-datasets" / "train_pairs").read_text().splitlines()
    assert len(train_pairs) == 42  # 3 of the 24 prompts held out for reward-model accuracy
    reward_model = run_dir / "train-reward-model" / "reward_model"
    assert json.loads((reward_model / "metrics.json").read_text())["steps"] == 12
    assert (reward_model / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_data_stops_the_local_pipeline_at_validation(local_runner, tmp_path):
    from pipeline.definition import rlhf_pipeline

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_text": "x", "candidate_0": "a", "candidate_1": "b", "choice": 5}\n')
    with pytest.raises(RuntimeError):
        rlhf_pipeline(preference_dataset=str(bad))
    run_dir = next(local_runner.iterdir())
    assert not (run_dir / "resolve-steps").exists()
