import subprocess
import sys

import pytest
import yaml

from rlhf.pipeline.compiler import PIPELINE_YAML, compile_pipeline
from tests import compiled
from tests.conftest import REPO as REPO_ROOT

pytestmark = pytest.mark.slow


def test_committed_pipeline_yaml_is_fresh(tmp_path):
    fresh = compile_pipeline(tmp_path / "pipeline.yaml")
    assert fresh.read_text() == PIPELINE_YAML.read_text(), "pipeline.yaml is stale: run `python compile.py`"


def test_compiling_does_not_import_torch(tmp_path):
    code = ("import sys; from rlhf.pipeline.compiler import compile_pipeline; "
            f"compile_pipeline(__import__('pathlib').Path({str(tmp_path / 'p.yaml')!r})); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_compile_py_writes_the_same_yaml_from_a_bare_checkout(tmp_path):
    """`python3 compile.py` where the Python has no kfp and the checkout no .venv: it makes .venv with the
    pinned kfp alone and writes the committed pipeline.yaml."""
    bare = sys._base_executable  # the Python this suite's .venv was made from
    if subprocess.run([bare, "-c", "import kfp"], capture_output=True).returncode == 0:
        pytest.skip(f"{bare} has kfp installed: nothing to bootstrap")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO_ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes((REPO_ROOT / name).read_bytes())
    (tmp_path / "pipeline.yaml").unlink()
    result = subprocess.run([bare, "compile.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / ".venv" / "bin" / "python").exists()
    assert (tmp_path / "pipeline.yaml").read_text() == PIPELINE_YAML.read_text()


def test_yaml_loads_back_with_its_parameters_and_tasks():
    from kfp.components import load_component_from_file

    component = load_component_from_file(str(PIPELINE_YAML))
    assert component.name == "rlhf-pipeline"
    spec = yaml.safe_load(PIPELINE_YAML.read_text())
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"preference_dataset", "prompt_dataset", "eval_dataset", "large_model_reference", "reward_model_train_steps",
            "reinforcement_learning_train_steps", "reward_model_learning_rate_multiplier",
            "reinforcement_learning_rate_multiplier", "kl_coeff", "instruction", "prompt_sequence_length",
            "target_sequence_length"} <= set(parameters)
    assert parameters["kl_coeff"]["defaultValue"] == 0.1
    assert parameters["prompt_sequence_length"]["defaultValue"] == 512
    assert parameters["target_sequence_length"]["defaultValue"] == 64
    assert "defaultValue" not in parameters["preference_dataset"]
    tasks = compiled.tasks(spec)
    stages = {"validate-datasets", "resolve-steps", "train-reward-model", "train-reward-model-on-replicas",
              "train-policy", "train-policy-on-replicas", "bulk-inference", "bulk-inference-2",
              "bulk-inference-on-replicas", "bulk-inference-on-replicas-2", "evaluate", "upload-model", "skip-upload",
              "upload-tensorboard"}
    assert {name for name in tasks if not name.startswith("condition-")} == stages
    assert tasks["resolve-steps"][1]["dependentTasks"] == ["validate-datasets"]
    # Each training stage runs on one machine or on several (a branch each); what comes after takes the
    # artifact of the branch that ran.
    for stage in ("train-reward-model", "train-reward-model-on-replicas"):
        assert compiled.source(spec, stage, "train_steps") == {"taskOutputParameter": {
            "producerTask": "resolve-steps", "outputParameterKey": "reward_model_steps"}}
        assert compiled.producers(spec, stage, "train_pairs") == {"validate-datasets"}
    for stage in ("train-policy", "train-policy-on-replicas"):
        assert compiled.producers(spec, stage, "reward_model") == {"train-reward-model",
                                                                   "train-reward-model-on-replicas"}
    assert compiled.producers(spec, "evaluate", "policy") == {"train-policy", "train-policy-on-replicas"}
    assert compiled.producers(spec, "evaluate", "base_predictions") == {"bulk-inference", "bulk-inference-on-replicas"}
    assert compiled.producers(spec, "evaluate", "tuned_predictions") == {"bulk-inference-2",
                                                                         "bulk-inference-on-replicas-2"}
    # Training, bulk inference and the evaluation run one process per accelerator they are given (the evaluation
    # only to shard its weights).
    for task, count in (("train-reward-model", "reward_model_accelerator_count"),
                        ("train-reward-model-on-replicas", "reward_model_accelerator_count"),
                        ("train-policy", "reinforcement_learning_accelerator_count"),
                        ("train-policy-on-replicas", "reinforcement_learning_accelerator_count"),
                        ("bulk-inference", "inference_accelerator_count"),
                        ("bulk-inference-2", "inference_accelerator_count"),
                        ("bulk-inference-on-replicas", "inference_accelerator_count"),
                        ("evaluate", "inference_accelerator_count")):
        assert compiled.source(spec, task, "processes") == {"componentInputParameter": count}


@pytest.fixture
def local_runner(tmp_path):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    return tmp_path / "root"


def test_bad_data_stops_the_local_pipeline_at_validation(local_runner, tmp_path):
    from rlhf.pipeline.definition import rlhf_pipeline

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_text": "x", "candidate_0": "a", "candidate_1": "b", "choice": 5}\n')
    with pytest.raises(RuntimeError):
        rlhf_pipeline(preference_dataset=str(bad))
    run_dir = next(local_runner.iterdir())
    assert not (run_dir / "resolve-steps").exists()


def test_the_image_installs_the_pinned_torch_and_every_package():
    import re
    import tomllib

    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    pin = next(d for d in project["project"]["dependencies"] if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={pin.removeprefix('torch==')}" in dockerfile
    copied = set(re.findall(r"^COPY (\w+) \1$", dockerfile, re.MULTILINE))
    setuptools = project["tool"]["setuptools"]
    source_dirs = {setuptools["package-dir"].get(p, p.split(".")[0]) for p in setuptools["packages"]}
    assert source_dirs == {"rlhf", "pipeline", "components"} and source_dirs <= copied
    # pipeline/pipeline.yaml, the package data, links to the compiled file at the top of the repository.
    assert re.search(r"^COPY .*\bpipeline\.yaml\b", dockerfile, re.MULTILINE)
    assert "rlhf prepare-model" in dockerfile


def test_local_runs_do_not_retry_failed_stages():
    """The local runner honours retry policies: a deterministic failure, or a Ctrl-C, must not be retried."""
    from google.protobuf import json_format

    from rlhf.pipeline.definition import build_pipeline, rlhf_pipeline

    def retried(pipeline):
        spec = json_format.MessageToDict(pipeline.pipeline_spec)
        return {name for name, (_, task) in compiled.tasks(spec).items() if "retryPolicy" in task}

    assert {"train-reward-model", "train-reward-model-on-replicas", "train-policy", "train-policy-on-replicas",
            "evaluate"} <= retried(rlhf_pipeline)
    assert retried(build_pipeline(retries=0)) == set()
