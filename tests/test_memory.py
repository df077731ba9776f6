"""The memory estimate behind `rlhf submit`'s choice of GPU (`rlhf.models.memory`): the parameter count it
reads from a config, against the models themselves, and the choice it leads to."""

import pytest

from rlhf.models.memory import (
    COURSE_CONFIGS,
    DEFAULT_MODEL_CONFIG,
    GIB,
    ModelShape,
    activation_bytes,
    smallest_fitting,
    stage_bytes,
)
from rlhf.pipeline.parameters import pipeline_defaults
from tests.conftest import load_experiment


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-13b", "llama-3-8b", "gemma-2b", "gemma-7b", "default"])
def test_the_parameter_count_from_a_config_is_the_models_own(name):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = DEFAULT_MODEL_CONFIG if name == "default" else COURSE_CONFIGS[name]
    with torch.device("meta"):  # the model's shapes, without its memory
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert ModelShape.from_config(config).parameters == sum(p.numel() for p in model.parameters())


def test_the_parameter_count_of_the_tiny_model(tiny_model_dir):
    import json

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert ModelShape.from_config(config).parameters == sum(p.numel() for p in model.parameters())


def test_the_lora_count_is_what_peft_adds(tiny_model_dir):
    import json

    from transformers import AutoModelForCausalLM

    from rlhf.models.loading import add_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = sum(p.numel() for p in model.parameters())
    adapted = add_lora(model, 4)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert ModelShape.from_config(config).lora_parameters(4) == sum(p.numel() for p in adapted.parameters()) - before


def test_the_course_model_needs_a_larger_gpu_than_the_default_model():
    value = pipeline_defaults().get
    default = {stage: stage_bytes(ModelShape.from_config(DEFAULT_MODEL_CONFIG), stage, value)["total"]
               for stage in ("reward_model", "reinforcement_learning", "inference")}
    assert {smallest_fitting(size) for size in default.values()} == {"NVIDIA_L4"}
    llama = ModelShape.from_config(COURSE_CONFIGS["llama-2-7b"])
    policy = stage_bytes(llama, "reinforcement_learning", value)
    # Two 13.5 GB backbones in bfloat16 before any activation: more than an L4's 24 GB.
    assert policy["weights"] == 2 * 2 * 6_738_415_616
    assert smallest_fitting(policy["total"]) == "NVIDIA_A100_80GB"
    assert smallest_fitting(10_000 * GIB) is None


# llama-2-70b's public config.json values: 138 GB of bfloat16 weights.
LLAMA_2_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}


def test_sharded_weights_put_a_reward_model_only_the_largest_gpus_hold_on_smaller_ones():
    shape = ModelShape.from_config(LLAMA_2_70B)
    settings = {**pipeline_defaults(), "reward_model_gradient_checkpointing": True}
    alone = stage_bytes(shape, "reward_model", settings.get)
    assert alone["weights"] == 2 * shape.parameters and smallest_fitting(alone["total"]) == "NVIDIA_H200_141GB"
    sharded = stage_bytes(shape, "reward_model", {**settings, "reward_model_shard_weights": True,
                                                  "reward_model_accelerator_count": 8}.get)
    # An eighth of the decoder layers, room for two layers gathered whole, the embeddings, norm and head whole.
    layers = shape.layers * shape.layer_parameters
    whole = shape.parameters - layers
    assert sharded["weights"] == 2 * (layers // 8 + 2 * shape.layer_parameters + whole)
    assert smallest_fitting(sharded["total"]) == "NVIDIA_TESLA_A100"
    # Over two machines of 8 GPUs each, a sixteenth.
    replicas = stage_bytes(shape, "reward_model", {**settings, "reward_model_shard_weights": True,
                                                   "reward_model_accelerator_count": 8,
                                                   "reward_model_replica_count": 2}.get)
    assert replicas["weights"] == 2 * (layers // 16 + 2 * shape.layer_parameters + whole)
    # The policy stage holds two models, the policy and the reward model, both sharded.
    policy = stage_bytes(shape, "reinforcement_learning", {**settings, "reinforcement_learning_shard_weights": True,
                                                           "reinforcement_learning_accelerator_count": 8}.get)
    assert policy["weights"] == 2 * sharded["weights"]
    # The inference machine, which also runs the evaluation (both models), and bulk inference alone (one).
    inference = {stage: stage_bytes(shape, stage, {**settings, "inference_shard_weights": True,
                                                   "inference_accelerator_count": 8}.get)
                 for stage in ("inference", "bulk_inference")}
    assert inference["inference"]["weights"] == 2 * inference["bulk_inference"]["weights"] == 2 * sharded["weights"]
    # On two inference machines, bulk inference shards over both; the evaluation runs on one, over its 8 GPUs.
    two = {stage: stage_bytes(shape, stage, {**settings, "inference_shard_weights": True, "inference_accelerator_count": 8,
                                             "inference_replica_count": 2}.get)
           for stage in ("inference", "bulk_inference")}
    assert two["inference"] == inference["inference"]
    assert two["bulk_inference"]["weights"] == replicas["weights"]
    whole_on_one = stage_bytes(shape, "inference", {**settings, "inference_accelerator_count": 8}.get)
    assert smallest_fitting(whole_on_one["total"]) is None
    assert smallest_fitting(inference["inference"]["total"]) == "NVIDIA_A100_80GB"


def test_gradient_checkpointing_keeps_a_fraction_of_the_activations():
    shape = ModelShape.from_config(COURSE_CONFIGS["llama-2-7b"])
    full, checkpointed = (activation_bytes(shape, 4096, 2, on) for on in (False, True))
    assert checkpointed < full / 10


@pytest.mark.parametrize("kind", ["reward model", "policy update"])
def test_the_estimate_is_within_a_quarter_of_the_peak_measured_here(tmp_path, kind):
    """bench/memory_estimate.py's pass on the tests' tiny model, widened so that what the pass keeps stands out
    of the process's own noise (4 layers of 256; BENCHMARKS.md has the default model's numbers)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = load_experiment("memory_estimate", folder="bench")
    model = bench.tiny_model(tmp_path, hidden=256)
    script = Path(__file__).resolve().parents[1] / "bench" / "memory_estimate.py"
    output = subprocess.run([sys.executable, str(script), "--child", kind, model], capture_output=True, text=True,
                            timeout=600)
    assert output.returncode == 0, output.stderr[-3000:]
    measured = json.loads(output.stdout.strip().splitlines()[-1])
    assert 0.75 <= measured["estimate_mib"] / measured["measured_mib"] <= 1.25, measured


def test_the_readmes_table_is_what_the_estimate_gives():
    from pathlib import Path

    from rlhf.models.memory import gib
    from rlhf.pipeline.parameters import ACCELERATED_STAGES

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    value = pipeline_defaults().get
    for name in ("smollm2-135m-instruct", "llama-2-7b", "llama-2-13b", "llama-3-8b", "gemma-2b", "gemma-7b"):
        shape = ModelShape.from_config(DEFAULT_MODEL_CONFIG if name.startswith("smollm2") else COURSE_CONFIGS[name])
        totals = [stage_bytes(shape, stage, value)["total"] for stage in ACCELERATED_STAGES]
        row = (f"| `{name}` | {shape.parameters / 1e9:.2f}B | "
               + " | ".join(f"{gib(total)}, {smallest_fitting(total)}" for total in totals) + " |")
        assert row in readme, row


def test_every_course_model_name_has_its_config():
    from rlhf.models.reference import COURSE_MODELS

    assert set(COURSE_CONFIGS) == set(COURSE_MODELS)
