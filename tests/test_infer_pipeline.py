"""`infer_pipeline`, GCPC's bulk inference without tuning: its compiled form, a run on the KFP local runner
against `rlhf infer` on the same model and checkpoint, bad prompts stopped before a model loads, and its
Vertex AI request."""

import json

import pytest
import yaml

from rlhf.pipeline.compiler import COMPILED, compile_pipeline
from tests import compiled
from tests.conftest import adapted_policy, rlhf

pytestmark = pytest.mark.slow

# GCPC's `infer_pipeline` parameters, with its defaults where it has one.
GCPC_PARAMETERS = {"large_model_reference": None, "prompt_dataset": None, "model_checkpoint": None,
                   "prompt_sequence_length": 512, "target_sequence_length": 64, "sampling_strategy": "greedy",
                   "instruction": None, "project": None, "accelerator_type": "GPU", "location": None,
                   "encryption_spec_key_name": ""}


def test_the_committed_infer_pipeline_yaml_is_fresh_and_has_gcpcs_parameters_and_output(tmp_path):
    fresh = compile_pipeline(tmp_path / "infer_pipeline.yaml", "infer")
    assert fresh.read_text() == COMPILED["infer"].read_text(), "infer_pipeline.yaml is stale: run `python compile.py`"
    spec = yaml.safe_load(fresh.read_text())
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(GCPC_PARAMETERS) <= set(parameters)
    for name, default in GCPC_PARAMETERS.items():
        if default is not None:
            assert parameters[name]["defaultValue"] == default, name
    assert "defaultValue" not in parameters["prompt_dataset"]
    assert set(spec["root"]["outputDefinitions"]["parameters"]) == {"output_prediction_gcs_path"}
    task = compiled.tasks(spec)["infer-prompts"][1]  # in the branch for one machine
    assert compiled.source(spec, "infer-prompts", "processes") == {"componentInputParameter": "inference_accelerator_count"}
    assert task["retryPolicy"]["maxRetryCount"] == 2


def test_the_settings_both_pipelines_take_have_one_default():
    from rlhf.pipeline.parameters import pipeline_defaults

    tuning, inference = pipeline_defaults("rlhf"), pipeline_defaults("infer")
    shared = set(tuning) & set(inference)
    assert len(shared) >= 15
    assert {name: inference[name] for name in shared} == {name: tuning[name] for name in shared}


@pytest.fixture
def local_runner(tmp_path):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    return tmp_path / "root"


@pytest.fixture
def tiny_policy(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A tuned policy artifact on the tiny model, whose adapter moves it away from the base model."""
    from rlhf.rl.policy import PolicySpec, save_policy

    policy = adapted_policy(tiny_model_dir, tiny_tokenizer.eos_token_id)
    spec = PolicySpec(large_model_reference=str(tiny_model_dir), lora_dim=4, prompt_sequence_length=64,
                      target_sequence_length=8, instruction="Summarize.", use_chat_template=False)
    save_policy(policy, spec, tmp_path / "policy", tiny_tokenizer, merged=False)
    return tmp_path / "policy"


def test_the_local_pipeline_writes_what_rlhf_infer_writes_for_the_base_model_and_a_policy(
        local_runner, tiny_model_dir, tiny_policy, tmp_path):
    from rlhf.data.datasets import sample_dataset
    from rlhf.pipeline.definition import infer_pipeline

    prompts = sample_dataset("eval.jsonl")
    settings = dict(prompt_dataset=prompts, target_sequence_length=8, prompt_sequence_length=64)
    for name, checkpoint, flags in (("base", "", ["--large-model-reference", str(tiny_model_dir)]),
                                    ("tuned", str(tiny_policy), ["--policy", str(tiny_policy)])):
        task = infer_pipeline(large_model_reference=str(tiny_model_dir), model_checkpoint=checkpoint, **settings)
        written = task.outputs["output_prediction_gcs_path"]
        expected = tmp_path / f"{name}.jsonl"
        cli = rlhf("infer", "--eval-dataset", prompts, "--output", str(expected), "--target-sequence-length", "8",
                   "--prompt-sequence-length", "64", *flags)
        assert cli.returncode == 0, cli.stderr[-2000:]
        rows = [json.loads(line) for line in open(written)]
        assert rows == [json.loads(line) for line in expected.read_text().splitlines()], name
        assert len(rows) == 16
    # The policy's instruction comes with it.
    assert rows[0]["inputs"]["inputs_pretokenized"].startswith("Summarize.\n")


def test_bad_prompts_and_a_checkpoint_that_is_neither_stop_the_stage_before_a_model_loads(
        local_runner, tiny_model_dir, tmp_path, capfd):
    from rlhf.pipeline.definition import build_infer_pipeline

    infer_pipeline = build_infer_pipeline(retries=0)  # Vertex AI's retries would rerun the failing stage here
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"input_text": "a post"}\n{"text": "no input"}\n')
    with pytest.raises(RuntimeError):
        infer_pipeline(prompt_dataset=str(bad), large_model_reference=str(tiny_model_dir))
    captured = capfd.readouterr()
    assert f"{bad}:2:" in captured.err + captured.out
    bad.write_text('{"input_text": "a post"}\n')
    with pytest.raises(RuntimeError):
        infer_pipeline(prompt_dataset=str(bad), large_model_reference=str(tiny_model_dir), model_checkpoint=str(tmp_path))
    captured = capfd.readouterr()
    assert "neither a tuned policy" in captured.err + captured.out
    assert "Loading weights" not in captured.err + captured.out


def test_submit_infer_sends_gcpcs_parameters_and_refuses_what_vertex_cannot_run():
    sent = rlhf("submit", "--dry-run", "--pipeline", "infer", "--project", "p1", "--pipeline-root", "gs://bucket-x/r",
                "--set", "prompt_dataset=gs://bucket-x/prompts/*.jsonl", "--set", "large_model_reference=llama-2-7b",
                "--set", "model_checkpoint=gs://bucket-x/runs/policy", "--set", "sampling_strategy=temperature_sampling")
    assert sent.returncode == 0, sent.stderr
    body = json.loads(sent.stdout)
    assert body["displayName"] == "infer-pipeline"
    assert body["pipelineSpec"]["pipelineInfo"]["name"] == "infer-pipeline"
    values = body["runtimeConfig"]["parameterValues"]
    assert values["model_checkpoint"] == "gs://bucket-x/runs/policy" and values["project"] == "p1"
    # One llama-2-7b in bfloat16 fits the pipeline's default L4 here; the tuning pipeline's inference machine
    # also holds the reward model for the evaluation, and needs more.
    assert "inference: about 16.4 GiB a GPU, on NVIDIA_L4" in sent.stderr
    assert "inference_accelerator_type" not in values
    refused = rlhf("submit", "--dry-run", "--pipeline", "infer", "--project", "p1", "--pipeline-root",
                   "gs://bucket-x/r", "--set", "prompt_dataset=prompts.jsonl", "--set", "model_checkpoint=policy",
                   "--set", "sampling_strategy=beam")
    assert refused.returncode == 2
    for message in ("prompt_dataset='prompts.jsonl': Vertex AI reads datasets from gs:// URIs",
                    "model_checkpoint='policy': a local directory is not visible to Vertex AI",
                    "sampling_strategy beam must be one of greedy, temperature_sampling"):
        assert message in refused.stderr
    missing = rlhf("submit", "--dry-run", "--pipeline", "infer", "--project", "p1", "--pipeline-root", "gs://bucket-x/r")
    assert missing.returncode == 2 and "prompt_dataset=None: is required" in missing.stderr
