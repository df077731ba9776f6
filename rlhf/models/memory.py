"""How much memory a stage needs on one GPU, from the model's config alone (no weights), and the Vertex AI
accelerator that holds it.

A stage runs data-parallel (`rlhf.training.distributed`): every process holds the whole model on its own GPU
(unless the stage shards its weights over them, `*_shard_weights`: `held_weights`), so what must fit is one
process's share, whatever the accelerator count. Per process, in the precision a GPU
trains in (bfloat16, `rlhf.models.loading.pick_placement`):

- weights: every parameter of each model the stage holds: the reward-model stage one backbone; the policy
  stage the policy (whose reference is the same weights with the adapter off) and the reward model; the
  bulk-inference machine, which also runs the evaluation, the reward model and the policy;
- the adapter's training state: float32 LoRA weights, their gradients and AdamW's two moments (16 bytes each);
- activations kept for the backward pass, per token and layer: three values of the MLP's width (the gate's
  output before and after its activation, and the up projection's) and `HIDDEN_WIDTHS` of the hidden width
  (the norms' inputs in float32, the attention's queries, keys, values and output, the adapters' inputs), a
  count calibrated on the default model in float32 on a CPU (`bench/memory_estimate.py`, BENCHMARKS.md "The
  memory a stage needs"); with gradient checkpointing, each layer's input and one layer's worth;
- float32 logits where they are taken: the completion positions of the policy's update (the logits, the
  log-softmax's normaliser and their gradient: three copies) and one row per sequence while decoding;
- the KV cache of a decoding pass (keys and values of every layer for prompt + completion);
- `CUDA_RESERVED` for the CUDA context, cuBLAS workspace and the allocator's slack.

The configs of the course's models (`COURSE_CONFIGS`) are their public `config.json` values, so an estimate
for `llama-2-7b` needs no download; any other model is estimated from its `config.json` where it is readable
here (the default model, a local directory).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
HIDDEN_WIDTHS = 22  # values of the hidden width a layer keeps per token for the backward pass
MLP_WIDTHS = 3  # values of the MLP's width a layer keeps per token
CUDA_RESERVED = 1.5 * GIB
ADAPTER_STATE_BYTES = 16  # float32 weight, gradient and AdamW's two moments

# Public config.json values of the course's models (the -chat and -it variants have the same shapes).
_LLAMA_2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
               "tie_word_embeddings": False}
_LLAMA_2_13B = {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
                "tie_word_embeddings": False}
_LLAMA_3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
               "tie_word_embeddings": False}
_GEMMA_2B = {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
             "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 256000,
             "tie_word_embeddings": True}
_GEMMA_7B = {"model_type": "gemma", "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "vocab_size": 256000,
             "tie_word_embeddings": True}
COURSE_CONFIGS = {
    "llama-2-7b": _LLAMA_2_7B, "llama-2-7b-chat": _LLAMA_2_7B,
    "llama-2-13b": _LLAMA_2_13B, "llama-2-13b-chat": _LLAMA_2_13B,
    "llama-3-8b": _LLAMA_3_8B, "llama-3-8b-instruct": _LLAMA_3_8B,
    "gemma-2b": _GEMMA_2B, "gemma-2b-it": _GEMMA_2B, "gemma-7b": _GEMMA_7B, "gemma-7b-it": _GEMMA_7B,
}

# SmolLM2-135M-Instruct's shape, for estimates on a machine that has not converted it yet.
DEFAULT_MODEL_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                        "tie_word_embeddings": True}


# Memory of each GPU Vertex AI offers, as nvidia-smi reports its total (MiB), and the order `rlhf submit` tries
# them in when it chooses: the cheapest first, among those with bfloat16 (T4, P100 and V100 have none).
GPU_MEMORY_MIB = {"NVIDIA_TESLA_T4": 15360, "NVIDIA_TESLA_P100": 16280, "NVIDIA_TESLA_V100": 16384,
                  "NVIDIA_L4": 23034, "NVIDIA_TESLA_A100": 40960, "NVIDIA_A100_80GB": 81920,
                  "NVIDIA_H100_80GB": 81559, "NVIDIA_H100_MEGA_80GB": 81559, "NVIDIA_H200_141GB": 143771,
                  "NVIDIA_B200": 183359}
# The stages that can shard their frozen weights, by the prefix of their machine parameters, and the parameter
# that asks for it.
SHARDING = {"reward_model": "reward_model_shard_weights",
            "reinforcement_learning": "reinforcement_learning_shard_weights",
            "inference": "inference_shard_weights"}
CHOICE_ORDER = ("NVIDIA_L4", "NVIDIA_TESLA_A100", "NVIDIA_A100_80GB", "NVIDIA_H200_141GB", "NVIDIA_B200")


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a decoder-only transformer's config."""

    parameters: int
    layer_parameters: int  # one decoder layer's
    layers: int
    hidden: int
    intermediate: int  # the MLP's width
    query_width: int  # attention heads x head width (the hidden size, except in models such as gemma-7b)
    kv_width: int  # keys' (and values') width per token per layer: key-value heads x head width
    vocabulary: int

    @classmethod
    def from_config(cls, config: dict) -> ModelShape:
        hidden, layers, vocabulary = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_width = config.get("head_dim") or hidden // heads
        query_width, kv_width = heads * head_width, kv_heads * head_width
        attention = 2 * hidden * query_width + 2 * hidden * kv_width  # q and o; k and v
        if config.get("attention_bias"):
            attention += query_width + 2 * kv_width + hidden
        mlp = 3 * hidden * config["intermediate_size"]  # gate, up, down
        if config.get("mlp_bias"):
            mlp += 2 * config["intermediate_size"] + hidden
        norms = 2 * hidden
        embeddings = vocabulary * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
        return cls(parameters=layers * (attention + mlp + norms) + hidden + embeddings,
                   layer_parameters=attention + mlp + norms, layers=layers,
                   hidden=hidden, intermediate=config["intermediate_size"], query_width=query_width,
                   kv_width=kv_width, vocabulary=vocabulary)

    def lora_parameters(self, rank: int) -> int:
        """The adapters of the attention projections (`rlhf.models.loading.DEFAULT_LORA_TARGETS`): A (rank x
        input) and B (output x rank) for each of q, k, v and o."""
        widths = 2 * (self.hidden + self.query_width) + 2 * (self.hidden + self.kv_width)
        return self.layers * rank * widths


def model_config(reference: str) -> dict | None:
    """The config of `large_model_reference` where it is known without downloading anything, else None."""
    from rlhf.models.reference import classify_model_reference, default_model_dir

    kind, resolved = classify_model_reference(reference)
    if kind == "course":
        return COURSE_CONFIGS.get(reference.strip().lower())
    if kind == "default":
        path = default_model_dir() / "config.json"
        return json.loads(path.read_text()) if path.is_file() else DEFAULT_MODEL_CONFIG
    if kind == "local":
        return json.loads((Path(resolved) / "config.json").read_text())
    return None


def activation_bytes(shape: ModelShape, tokens: int, value_bytes: int, checkpointed: bool) -> int:
    """What one training forward pass over `tokens` tokens keeps for its backward pass."""
    layer = HIDDEN_WIDTHS * shape.hidden + MLP_WIDTHS * shape.intermediate
    if checkpointed:  # each layer's input, and one layer recomputed at a time
        return tokens * value_bytes * (shape.layers * shape.hidden + layer)
    return tokens * value_bytes * shape.layers * layer


def completion_logits_bytes(shape: ModelShape, rows: int, completion_tokens: int) -> int:
    """The policy update's float32 logits at the completion positions: the logits, the log-softmax's normaliser
    and their gradient, three copies."""
    return 3 * rows * completion_tokens * shape.vocabulary * 4


def kv_cache_bytes(shape: ModelShape, rows: int, length: int, value_bytes: int) -> int:
    return 2 * shape.layers * rows * length * shape.kv_width * value_bytes


def stage_bytes(shape: ModelShape, stage: str, value, value_bytes: int = 2) -> dict[str, int]:
    """Bytes per process of `stage` (reward_model, reinforcement_learning, inference with the evaluation, or
    bulk_inference alone), by what holds them;
    `value(name)` gives a pipeline parameter's value."""
    length = value("prompt_sequence_length") + value("target_sequence_length")
    weights = held_weights(shape, value_bytes, shards(stage, value))
    if stage == "reward_model":
        parts = {"weights": weights,
                 "adapter state": shape.lora_parameters(value("reward_lora_dim")) * ADAPTER_STATE_BYTES,
                 "activations": activation_bytes(shape, value("reward_model_micro_batch_tokens"), value_bytes,
                                                 value("reward_model_gradient_checkpointing"))}
    elif stage == "reinforcement_learning":
        micro = value("reinforcement_learning_micro_batch_size")
        rollout_rows = value("reinforcement_learning_rollout_micro_batch_size") or micro
        training = (activation_bytes(shape, micro * length, value_bytes,
                                     value("reinforcement_learning_gradient_checkpointing"))
                    + completion_logits_bytes(shape, micro, value("target_sequence_length")))
        sampling = kv_cache_bytes(shape, rollout_rows, length, value_bytes) + rollout_rows * shape.vocabulary * 4
        rank = value("policy_lora_dim") or 0
        # Full fine-tuning (rank 0) keeps float32 master weights with AdamW's moments and gradients.
        adapter = shape.lora_parameters(rank) if rank else shape.parameters
        parts = {"weights": 2 * weights,  # the policy (its reference: the adapter off) and the reward model
                 "adapter state": adapter * ADAPTER_STATE_BYTES,
                 "activations or sampling": max(training, sampling)}
    elif stage in ("inference", "bulk_inference"):
        rows = value("inference_batch_size")
        # In `rlhf_pipeline` the evaluation runs on the bulk-inference machine and holds the reward model and the
        # policy at once; `infer_pipeline`'s bulk inference alone holds one model.
        parts = {"weights": (2 if stage == "inference" else 1) * weights,
                 "sampling": kv_cache_bytes(shape, rows, length, value_bytes) + rows * shape.vocabulary * 4}
    else:
        raise ValueError(f"no estimate for stage {stage!r}")
    parts["CUDA and the allocator"] = int(CUDA_RESERVED)
    parts["total"] = sum(parts.values())
    return parts


def shards(stage: str, value) -> int:
    """The processes a stage's frozen weights are split over: every GPU of its machines with
    `*_shard_weights`, else 1 (each holds them all). Bulk inference alone (`infer_pipeline`) runs on the
    inference machines; `rlhf_pipeline`'s inference stage counts its evaluation, which runs on one of them."""
    prefix = "inference" if stage == "bulk_inference" else stage
    if prefix not in SHARDING or not value(SHARDING[prefix]):
        return 1
    machines = 1 if stage == "inference" else value(f"{prefix}_replica_count") or 1
    return value(f"{prefix}_accelerator_count") * machines


def held_weights(shape: ModelShape, value_bytes: int, shards: int) -> int:
    """One process's bytes of one model's weights: all of them, or, sharded over `shards` processes
    (`rlhf.training.sharding`), its share of the decoder layers, room for two layers whole (the one it computes
    with is gathered whole; two, for the allocator's slack between one layer's and the next), and the embeddings,
    final norm and head, which stay whole."""
    if shards == 1:
        return shape.parameters * value_bytes
    layers = shape.layers * shape.layer_parameters
    return (math.ceil(layers / shards) + 2 * shape.layer_parameters + shape.parameters - layers) * value_bytes


def fits(accelerator: str, needed: int) -> bool:
    return accelerator in GPU_MEMORY_MIB and needed <= GPU_MEMORY_MIB[accelerator] * 1024**2


def smallest_fitting(needed: int) -> str | None:
    """The first accelerator of CHOICE_ORDER whose memory holds `needed` bytes, or None when none does."""
    return next((name for name in CHOICE_ORDER if fits(name, needed)), None)


def gib(size: int) -> str:
    return f"{math.ceil(size / GIB * 10) / 10:.1f} GiB"
