"""A training stage on several Vertex AI machines (`*_replica_count`): the compiled pipeline's branch, the
machine each replica gets, and the launcher against the loopback Vertex AI API. The replicas training as one
run: tests/test_distributed.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf.errors import UserError
from rlhf.pipeline.compiler import COMPILED
from rlhf.vertex.custom_job import cpu_count, machine_type, memory_bytes, worker_pool_specs
from tests import compiled
from tests.test_vertex import submit_args
from tests.vertex_loopback import VertexLoopback, write_service_account

# Each stage on one machine or several, by its compiled pipeline, its task on one machine, the task that launches
# it on several, and the prefix of its machine parameters. Bulk inference runs twice in `rlhf_pipeline` (base,
# tuned) and once in `infer_pipeline`.
STAGES = (("rlhf", "train-reward-model", "train-reward-model-on-replicas", "reward_model"),
          ("rlhf", "train-policy", "train-policy-on-replicas", "reinforcement_learning"),
          ("rlhf", "bulk-inference", "bulk-inference-on-replicas", "inference"),
          ("rlhf", "bulk-inference-2", "bulk-inference-on-replicas-2", "inference"),
          ("infer", "infer-prompts", "infer-prompts-on-replicas", "inference"))


@pytest.mark.parametrize("pipeline,task,launched,prefix", STAGES)
def test_the_compiled_pipeline_runs_a_stage_on_one_machine_or_as_a_custom_job_on_several(pipeline, task, launched,
                                                                                        prefix):
    spec = compiled.load(COMPILED[pipeline])
    tasks = compiled.tasks(spec)
    alone, launcher = tasks[task][1], tasks[launched][1]
    scopes = {tasks[task][0], tasks[launched][0]}  # the branches' DAGs
    branches = {name: t["triggerPolicy"]["condition"] for name, (_, t) in tasks.items()
                if t["componentRef"]["name"] in scopes}
    assert len(branches) == 2 and all(f"{prefix}_replica_count" in c for c in branches.values())
    executors = spec["deploymentSpec"]["executors"]
    stage = executors[spec["components"][alone["componentRef"]["name"]]["executorLabel"]]["container"]
    runs = executors[spec["components"][launcher["componentRef"]["name"]]["executorLabel"]]["container"]
    # The stage's own machine has its GPUs; the launcher's needs none: the custom job's replicas have them.
    assert "accelerator" in stage["resources"] and "resources" not in runs
    assert runs["command"] == ["python3", "-m", "rlhf.vertex.custom_job"] and runs["image"] == stage["image"]
    # Every replica runs the stage's own command, with its inputs and outputs as the pipeline fills them in.
    assert runs["args"][runs["args"].index("--") + 1:] == stage["command"] + stage["args"]
    options = dict(zip(runs["args"][:runs["args"].index("--"):2], runs["args"][1:runs["args"].index("--"):2]))
    assert options["--replica-count"] == "{{$.inputs.parameters['replica_count']}}"
    assert options["--display-name"] == "{{$.pipeline_job_name}}-" + launched.split("-on-replicas")[0]
    for option, name in (("--accelerator-type", "accelerator_type"), ("--accelerator-count", "accelerator_count"),
                         ("--cpu-limit", "cpu_limit"), ("--memory-limit", "memory_limit")):
        fed = options[option].removeprefix("{{$.inputs.parameters['").removesuffix("']}}")
        assert compiled.source(spec, launched, fed) == {"componentInputParameter": f"{prefix}_{name}"}
    assert compiled.source(spec, launched, "replica_count") == {"componentInputParameter": f"{prefix}_replica_count"}
    # The same settings reach both: every input of the stage comes from the same place in either branch.
    for name in spec["components"][alone["componentRef"]["name"]]["inputDefinitions"]["parameters"]:
        assert compiled.source(spec, task, name) == compiled.source(spec, launched, name), name
    assert spec["root"]["inputDefinitions"]["parameters"][f"{prefix}_replica_count"]["defaultValue"] == 1
    assert "retryPolicy" in launcher


@pytest.mark.parametrize("accelerator,count,cpus,memory,machine", [
    ("NVIDIA_L4", 1, "8", "32G", "g2-standard-8"),  # the pipeline's default stage
    ("NVIDIA_L4", 1, "8", "40G", "g2-standard-12"),  # more memory: the next size up
    ("NVIDIA_L4", 4, "8", "32G", "g2-standard-48"),
    ("NVIDIA_A100_80GB", 8, "8", "32G", "a2-ultragpu-8g"),
    ("NVIDIA_TESLA_A100", 2, "20", "100Gi", "a2-highgpu-2g"),
    ("NVIDIA_H100_80GB", 8, "96", "1000G", "a3-highgpu-8g"),
    ("NVIDIA_TESLA_T4", 1, "8", "32G", "n1-standard-8"),  # 32G: 29.8 GiB, within its 30 GiB
    ("NVIDIA_TESLA_T4", 1, "8", "32Gi", "n1-standard-16"),
    ("NVIDIA_TESLA_V100", 8, "500m", "1Gi", "n1-standard-4"),
])
def test_each_replica_gets_the_smallest_machine_with_the_stages_gpus_cpus_and_memory(accelerator, count, cpus,
                                                                                   memory, machine):
    assert machine_type(accelerator, count, cpus, memory) == machine


@pytest.mark.parametrize("accelerator,count,cpus,memory,message", [
    ("NVIDIA_H200_141GB", 1, "8", "32G", "1 x NVIDIA_H200_141GB: no Vertex AI machine carries that; this GPU comes "
                                         "8 to a machine"),
    ("NVIDIA_TESLA_V100", 1, "16", "32G", "the largest machine with these GPUs, n1-standard-8, has 8 vCPUs"),
    ("NVIDIA_L4", 1, "8", "200G", "g2-standard-32, has 32 vCPUs and 128 GiB"),
    ("TPU_V3", 8, "8", "32G", "no Vertex AI machine carries that; one of NVIDIA_L4"),
])
def test_a_machine_no_vertex_ai_machine_type_matches_is_refused_with_what_there_is(accelerator, count, cpus, memory,
                                                                                  message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        machine_type(accelerator, count, cpus, memory)


def test_cpu_and_memory_limits_read_as_kubernetes_quantities():
    assert [cpu_count(text) for text in ("8", "0.5", "500m", "2.5")] == [8, 0.5, 0.5, 2.5]
    assert memory_bytes("32G") == 32 * 10**9 and memory_bytes("32Gi") == 32 * 2**30 and memory_bytes("512") == 512
    for bad in ("8 cpus", "-1", ""):
        with pytest.raises(UserError, match="a number of CPUs"):
            cpu_count(bad)
    with pytest.raises(UserError, match="a size, such as 32G"):
        memory_bytes("32GB")


def test_the_chief_has_worker_pool_0_and_the_other_replicas_worker_pool_1():
    pools = worker_pool_specs("img", ["python3", "-m", "x"], 3, "g2-standard-8", "NVIDIA_L4", 1)
    assert [pool["replicaCount"] for pool in pools] == [1, 2]
    assert pools[0]["machineSpec"] == pools[1]["machineSpec"] == {
        "machineType": "g2-standard-8", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 1}
    assert pools[0]["containerSpec"] == pools[1]["containerSpec"] == {"imageUri": "img",
                                                                      "command": ["python3", "-m", "x"]}
    assert [pool["replicaCount"] for pool in worker_pool_specs("img", ["x"], 1, "m", "NVIDIA_L4", 1)] == [1]
    with pytest.raises(UserError, match="at least one machine"):
        worker_pool_specs("img", ["x"], 0, "m", "NVIDIA_L4", 1)


@pytest.fixture
def loopback(tmp_path):
    with VertexLoopback() as vertex:
        write_service_account(tmp_path / "key.json", f"{vertex.url}/token")
        yield vertex, {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "key.json")}


def launcher_command(url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf.vertex.custom_job", "--display-name", "train-reward-model",
            "--project", "p1", "--location", "us-central1", "--replica-count", "2",
            "--accelerator-type", "NVIDIA_A100_80GB", "--accelerator-count", "8", "--cpu-limit", "8",
            "--memory-limit", "32G", "--image", "img:1", "--encryption-spec-key-name", "kms-key",
            "--api-endpoint", url, "--poll-seconds", "0.05", *extra, "--", "sh", "-ec", "run the stage", "--x", "{}"]


def run_launcher(url, env, *extra):
    return subprocess.run(launcher_command(url, *extra), capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_the_launcher_creates_the_custom_job_and_waits_for_it_to_succeed(loopback):
    vertex, env = loopback
    result = run_launcher(vertex.url, env)
    assert result.returncode == 0, result.stderr
    (created,) = [r for r in vertex.api_requests() if r.method == "POST"]
    assert created.path == "/v1/projects/p1/locations/us-central1/customJobs"
    assert created.headers["authorization"].startswith("Bearer ")
    assert created.body["displayName"] == "train-reward-model"
    assert created.body["encryptionSpec"] == {"kmsKeyName": "kms-key"}
    pools = created.body["jobSpec"]["workerPoolSpecs"]
    assert [pool["replicaCount"] for pool in pools] == [1, 1]
    assert {pool["machineSpec"]["machineType"] for pool in pools} == {"a2-ultragpu-8g"}
    assert pools[0]["containerSpec"] == {"imageUri": "img:1", "command": ["sh", "-ec", "run the stage", "--x", "{}"]}
    # It read the job until it ended, and said each state it saw.
    assert len([r for r in vertex.api_requests() if r.method == "GET"]) == 2
    for state in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"):
        assert state in result.stdout


def test_a_failed_custom_job_fails_the_launcher_with_vertex_ais_reason(loopback):
    vertex, env = loopback
    job = "projects/p1/locations/us-central1/customJobs/"
    vertex.run_custom_job = lambda body: {"state": "JOB_STATE_FAILED",
                                          "error": {"code": 3, "message": "The replica workerpool1-0 exited with a "
                                                                          "non-zero status of 1."}}
    result = run_launcher(vertex.url, env)
    assert result.returncode == 1
    assert f"rlhf: custom job {job}" in result.stderr
    assert "ended JOB_STATE_FAILED: The replica workerpool1-0 exited with a non-zero status of 1." in result.stderr
    assert "Traceback" not in result.stderr


def test_the_launcher_reads_again_through_passing_failures_and_cancels_a_job_it_loses(loopback):
    vertex, env = loopback
    vertex.failing_job_reads = 3
    result = run_launcher(vertex.url, env)
    assert result.returncode == 0, result.stderr
    assert len([r for r in vertex.api_requests() if r.method == "GET"]) == 3 + 2
    vertex.requests.clear()
    vertex.failing_job_reads = 10**6  # Vertex AI unreachable from here on
    lost = run_launcher(vertex.url, env)
    assert lost.returncode == 1 and "Traceback" not in lost.stderr
    assert "Vertex AI did not answer GET" in lost.stderr and "(HTTP 503: " in lost.stderr
    assert "it was cancelled, and running the stage again resumes from its checkpoint" in lost.stderr
    (cancelled,) = [r for r in vertex.api_requests() if r.path.endswith(":cancel")]
    assert vertex.resources[cancelled.path[len("/v1/"):-len(":cancel")]]["state"] == "JOB_STATE_CANCELLED"


def test_a_vertex_ai_endpoint_that_does_not_answer_is_one_line(loopback):
    from tests.conftest import free_port

    vertex, env = loopback
    unreachable = run_launcher(f"http://127.0.0.1:{free_port()}", env)  # the token comes, the API does not
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert "rlhf: Vertex AI did not answer POST projects/p1/locations/us-central1/customJobs (ConnectionError" in \
        unreachable.stderr


def test_a_stopped_launcher_cancels_its_custom_job(loopback):
    vertex, env = loopback
    vertex.custom_job_states = ["JOB_STATE_RUNNING"] * 10**6  # runs until cancelled
    launcher = subprocess.Popen(launcher_command(vertex.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**os.environ, **env})
    deadline = time.monotonic() + 60
    while not any(r.method == "GET" for r in vertex.api_requests()) and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, err
    (cancelled,) = [r for r in vertex.api_requests() if r.path.endswith(":cancel")]
    assert cancelled.method == "POST" and "stop requested; cancelling it" in out
    assert vertex.resources[cancelled.path[len("/v1/"):-len(":cancel")]]["state"] == "JOB_STATE_CANCELLED"


def test_several_machines_are_checked_before_anything_runs():
    from rlhf.pipeline.local_run import LOCAL_DEFAULTS
    from rlhf.pipeline.parameters import resolve_parameters
    from tests.conftest import rlhf

    with pytest.raises(UserError, match="reward_model_replica_count=2: several machines are a Vertex AI custom job"):
        resolve_parameters(None, ["reward_model_replica_count=2"], LOCAL_DEFAULTS)
    with pytest.raises(UserError, match="reinforcement_learning_replica_count=0: a stage runs on at least one"):
        resolve_parameters(None, ["reinforcement_learning_replica_count=0"], LOCAL_DEFAULTS)
    sent = rlhf("submit", "--dry-run", *submit_args("bucket-x", "--set", "reward_model_replica_count=4",
                                                    "--set", "reward_model_accelerator_count=8",
                                                    "--set", "reward_model_accelerator_type=NVIDIA_A100_80GB"))
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["runtimeConfig"]["parameterValues"]["reward_model_replica_count"] == 4
    assert "reward model: about 5.8 GiB a GPU, on NVIDIA_A100_80GB, 4 machines of a2-ultragpu-8g" in sent.stderr
    refused = rlhf("submit", "--dry-run", *submit_args("bucket-x", "--set", "reinforcement_learning_replica_count=2",
                                                       "--set", "reinforcement_learning_memory_limit=200G"))
    assert refused.returncode == 2
    assert ("reinforcement_learning_replica_count=2: 1 x NVIDIA_L4 with 8 CPUs and 200G of memory: the largest "
            "machine with these GPUs, g2-standard-32, has 32 vCPUs and 128 GiB") in refused.stderr
