"""Data parallelism on CPUs (gloo), two processes on the tiny model: the same steps as one process given the
whole batch; a stop asked of one rank stops all at a checkpoint; a rank killed mid-run is resumed from the last
checkpoint to the same result."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf.training.distributed import backend
from rlhf.training.loop import CHECKPOINT_DIR, METRICS_FILE
from rlhf.training.sharding import HOST_MEMORY_VARIABLE, loading_turns
from tests.conftest import PROMPTS, adapted_policy, free_port, marker_pairs, reward_config, rlhf

# One thread per process on both sides: the sums inside a matmul then run in the same order, so one process and
# two differ only by the order of additions across ranks.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def stage_command(kind, model, output, processes, *extra):
    return [sys.executable, "-m", "tests.distributed_stage", kind, str(model), str(output), str(processes), *extra]


def stage(kind, model, output, processes, *extra):
    # A sharded stage's processes given host memory for one whole model: they load it in turns.
    turns = {HOST_MEMORY_VARIABLE: "1"} if kind.startswith("sharded-") else {}
    return subprocess.run(stage_command(kind, model, output, processes, *extra), capture_output=True, text=True,
                          timeout=900, env={**os.environ, **ONE_THREAD, **turns})


def trained_tensors(output, kind):
    if kind.endswith("reward"):
        return load_file(output / "head.safetensors") | load_file(output / "adapter" / "adapter_model.safetensors")
    return load_file(output / "adapter" / "adapter_model.safetensors")


def assert_same_tensors(first, second, tolerance):
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=tolerance, atol=tolerance, msg=name)


@pytest.fixture(scope="module")
def alone_and_parallel(tiny_model_dir, tmp_path_factory):
    """Each stage once in one process and once in two (module-scoped: the launches are the slow part)."""
    root = tmp_path_factory.mktemp("distributed")
    runs = {}
    for kind in ("reward", "sharded-reward", "policy", "sharded-policy", "group", "sharded-group", "dpo",
                 "sharded-dpo"):
        for processes in (1, 2):
            output = root / f"{kind}-{processes}"
            scored_by = ["--reward-model", str(root / "reward-1")] if kind == "sharded-policy" else []
            result = stage(kind, tiny_model_dir, output, processes, *scored_by)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[kind, processes] = output, json.loads(result.stdout.strip().splitlines()[-1])
    return runs


REWARD_METRICS = ("final_rank_loss", "final_train_accuracy", "eval_accuracy", "eval_mean_margin", "score_mean",
                  "score_std")
DPO_METRICS = ("final_dpo_loss", "final_accuracy", "final_reward_margin", "eval_accuracy", "eval_mean_margin")


# The sharded- kinds: each process holds half the decoder layers' weights (one process: all).
@pytest.mark.slow
@pytest.mark.parametrize("kind, metrics", [("reward", REWARD_METRICS), ("sharded-reward", REWARD_METRICS),
                                           ("policy", ("final_reward", "final_kl", "initial_reward",
                                                       "final_ended_share")),
                                           # PPO after a DPO warm-up, scored by the sharded reward model
                                           ("sharded-policy", ("final_reward", "final_kl", "initial_reward",
                                                               "final_dpo_warmup_loss")),
                                           ("group", ("final_reward", "final_kl", "initial_reward",
                                                      "final_sft_loss")),
                                           ("sharded-group", ("final_reward", "final_kl", "initial_reward",
                                                              "final_sft_loss")),
                                           ("dpo", DPO_METRICS), ("sharded-dpo", DPO_METRICS)])
def test_two_processes_train_the_same_weights_and_metrics_as_one(alone_and_parallel, kind, metrics):
    (alone, alone_metrics), (parallel, parallel_metrics) = alone_and_parallel[kind, 1], alone_and_parallel[kind, 2]
    assert_same_tensors(trained_tensors(alone, kind), trained_tensors(parallel, kind), 1e-5)
    for name in metrics:
        assert parallel_metrics[name] == pytest.approx(alone_metrics[name], rel=1e-5, abs=1e-6), name
    assert alone_metrics["steps"] == parallel_metrics["steps"]
    # The run learned (so the comparison is of weights that moved, not of the initial ones).
    if kind.endswith("reward"):
        assert parallel_metrics["eval_accuracy"] >= 0.75
    elif kind == "policy":
        assert parallel_metrics["final_reward"] > parallel_metrics["initial_reward"]
    elif kind.endswith("dpo"):
        assert parallel_metrics["eval_accuracy"] >= 0.75
    else:  # a few steps are too few for the reward to rise reliably here; the adapter (B starts at 0) moved
        assert all(bool(t.abs().sum() > 0) for name, t in trained_tensors(parallel, kind).items() if "lora_B" in name)


# A stop asked of rank 1 after step 3 (SIGTERM: a preempted machine) stops both ranks at that step, checkpoint
# first, with the status of a stopped run; rank 1 killed after step 5 (a crashed machine) fails the stage and
# leaves the checkpoint of step 4 (every 2 steps).
INTERRUPTIONS = {"stopped": (signal.SIGTERM, 3, 3, "Stopped at step 3; run the same command again to resume"),
                 "killed": (signal.SIGKILL, 5, 4, "process 1 ended first, with status -9")}


@pytest.mark.slow
@pytest.mark.parametrize("interruption", INTERRUPTIONS)
@pytest.mark.parametrize("kind", ["reward", "sharded-reward", "policy", "sharded-group", "dpo"])
def test_an_interrupted_rank_stops_the_stage_and_the_rerun_resumes_to_the_same_result(
        alone_and_parallel, tiny_model_dir, tmp_path, kind, interruption):
    number, at, kept, message = INTERRUPTIONS[interruption]
    output = tmp_path / kind
    interrupted = stage(kind, tiny_model_dir, output, 2, "--rank", "1", "--signal", str(int(number)), "--at", str(at))
    assert interrupted.returncode == (75 if number == signal.SIGTERM else 1), interrupted.stderr[-3000:]
    assert message in interrupted.stderr, interrupted.stderr[-3000:]
    assert (output / CHECKPOINT_DIR / f"step-{kept:07d}").is_dir() and not (output / METRICS_FILE).exists()

    resumed = stage(kind, tiny_model_dir, output, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(step {kept} of" in resumed.stderr
    assert_same_tensors(trained_tensors(output, kind), trained_tensors(alone_and_parallel[kind, 2][0], kind), 0)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "inference-shards"])
def test_sharded_weights_are_split_between_the_processes_and_the_rest_is_not(tiny_model_dir, kind):
    """Each of 2 processes holds half of the frozen decoder layers of the reward model's backbone, or of bulk
    inference's model (a weight of an odd row count puts one row more on the first), and the whole of the
    embeddings, the final norm and every LoRA weight."""
    result = stage(kind, tiny_model_dir, "-", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    held = json.loads(result.stdout.strip().splitlines()[-1])
    layers = held["layers"]
    assert sum(layers["held"]) == layers["total"] > 0
    assert all(abs(h - layers["total"] / 2) <= 0.01 * layers["total"] for h in layers["held"]), layers
    for whole in ("rest", "trained") if kind == "shards" else ("rest",):
        assert held[whole]["held"] == [held[whole]["total"]] * 2 and held[whole]["total"] > 0
    alone = json.loads(stage(kind, tiny_model_dir, "-", 1).stdout.strip().splitlines()[-1])
    assert alone["layers"]["held"] == [layers["total"]]


@pytest.mark.slow
def test_processes_load_a_model_they_shard_in_turns_when_the_host_holds_fewer_copies(tiny_model_dir):
    """With host memory for fewer whole copies of the weights than a machine has processes, they load one turn
    after the other (the second begins once the first has its share); with room for all, together."""
    def times(host_memory: int) -> list:
        result = subprocess.run(stage_command("turns", tiny_model_dir, "-", 2), capture_output=True, text=True,
                                timeout=300, env={**os.environ, **ONE_THREAD, HOST_MEMORY_VARIABLE: str(host_memory)})
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr, json.loads(result.stdout.strip().splitlines()[-1])["times"]

    printed, (first, second) = times(1)
    assert first[1] <= second[0], (first, second)  # the second rank's turn began after the first's ended
    assert "in 2 turns of 1 process(es) a machine" in printed
    printed, (first, second) = times(10**15)
    assert second[0] < first[1] and first[0] < second[1], (first, second)  # at the same time
    assert "turns" not in printed


def test_the_turns_a_machines_processes_take_to_load_are_as_many_as_the_host_memory_needs():
    assert [loading_turns(8, copies) for copies in (8, 9, 3, 1, 0)] == [1, 1, 3, 8, 8]


def test_on_gpus_the_process_group_carries_cpu_tensors_through_gloo():
    """The summed losses, counts and objects are CPU tensors, which NCCL alone does not carry."""
    assert backend(cuda=False) == "gloo" and backend(cuda=True) == "cpu:gloo,cuda:nccl"


@pytest.mark.slow
def test_sharded_weights_refuse_a_step_with_fewer_micro_batches_than_processes(tiny_model_dir, tmp_path):
    """One prompt of 4 samples is one micro-batch of 4: the second process would hold no rollout to keep in step
    with; refused before the model loads."""
    result = stage("sharded-group", tiny_model_dir, tmp_path / "out", 2, "--batch-size", "1")
    assert result.returncode != 0
    assert ("sharded over 2 processes, a step needs at least as many micro-batches; it has 1" in result.stderr
            and "Loading weights" not in result.stderr), result.stderr[-3000:]


@pytest.mark.slow
def test_two_machines_of_a_vertex_cluster_spec_train_as_two_processes_of_one(alone_and_parallel, tiny_model_dir,
                                                                             tmp_path):
    """Each Vertex AI replica gets CLUSTER_SPEC (the chief in worker pool 0, the other replicas in pool 1, with
    the address each listens on) and one process per machine here; they meet at the chief's address."""
    output = tmp_path / "reward"
    pools = {"workerpool0": [f"127.0.0.1:{free_port()}"], "workerpool1": [f"127.0.0.1:{free_port()}"]}
    machines = []
    for pool in ("workerpool0", "workerpool1"):
        spec = {"cluster": pools, "task": {"type": pool, "index": 0}, "environment": "cloud"}
        machines.append(subprocess.Popen(stage_command("reward", tiny_model_dir, output, 1), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, **ONE_THREAD, "CLUSTER_SPEC": json.dumps(spec)}))
    results = [machine.communicate(timeout=900) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], [err[-2000:] for _, err in results]
    printed = [json.loads(out.strip().splitlines()[-1]) for out, _ in results if out.strip()]
    parallel, parallel_metrics = alone_and_parallel["reward", 2]
    assert len(printed) == 1 and printed[0]["final_rank_loss"] == pytest.approx(parallel_metrics["final_rank_loss"])
    assert_same_tensors(trained_tensors(output, "reward"), trained_tensors(parallel, "reward"), 1e-6)


@pytest.mark.slow
def test_a_training_component_given_two_accelerators_trains_as_two_processes(alone_and_parallel, tiny_model_dir,
                                                                             tmp_path):
    """What the reward-model component runs with `processes=2` (the pipeline's reward_model_accelerator_count)."""
    from rlhf.data.datasets import write_jsonl
    from rlhf.reward.config import RewardTrainingConfig
    from tests.distributed_stage import REWARD_SETTINGS

    rows = marker_pairs(48)
    write_jsonl(tmp_path / "train.jsonl", rows[:40])
    write_jsonl(tmp_path / "held_out.jsonl", rows[40:])
    config = reward_config(**REWARD_SETTINGS)
    arguments = {"settings": {name: getattr(config, name) for name in RewardTrainingConfig.parameter_names},
                 "plain_text": False, "train_pairs": str(tmp_path / "train.jsonl"),
                 "held_out_pairs": str(tmp_path / "held_out.jsonl"), "large_model_reference": str(tiny_model_dir),
                 "output": str(tmp_path / "reward")}
    code = ("import json, sys\nfrom rlhf.components.processes import run_stage\n"
            "print(json.dumps(run_stage('reward_model', 2, **json.loads(sys.argv[1]))))")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True,
                            timeout=900, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    parallel, parallel_metrics = alone_and_parallel["reward", 2]
    assert json.loads(result.stdout.strip().splitlines()[-1])["final_rank_loss"] == pytest.approx(
        parallel_metrics["final_rank_loss"])
    assert_same_tensors(trained_tensors(tmp_path / "reward", "reward"), trained_tensors(parallel, "reward"), 1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [[], ["--sampling-strategy", "temperature_sampling", "--temperature", "1.5"]], ids=["greedy", "sampled"])
def test_bulk_inference_in_two_processes_writes_what_one_process_writes(tiny_model_dir, tmp_path, sampling):
    from rlhf.data.datasets import read_jsonl, write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    written = {}
    for processes in (1, 2):
        output = tmp_path / f"predictions-{processes}.jsonl"
        result = rlhf("infer", "--eval-dataset", str(tmp_path / "prompts.jsonl"), "--large-model-reference",
                      str(tiny_model_dir), "--output", str(output), "--inference-batch-size", "4",
                      "--target-sequence-length", "8", "--nproc-per-node", str(processes), *sampling, env=ONE_THREAD)
        assert result.returncode == 0, result.stderr[-3000:]
        written[processes] = read_jsonl(output)
    assert len(written[2]) == len(PROMPTS)
    assert [r["input_text"] for r in written[2]] == [r["input_text"] for r in PROMPTS]
    assert written[2] == written[1]
    assert len({r["prediction"] for r in written[2]}) > 1  # not one completion copied to every row


@pytest.mark.slow
def test_the_bulk_inference_component_given_two_accelerators_writes_what_one_process_writes(tiny_model_dir,
                                                                                            tmp_path):
    from rlhf.data.datasets import read_jsonl, write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    outputs = {}
    for processes in (1, 2):
        arguments = {"settings": {"target_sequence_length": 8, "batch_size": 4}, "prompts": str(tmp_path / "prompts.jsonl"),
                     "model": str(tiny_model_dir), "adapter": None, "output": str(tmp_path / f"out-{processes}.jsonl")}
        code = ("import json, sys\nfrom rlhf.components.processes import run_stage\n"
                f"print(json.dumps(run_stage('bulk_inference', {processes}, **json.loads(sys.argv[1]))))")
        result = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], capture_output=True, text=True,
                                timeout=900, env={**os.environ, **ONE_THREAD})
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == {"rows": len(PROMPTS)}
        outputs[processes] = read_jsonl(Path(arguments["output"]))
    assert outputs[2] == outputs[1] and len(outputs[2]) == len(PROMPTS)


@pytest.mark.slow
def test_bulk_inference_on_two_vertex_machines_with_sharded_weights_writes_what_one_process_writes(tiny_model_dir,
                                                                                                   tmp_path):
    """The bulk-inference component on two Vertex AI replicas (inference_replica_count=2), one process each, told
    where the other is by CLUSTER_SPEC, the model's weights sharded over them: 5 batches of 4, one an idle pass."""
    from rlhf.data.datasets import read_jsonl, write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:20])
    code = ("import json, sys\nfrom rlhf.components.processes import run_stage\n"
            "print(json.dumps(run_stage('bulk_inference', 1, **json.loads(sys.argv[1]))))")

    def arguments(name: str, sharded: bool) -> str:
        return json.dumps({"settings": {"target_sequence_length": 8, "batch_size": 4, "shard_weights": sharded},
                           "prompts": str(tmp_path / "prompts.jsonl"), "model": str(tiny_model_dir), "adapter": None,
                           "output": str(tmp_path / name)})

    alone = subprocess.run([sys.executable, "-c", code, arguments("alone.jsonl", False)], capture_output=True,
                           text=True, timeout=900, env={**os.environ, **ONE_THREAD})
    assert alone.returncode == 0, alone.stderr[-3000:]
    pools = {"workerpool0": [f"127.0.0.1:{free_port()}"], "workerpool1": [f"127.0.0.1:{free_port()}"]}
    machines = []
    for pool in pools:
        spec = {"cluster": pools, "task": {"type": pool, "index": 0}, "environment": "cloud"}
        machines.append(subprocess.Popen([sys.executable, "-c", code, arguments("replicas.jsonl", True)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env={**os.environ, **ONE_THREAD, "CLUSTER_SPEC": json.dumps(spec)}))
    results = [machine.communicate(timeout=900) for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], [err[-2000:] for _, err in results]
    assert "each of 2 processes holds 1/2 of the model's decoder layers" in results[0][1]
    assert json.loads(results[0][0].strip().splitlines()[-1]) == {"rows": 20}
    assert read_jsonl(tmp_path / "replicas.jsonl") == read_jsonl(tmp_path / "alone.jsonl")


@pytest.fixture(scope="module")
def policy_and_reward_model(tiny_model_dir, tmp_path_factory):
    """A policy artifact whose adapter moves the tiny model, and a reward model to judge it by."""
    from rlhf.models.loading import load_tokenizer
    from rlhf.reward.training import train_reward_model
    from rlhf.rl.policy import PolicySpec, save_policy

    root = tmp_path_factory.mktemp("to-evaluate")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    spec = PolicySpec(large_model_reference=str(tiny_model_dir), lora_dim=4, prompt_sequence_length=64,
                      target_sequence_length=8, instruction="Summarize.", temperature=0.7)
    save_policy(adapted_policy(tiny_model_dir, tokenizer.eos_token_id), spec, root / "policy", tokenizer, merged=False)
    rows = marker_pairs(24)
    train_reward_model(reward_config(train_steps=2), rows[:20], rows[20:], str(tiny_model_dir), root / "reward-model")
    return root / "policy", root / "reward-model"


@pytest.mark.slow
def test_sharded_bulk_inference_and_evaluation_in_two_processes_give_what_one_process_gives(
        policy_and_reward_model, tiny_model_dir, tmp_path):
    """Bulk inference of the base and the tuned model, then the evaluation (reward model, KL of the tuned policy to
    the base on sampled completions), each with its weights sharded over 2 processes, against 1 process unsharded.
    20 prompts in batches of 4: one process generates 3 batches, the other 2 and an idle pass. The host memory
    given holds one whole model: the two processes load in turns."""
    from rlhf.data.datasets import read_jsonl, write_jsonl

    policy, reward_model = policy_and_reward_model
    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:20])
    written, evaluated = {}, {}
    for processes in (1, 2):
        sharded = ["--inference-shard-weights", "--nproc-per-node", "2"] if processes == 2 else []
        env = {**ONE_THREAD, HOST_MEMORY_VARIABLE: "1"}
        outputs = {side: tmp_path / f"{side}-{processes}.jsonl" for side in ("base", "tuned")}
        for side, model in (("base", ["--large-model-reference", str(tiny_model_dir)]), ("tuned", ["--policy", str(policy)])):
            result = rlhf("infer", "--eval-dataset", str(tmp_path / "prompts.jsonl"), "--output", str(outputs[side]),
                          "--inference-batch-size", "4", "--target-sequence-length", "8", *model, *sharded, env=env)
            assert result.returncode == 0, result.stderr[-3000:]
            assert ("each of 2 processes holds 1/2 of the model's decoder layers" in result.stderr) == (processes == 2)
            assert ("in 2 turns of 1 process(es)" in result.stderr) == (processes == 2)
            written[side, processes] = read_jsonl(outputs[side])
        result = rlhf("evaluate", "--base-outputs", str(outputs["base"]), "--tuned-outputs", str(outputs["tuned"]),
                      "--reward-model", str(reward_model), "--policy", str(policy), "--output-dir",
                      str(tmp_path / f"evaluation-{processes}"), *sharded, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stderr.count("in 2 turns of 1 process(es)") == (2 if processes == 2 else 0)  # both models
        assert ("each of 2 processes holds 1/2 of the reward model's and the policy's" in result.stderr) == (
            processes == 2)
        evaluated[processes] = json.loads((tmp_path / f"evaluation-{processes}" / "metrics.json").read_text())
    for side in ("base", "tuned"):
        assert written[side, 2] == written[side, 1] and len(written[side, 2]) == 20
    assert {r["prediction"] for r in written["base", 2]} != {r["prediction"] for r in written["tuned", 2]}
    alone, parallel = evaluated[1]["evaluation"], evaluated[2]["evaluation"]
    assert alone["kl_to_base"] > 0.01  # the adapter moves the model: a KL of 0 would compare nothing
    for name, value in alone.items():
        if isinstance(value, float):
            assert parallel[name] == pytest.approx(value, rel=1e-5, abs=1e-5), name
    assert parallel["kl_to_base_sampling"]["completions"] == alone["kl_to_base_sampling"]["completions"]


def test_the_evaluation_runs_in_several_processes_only_to_shard_its_weights(tmp_path):
    result = rlhf("evaluate", "--base-outputs", "b.jsonl", "--tuned-outputs", "t.jsonl", "--reward-model", "rm",
                  "--policy", "p", "--output-dir", str(tmp_path / "out"), "--nproc-per-node", "2")
    assert result.returncode == 2
    assert "--nproc-per-node 2: the evaluation runs in several processes only to shard" in result.stderr


# A process of a stage that exits with its process group open leaves gloo's connections to interpreter shutdown,
# which can abort it (status -6) after finished work: CI saw it from the component's two-process bulk inference.
CLOSES_ITS_GROUP = """
import json, os, sys
from pathlib import Path
import torch.distributed as dist
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
os.environ["LOCAL_RANK"] = "0"
if sys.argv[2] == "component":
    from rlhf.components.processes import main
    status = main("bulk_inference", Path(sys.argv[3]), Path(sys.argv[4]))
else:
    from rlhf.cli import main
    status = main(json.loads(sys.argv[3]))
print(json.dumps({"status": status, "group_open": dist.is_initialized()}))
"""


@pytest.mark.parametrize("entry_point", ["component", "cli"])
def test_a_stage_process_closes_its_process_group_when_its_work_is_done(tiny_model_dir, tmp_path, entry_point):
    from rlhf.data.datasets import read_jsonl, write_jsonl

    write_jsonl(tmp_path / "prompts.jsonl", PROMPTS[:4])
    output = tmp_path / "out.jsonl"
    if entry_point == "component":
        arguments = tmp_path / "arguments.json"
        arguments.write_text(json.dumps({"settings": {"target_sequence_length": 4, "batch_size": 4}, "prompts":
                                         str(tmp_path / "prompts.jsonl"), "model": str(tiny_model_dir),
                                         "adapter": None, "output": str(output)}))
        given = [str(arguments), str(tmp_path / "result.json")]
    else:
        given = [json.dumps(["infer", "--eval-dataset", str(tmp_path / "prompts.jsonl"), "--large-model-reference",
                             str(tiny_model_dir), "--output", str(output), "--target-sequence-length", "4"])]
    result = subprocess.run([sys.executable, "-c", CLOSES_ITS_GROUP, str(free_port()), entry_point, *given],
                            capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"status": 0, "group_open": False}
    assert len(read_jsonl(output)) == 4


@pytest.mark.slow
def test_a_stage_on_two_vertex_replicas_trains_as_two_processes_of_one(alone_and_parallel, tiny_model_dir, tmp_path):
    """The pipeline's reward-model stage with reward_model_replica_count=2, run as Vertex AI runs it: the launcher
    task's command with its placeholders filled in by KFP's own code (the executor input: inputs, and where the
    outputs go) creates a custom job on the loopback Vertex AI API, which plays each replica as a local process
    running the job's container command with the CLUSTER_SPEC Vertex AI gives it."""
    from google.protobuf import json_format
    from kfp import dsl
    from kfp.local import executor_input_utils, placeholder_utils

    from rlhf.components.replicas import on_replicas
    from rlhf.components.reward_model import train_reward_model
    from rlhf.data.datasets import write_jsonl
    from rlhf.reward.config import RewardTrainingConfig
    from tests.distributed_stage import REWARD_SETTINGS
    from tests.vertex_loopback import VertexLoopback, write_service_account

    rows = marker_pairs(48)
    write_jsonl(tmp_path / "train.jsonl", rows[:40])
    write_jsonl(tmp_path / "held_out.jsonl", rows[40:])
    config = reward_config(**REWARD_SETTINGS)
    launcher = on_replicas(train_reward_model)
    arguments = {**{name: getattr(config, name) for name in RewardTrainingConfig.parameter_names},
                 "plain_text": False, "large_model_reference": str(tiny_model_dir), "processes": 1,
                 "huggingface_token_secret": "", "project": "p1", "replica_count": 2,
                 "machine_accelerator_type": "NVIDIA_L4", "machine_accelerator_count": 1, "machine_cpu_limit": "8",
                 "machine_memory_limit": "32G", "location": "us-central1", "encryption_spec_key_name": "",
                 **{name: dsl.Dataset(name=name, uri=str(tmp_path / f"{file}.jsonl"), metadata={})
                    for name, file in (("train_pairs", "train"), ("held_out_pairs", "held_out"))}}
    component = launcher.pipeline_spec.components[f"comp-{launcher.name}"]
    executor_input = executor_input_utils.construct_executor_input(component, arguments, str(tmp_path / "task"),
                                                                   block_input_artifact=False)
    given = executor_input_utils.executor_input_to_dict(executor_input, component)
    container = json_format.MessageToDict(launcher.pipeline_spec)["deploymentSpec"]["executors"][
        f"exec-{launcher.name}"]["container"]
    command = placeholder_utils.replace_placeholders([*container["command"], *container["args"]], given, "pipeline",
                                                     "task", str(tmp_path / "root"), "run-1")
    path = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # `python3` is this environment's
    replicas = []

    def play(job: dict) -> dict:
        """Vertex AI's part: every replica of every worker pool, told where the others are."""
        pools = job["jobSpec"]["workerPoolSpecs"]
        cluster = {f"workerpool{i}": [f"127.0.0.1:{free_port()}" for _ in range(int(pool["replicaCount"]))]
                   for i, pool in enumerate(pools)}
        for i, pool in enumerate(pools):
            for index in range(int(pool["replicaCount"])):
                spec = {"cluster": cluster, "task": {"type": f"workerpool{i}", "index": index}, "environment": "cloud"}
                replicas.append(subprocess.Popen(
                    pool["containerSpec"]["command"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env={**os.environ, **ONE_THREAD, **path, "CLUSTER_SPEC": json.dumps(spec)}))
        ended = [replica.communicate(timeout=900) for replica in replicas]
        failed = [err[-2000:] for replica, (_, err) in zip(replicas, ended) if replica.returncode]
        return {"state": "JOB_STATE_FAILED" if failed else "JOB_STATE_SUCCEEDED",
                "error": {"message": "\n".join(failed)}}

    with VertexLoopback() as vertex:
        write_service_account(tmp_path / "key.json", f"{vertex.url}/token")
        vertex.run_custom_job = play
        separator = command.index("--")
        result = subprocess.run([*command[:separator], "--api-endpoint", vertex.url, "--poll-seconds", "0.5",
                                 *command[separator:]], capture_output=True, text=True, timeout=900,
                                env={**os.environ, **path, "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "key.json")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [replica.returncode for replica in replicas] == [0, 0]
    (created,) = [r.body for r in vertex.api_requests() if r.method == "POST"]
    assert created["displayName"] == "pipeline-train-reward-model"
    assert [pool["replicaCount"] for pool in created["jobSpec"]["workerPoolSpecs"]] == [1, 1]
    # The chief's task wrote the stage's outputs where the pipeline looks for them: the model, trained as two
    # processes of one machine train it, and its metrics.
    outputs = given["outputs"]["artifacts"]
    parallel, parallel_metrics = alone_and_parallel["reward", 2]
    trained = Path(outputs["reward_model"]["artifacts"][0]["uri"])
    assert_same_tensors(trained_tensors(trained, "reward"), trained_tensors(parallel, "reward"), 1e-6)
    reported = json.loads(Path(given["outputs"]["outputFile"]).read_text())["artifacts"]["metrics"]["artifacts"][0]
    assert reported["metadata"]["final_rank_loss"] == pytest.approx(parallel_metrics["final_rank_loss"])
