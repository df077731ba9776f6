"""Vertex AI: submit, schedule, upload and deploy through google-cloud-aiplatform against a loopback
server playing the Vertex API, with real service-account credentials from the environment; dry runs."""

import json
import os

import pytest

from rlhf.pipeline.compiler import PIPELINE_YAML
from tests import compiled
from tests.conftest import rlhf
from tests.vertex_loopback import ACCESS_TOKEN, VertexLoopback, write_service_account

pytestmark = pytest.mark.slow

KEY = "projects/p1/locations/us-central1/keyRings/ring/cryptoKeys/key"
IMAGE = "us-docker.pkg.dev/p1/rlhf/rlhf:test"


def submit_args(bucket: str, *extra: str) -> list[str]:
    return ["--project", "p1", "--location", "us-central1", "--pipeline-root", f"gs://{bucket}/runs",
            "--set", f"preference_dataset=gs://{bucket}/pref/*.jsonl", "--set", f"prompt_dataset=gs://{bucket}/p.jsonl",
            "--set", "reward_model_train_epochs=30", "--set", "kl_coeff=0.05",
            "--label", "team=nlp", "--service-account", "runner@p1.iam.gserviceaccount.com",
            "--encryption-spec-key-name", KEY, "--image", IMAGE, "--no-caching", *extra]


@pytest.fixture
def credentials(tmp_path):
    """Application Default Credentials: a service-account key file whose token endpoint is the loopback."""
    with VertexLoopback() as vertex:
        text, pem = write_service_account(tmp_path / "key.json", f"{vertex.url}/token")
        yield vertex, {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "key.json")}, pem


def secret_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if line and "PRIVATE KEY" not in line]


def test_submit_dry_run_prints_the_job_body_and_sends_nothing():
    result = rlhf("submit", "--dry-run", *submit_args("bucket-x"))
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["displayName"] == "rlhf-pipeline"
    assert body["labels"]["team"] == "nlp"
    assert body["serviceAccount"] == "runner@p1.iam.gserviceaccount.com"
    assert body["encryptionSpec"] == {"kmsKeyName": KEY}
    assert body["runtimeConfig"]["gcsOutputDirectory"] == "gs://bucket-x/runs"
    values = body["runtimeConfig"]["parameterValues"]
    assert values["preference_dataset"] == "gs://bucket-x/pref/*.jsonl"
    assert values["reward_model_train_epochs"] == 30 and values["kl_coeff"] == 0.05
    assert values["project"] == "p1" and values["encryption_spec_key_name"] == KEY
    assert values["serving_container_image"] == IMAGE
    spec = body["pipelineSpec"]
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {IMAGE}
    assert all(task["cachingOptions"].get("enableCache") is not True for _, task in compiled.tasks(spec).values())
    resources = spec["deploymentSpec"]["executors"]["exec-train-policy"]["container"]["resources"]
    assert "reinforcement_learning_accelerator_type" in resources["accelerator"]["resourceType"]


def test_submit_sends_that_body_to_vertex_with_the_environment_credentials(credentials, gcs_bucket):
    vertex, env, pem = credentials
    args = submit_args(gcs_bucket.name, "--job-id", "tune-1")
    dry = json.loads(rlhf("submit", "--dry-run", *args).stdout)
    result = rlhf("submit", *args, "--api-endpoint", vertex.url, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "projects/p1/locations/us-central1/pipelineJobs/tune-1"
    (create,) = [r for r in vertex.api_requests() if r.method == "POST"]
    assert create.path == "/v1/projects/p1/locations/us-central1/pipelineJobs"
    assert create.query.startswith("pipelineJobId=tune-1")
    assert create.body == dry
    assert create.headers["authorization"].startswith("Bearer ")
    output = result.stdout + result.stderr
    assert ACCESS_TOKEN not in output and create.headers["authorization"][7:] not in output
    assert not any(line in output for line in secret_lines(pem))


def test_schedule_dry_run_matches_what_is_sent(credentials, gcs_bucket):
    vertex, env, pem = credentials
    args = ["--cron", "TZ=Europe/Paris 0 3 * * 1", "--schedule-name", "weekly-tune", "--max-concurrent-runs", "2",
            "--max-runs", "10", "--start-time", "2026-12-01T00:00:00Z", "--end-time", "2027-06-01T00:00:00Z",
            *submit_args(gcs_bucket.name)]
    dry = rlhf("schedule", "--dry-run", *args)
    assert dry.returncode == 0, dry.stderr
    body = json.loads(dry.stdout)
    assert body["cron"] == "TZ=Europe/Paris 0 3 * * 1" and body["displayName"] == "weekly-tune"
    assert body["maxConcurrentRunCount"] == "2" and body["maxRunCount"] == "10"
    assert body["startTime"] == "2026-12-01T00:00:00Z" and body["endTime"] == "2027-06-01T00:00:00Z"
    job = body["createPipelineJobRequest"]["pipelineJob"]
    assert job["serviceAccount"] == "runner@p1.iam.gserviceaccount.com" and job["encryptionSpec"]["kmsKeyName"] == KEY
    assert job["runtimeConfig"]["parameterValues"]["kl_coeff"] == 0.05

    result = rlhf("schedule", *args, "--api-endpoint", vertex.url, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "projects/p1/locations/us-central1/schedules/1234"
    (create,) = [r for r in vertex.api_requests() if r.method == "POST"]
    assert create.path == "/v1/projects/p1/locations/us-central1/schedules"
    assert create.body == body
    assert not any(line in result.stdout + result.stderr for line in secret_lines(pem) + [ACCESS_TOKEN])


@pytest.mark.parametrize("change,message", [
    (["--pipeline-root", ""], "--pipeline-root is required"),
    (["--pipeline-root", "/tmp/runs"], "expected gs://BUCKET/PATH"),
    (["--set", "preference_dataset=data/pref.jsonl"], "Vertex AI reads datasets from gs:// URIs"),
    (["--set", "reward_model_train_steps=0"], "reward model: reward_model_train_steps 0 must be at least 1"),
    (["--set", "reward_model_train_steps=-5"], "reward model: reward_model_train_steps -5 must be at least 1"),
    (["--set", "reward_model_train_steps=100"], "reward_model_train_steps and reward_model_train_epochs are both given"),
    (["--set", "kl_coeff=-0.1"], "reinforcement learning: kl_coeff -0.1 must not be negative"),
    (["--set", "large_model_reference=gpt-17"], "unknown large_model_reference 'gpt-17'"),
    (["--set", "large_model_reference=llama-2-7b", "--set", "prompt_sequence_length=4090"],
     "4154 tokens is beyond llama-2-7b's 4096"),
    (["--set", "reward_model_accelerator_type=TPU_V3"], "not a GPU the image can use"),
    (["--set", "accelerator_type=TPU"], "accelerator_type='TPU': this pipeline's stages run on GPUs"),
    (["--set", "large_model_reference=llama-2-7b", "--set", "reinforcement_learning_accelerator_type=NVIDIA_L4"],
     "reinforcement_learning_accelerator_type='NVIDIA_L4': the reinforcement learning stage needs about"),
    (["--set", "large_model_reference=llama-2-7b", "--set", "reinforcement_learning_accelerator_type=NVIDIA_L4"],
     "the smallest that holds it is NVIDIA_A100_80GB"),
    (["--set", "large_model_reference=llama-2-13b", "--set", "reinforcement_learning_micro_batch_size=64"],
     "no single GPU holds it"),
    (["--label", "Team=NLP"], "--label Team=NLP"),
    (["--set", "deploy_model=true"], "needs model_display_name"),
])
def test_bad_settings_and_parameters_stop_before_anything_is_sent(change, message):
    args = submit_args("bucket-x")
    for flag, value in zip(change[::2], change[1::2]):
        if flag == "--pipeline-root":
            args[args.index("--pipeline-root") + 1] = value
        else:
            args += [flag, value]
    result = rlhf("submit", "--dry-run", *args)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_submit_chooses_gpus_that_hold_a_course_model_and_keeps_the_default_for_the_default_model():
    values = json.loads(rlhf("submit", "--dry-run", *submit_args("bucket-x")).stdout)["runtimeConfig"]["parameterValues"]
    assert not any(name.endswith("_accelerator_type") for name in values)  # the pipeline's L4 holds every stage
    result = rlhf("submit", "--dry-run", *submit_args("bucket-x"), "--set", "large_model_reference=llama-2-7b",
                  "--set", "inference_accelerator_type=NVIDIA_H100_80GB")
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)["runtimeConfig"]["parameterValues"]
    # Two bfloat16 copies of a 7B model and their activations: more than an L4 or an A100 of 40 GB holds.
    assert values["reinforcement_learning_accelerator_type"] == "NVIDIA_A100_80GB"
    assert values["reward_model_accelerator_type"] == "NVIDIA_A100_80GB"
    assert values["inference_accelerator_type"] == "NVIDIA_H100_80GB"  # the user's own choice, which holds it


def test_a_missing_pipeline_root_bucket_is_named(credentials, gcs_emulator):
    vertex, env, _ = credentials
    result = rlhf("submit", *submit_args("no-such-bucket-1"), "--api-endpoint", vertex.url, env=env)
    assert result.returncode == 2
    assert "--pipeline-root gs://no-such-bucket-1/runs: the bucket does not exist" in result.stderr
    assert vertex.api_requests() == []


def test_upload_registers_the_policy_with_our_serving_container_and_deploys_it(credentials, monkeypatch):
    from rlhf.vertex.model_registry import PREDICT_ROUTE, SERVING_COMMAND, RegistrySettings, upload_and_deploy

    vertex, env, _ = credentials
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = RegistrySettings(model_display_name="tuned-summarizer", serving_container_image=IMAGE, project="p1",
                                encryption_spec_key_name=KEY, deploy=True, deploy_machine_type="g2-standard-12",
                                deploy_accelerator_count=1, api_endpoint=vertex.url)
    names = upload_and_deploy("gs://bucket-x/runs/train-policy/policy", settings)
    assert names == {"model": "projects/p1/locations/us-central1/models/42",
                     "endpoint": "projects/p1/locations/us-central1/endpoints/7"}
    posts = [r for r in vertex.api_requests() if r.method == "POST"]
    upload = posts[0].body["model"]
    assert posts[0].path == "/v1/projects/p1/locations/us-central1/models:upload"
    assert upload["displayName"] == "tuned-summarizer"
    assert upload["artifactUri"] == "gs://bucket-x/runs/train-policy/policy"
    assert upload["containerSpec"]["imageUri"] == IMAGE
    assert upload["containerSpec"]["command"] == SERVING_COMMAND
    assert upload["containerSpec"]["predictRoute"] == PREDICT_ROUTE
    assert upload["encryptionSpec"]["kmsKeyName"] == KEY
    deploy = [r for r in posts if r.path.endswith(":deployModel")][0].body["deployedModel"]
    assert deploy["model"].startswith("projects/p1/locations/us-central1/models/42")
    machine = deploy["dedicatedResources"]["machineSpec"]
    from google.cloud.aiplatform_v1.types import AcceleratorType

    # The REST transport sends enums as numbers.
    assert machine == {"machineType": "g2-standard-12", "acceleratorType": AcceleratorType.NVIDIA_L4.value,
                       "acceleratorCount": 1}


def test_upload_refuses_a_local_artifact():
    from rlhf.vertex.model_registry import RegistrySettings, upload_and_deploy

    with pytest.raises(ValueError, match="takes a gs:// artifact"):
        upload_and_deploy("/tmp/policy", RegistrySettings(model_display_name="m", serving_container_image=IMAGE))


def test_the_upload_stage_returns_the_resource_names_the_pipeline_outputs(credentials, monkeypatch, tmp_path):
    from google.cloud import aiplatform
    from kfp.dsl import Artifact, Model

    from rlhf.components.upload import skip_upload, upload_model

    vertex, env, _ = credentials
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The stage takes Vertex AI's own endpoint; this points the client at the loopback before the stage runs.
    aiplatform.init(project="p1", api_endpoint=vertex.url, api_transport="rest")
    registered = Artifact(uri=str(tmp_path / "registered"))
    names = upload_model.python_func(
        policy=Model(uri="gs://bucket-x/runs/train-policy/policy"), model_display_name="tuned", deploy_model=True,
        project="p1", location="us-central1", encryption_spec_key_name="", serving_container_image=IMAGE,
        deploy_machine_type="g2-standard-8", deploy_accelerator_type="NVIDIA_L4", deploy_accelerator_count=1,
        registered_model=registered)
    assert names.model_resource_name == "projects/p1/locations/us-central1/models/42"
    assert names.endpoint_resource_name == "projects/p1/locations/us-central1/endpoints/7"
    assert registered.metadata == {"model": names.model_resource_name, "endpoint": names.endpoint_resource_name}
    assert tuple(skip_upload.python_func()) == ("", "")


def test_the_compiled_pipeline_uploads_and_deploys_only_when_asked():
    import yaml

    spec = yaml.safe_load(PIPELINE_YAML.read_text())
    tasks = compiled.tasks(spec)

    def branch(task: str) -> tuple[str, str]:
        """The group of branches a task's branch is in (a root task), and the branch's condition."""
        scope, runs = next(every for every in tasks.values() if every[1]["componentRef"]["name"] == tasks[task][0])
        return scope, runs["triggerPolicy"]["condition"]

    group, condition = branch("upload-tensorboard")
    assert group == "root" and "tensorboard_resource_id" in condition
    # The upload runs where a model_display_name is given; either way the pipeline returns GCPC's two outputs,
    # the names the upload returned or empty ones.
    (upload_group, upload_condition), (skip_group, skip_condition) = branch("upload-model"), branch("skip-upload")
    assert upload_group == skip_group and "model_display_name" in upload_condition
    assert skip_condition == f"!({upload_condition})"  # the other branch
    branches = spec["components"][upload_group]["dag"]["tasks"]
    outputs = spec["root"]["dag"]["outputs"]["parameters"]
    assert set(outputs) == {"model_resource_name", "endpoint_resource_name"}
    assert set(spec["root"]["outputDefinitions"]["parameters"]) == set(outputs)
    branch_outputs = spec["components"][upload_group]["dag"]["outputs"]["parameters"]
    for output in outputs.values():
        key = output["valueFromParameter"]["outputParameterKey"]
        sources = branch_outputs[key]["valueFromOneof"]["parameterSelectors"]
        assert {s["producerSubtask"] for s in sources} == set(branches)
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {"model_display_name", "deploy_model", "project", "location", "tensorboard_resource_id",
            "encryption_spec_key_name"} <= set(parameters)
    assert parameters["reward_model_train_steps"]["defaultValue"] == 1000
    assert parameters["reinforcement_learning_train_steps"]["defaultValue"] == 1000
    for task in ("train-reward-model", "train-reward-model-on-replicas", "train-policy", "train-policy-on-replicas",
                 "bulk-inference", "bulk-inference-2", "evaluate"):
        assert tasks[task][1]["retryPolicy"]["maxRetryCount"] == 2, task


def test_tensorboard_resource_ids_are_read_in_both_forms():
    from rlhf.vertex.tensorboard_upload import parse_tensorboard

    assert parse_tensorboard("projects/p2/locations/europe-west4/tensorboards/123", "p1", "us-central1") == (
        "p2", "europe-west4", "123")
    assert parse_tensorboard("456", "p1", "us-central1") == ("p1", "us-central1", "456")
    with pytest.raises(ValueError, match="expected a number or projects/"):
        parse_tensorboard("my-board", "p1", "us-central1")


def test_a_hub_token_comes_from_secret_manager_into_the_stage_and_is_never_printed(credentials, monkeypatch, capfd):
    from rlhf.errors import UserError
    from rlhf.vertex.secrets import HUB_TOKEN_VARIABLE, read_secret, use_hub_token

    vertex, env, _ = credentials
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(HUB_TOKEN_VARIABLE, raising=False)
    vertex.secrets["projects/p1/secrets/hf-token/versions/latest"] = "hf_loopbackLatest123"
    vertex.secrets["projects/p1/secrets/hf-token/versions/2"] = "hf_loopbackSecond456"
    use_hub_token("", "p1", vertex.url)  # no secret named: nothing is read
    assert HUB_TOKEN_VARIABLE not in os.environ and vertex.requests == []
    use_hub_token("hf-token", "p1", vertex.url)
    assert os.environ[HUB_TOKEN_VARIABLE] == "hf_loopbackLatest123"
    assert read_secret("projects/p1/secrets/hf-token/versions/2", api_endpoint=vertex.url) == "hf_loopbackSecond456"
    access = [r for r in vertex.requests if r.path.endswith(":access")]
    assert [r.path for r in access] == ["/v1/projects/p1/secrets/hf-token/versions/latest:access",
                                        "/v1/projects/p1/secrets/hf-token/versions/2:access"]
    assert all(r.headers["authorization"] == f"Bearer {ACCESS_TOKEN}" for r in access)
    with pytest.raises(UserError, match=r"refused to read projects/p1/secrets/other/versions/latest \(HTTP 404\)"):
        read_secret("other", "p1", vertex.url)
    captured = capfd.readouterr()
    assert "hf_loopback" not in captured.out + captured.err


def test_every_stage_that_loads_a_model_gets_the_secrets_name_and_a_bad_name_is_refused():
    import yaml

    from rlhf.pipeline.compiler import COMPILED

    for pipeline, stages in (("rlhf", ("train-reward-model", "train-policy", "bulk-inference", "bulk-inference-2",
                                       "evaluate")), ("infer", ("infer-prompts",))):
        spec = yaml.safe_load(COMPILED[pipeline].read_text())
        assert spec["root"]["inputDefinitions"]["parameters"]["huggingface_token_secret"]["defaultValue"] == ""
        for stage in stages:
            for runs in (stage, f"{stage}-on-replicas") if stage.startswith("train-") else (stage,):
                given = compiled.source(spec, runs, "huggingface_token_secret")
                assert given == {"componentInputParameter": "huggingface_token_secret"}, (pipeline, runs)
    sent = rlhf("submit", "--dry-run", *submit_args("bucket-x", "--set", "large_model_reference=llama-2-7b",
                                                    "--set", "huggingface_token_secret=hf-token"))
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["runtimeConfig"]["parameterValues"]["huggingface_token_secret"] == "hf-token"
    refused = rlhf("submit", "--dry-run", *submit_args("bucket-x", "--set", "huggingface_token_secret=hf_abc/def"))
    assert refused.returncode == 2
    assert "huggingface_token_secret='hf_abc/def': expected a secret id" in refused.stderr
