"""Loading models and tokenizers: device and precision choice, safetensors only, LoRA set-up."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

import torch

from rlhf.errors import RunFailure, UserError
from rlhf.settings import cpu_precision

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def pick_placement(device: str = "auto", dtype: torch.dtype | None = None) -> Placement:
    """CUDA with bfloat16 when present (float32 where bf16 is unsupported), else the CPU in float32. `dtype`
    overrides the choice: the precision tests and `bench/gpu_check.py` run bfloat16 on a CPU too."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if dtype is not None:
        return Placement(chosen, dtype)
    if chosen.type == "cuda":
        return Placement(chosen, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    return Placement(chosen, torch.float32)


def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX): there a training step in bfloat16
    took half to two thirds of its float32 time (BENCHMARKS.md section 16). Not measured on CPUs with only
    AVX-512's bfloat16 dot products; an AVX2 CPU has no bfloat16 arithmetic at all."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe() and torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_training_dtype() -> torch.dtype:
    chosen = cpu_precision()
    if chosen == "auto":
        return torch.bfloat16 if cpu_has_amx() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[chosen]


def training_placement(device: str = "auto") -> Placement:
    """Where a training stage runs and in what precision: as `pick_placement`, except that on a CPU the
    precision is `RLHF_CPU_PRECISION`'s (`rlhf.settings.cpu_precision`): bfloat16 by default where the CPU
    has AMX, as a GPU stage trains. What judges a run stays in `pick_placement`'s float32 on a CPU (the
    reward model's scores of rollouts, bulk inference, the evaluation), so the judge does not depend on the
    CPU's matrix unit."""
    placement = pick_placement(device)
    if placement.device.type != "cpu":
        return placement
    return Placement(placement.device, cpu_training_dtype())


def processor_name(device: torch.device) -> str:
    """The chip a stage computed on, as a person compares machines: the GPU's name, or the CPU's model with the
    widest vector instructions torch uses on it and whether it has AMX. Float results and speed differ between
    CPUs (an AVX2 CPU took three times an AMX one's time on the same step), so each stage's metrics name it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    features = [torch.backends.cpu.get_cpu_capability()] + (["AMX"] if cpu_has_amx() else [])
    return f"{model} ({', '.join(features)})"


# What `machine` records; a run's metrics.json keeps these of each stage (rlhf.evaluation.compare).
MACHINE_KEYS = ("device", "dtype", "processor", "torch", "threads")


def machine(placement: Placement) -> dict:
    """What a stage's metrics record of where it ran: device, precision, processor, torch's version and its
    threads, so two runs whose numbers differ can be told apart."""
    return {"device": str(placement.device), "dtype": str(placement.dtype).removeprefix("torch."),
            "processor": processor_name(placement.device), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def in_float32(model) -> bool:
    """Whether the model's weights are float32: below it, a merged LoRA update is rounded and a one-token
    pass over the KV cache rounds differently from a full pass."""
    return next(model.parameters()).dtype == torch.float32


def float32_head(model) -> None:
    """The language-model head's product in float32 when the weights are in a lower precision, from a float32
    copy of its weight: a bfloat16 logit near 20 is rounded by up to 0.06 nats, so log-probs, PPO's ratios and
    the KL would carry that much noise. The copy is not a parameter (never saved, never trained: adapters
    leave the head alone); it costs the head's weights once more in float32."""
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype == torch.float32:
        return
    head.register_buffer("weight_float32", head.weight.detach().float(), persistent=False)
    bias = None if head.bias is None else head.bias.detach().float()
    head.forward = lambda hidden: torch.nn.functional.linear(hidden.float(), head.weight_float32, bias)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise UserError(f"{path}: the tokenizer has no EOS token, which marks where a completion ends")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and each EOS id of the model's generation config
    (gemma's `<end_of_turn>`, llama-3's `<|eot_id|>` are listed there, not as the tokenizer's EOS)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys([tokenizer.eos_token_id, *listed]))


_DROPOUT_SETTING = re.compile(r"dropout|pdrop|layerdrop")


def _no_dropout_settings(config) -> None:
    """Zero every dropout probability the config holds, whatever the architecture names it: layers that call
    the functional dropout read these numbers, not a module."""
    for name, value in list(vars(config).items()):
        if _DROPOUT_SETTING.search(name) and isinstance(value, float):
            setattr(config, name, 0.0)


def disable_dropout(model) -> None:
    """Every `nn.Dropout` to 0: training (RL above all, whose log-prob ratios must be 1 before an update)
    needs the same outputs as sampling and scoring."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class OneDNNLinear(torch.nn.Linear):
    """A float32 linear layer on a CPU whose products without gradients run through oneDNN's kernel
    (`torch.ops.mkldnn._linear_pointwise`, the one inductor compiles CPU linears to); with gradients, torch's
    usual one (MKL). MKL is fast for the training passes' tall products but slow for decoding's skinny ones,
    a few rows times every weight: a decode step of the default model at 4 rows runs about 1.5x faster
    through oneDNN, at 8 rows 1.2-1.4x (`bench/linear_kernels.py`). The two kernels sum in different orders,
    so their results differ by float32 rounding. The class swap (not a patched `forward`) survives
    `copy.deepcopy` and `peft`'s wrapping, which check `isinstance(module, nn.Linear)`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or input.device.type != "cpu" or self.weight.dtype != torch.float32:
            return super().forward(input)
        return torch.ops.mkldnn._linear_pointwise(input.contiguous(), self.weight, self.bias, "none", [], "")


def onednn_linears(model) -> None:
    """Every plain float32 `nn.Linear` of a model on a CPU becomes a `OneDNNLinear`, where torch has oneDNN."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" \
                and module.weight.dtype == torch.float32:
            module.__class__ = OneDNNLinear


class ModelLoadError(RunFailure):
    """A model directory that exists but cannot be loaded (corrupt or truncated weights, a bad config)."""


def _load(auto_class, path: str, placement: Placement, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        _no_dropout_settings(config)
        # On a GPU the weights go there shard by shard, so the host's memory never holds the model (a 7B one
        # is 13.5 GB in bfloat16): the stage's `*_memory_limit` need not grow with the model.
        on_gpu = {"device_map": {"": placement.device}} if placement.device.type == "cuda" else {}
        model = auto_class.from_pretrained(path, config=config, dtype=placement.dtype, use_safetensors=True,
                                           trust_remote_code=trust_remote_code, attn_implementation="sdpa", **on_gpu)
    except Exception as error:  # transformers, safetensors and the OS each fail with their own types
        raise ModelLoadError(f"cannot load the model from {path}: {type(error).__name__}: {error}") from error
    disable_dropout(model)
    model = model.to(placement.device)
    onednn_linears(model)
    return model


def load_backbone(path: str, placement: Placement, trust_remote_code: bool = False):
    """The transformer without its language-model head (the reward model needs hidden states only)."""
    from transformers import AutoModel

    return _load(AutoModel, path, placement, trust_remote_code)


def load_causal_lm(path: str, placement: Placement, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    model = _load(AutoModelForCausalLM, path, placement, trust_remote_code)
    float32_head(model)
    return model


def lora_targets(model) -> list[str] | str:
    """The attention projections when the model names them as Llama-style models do, else all linears."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [t for t in DEFAULT_LORA_TARGETS if t in names]
    return found or "all-linear"


def add_lora(model, rank: int, alpha: float | None = None):
    """Wrap `model` with a fresh LoRA adapter of `rank` (alpha defaults to 2 * rank), dropout off."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, target_modules=lora_targets(model),
                        bias="none")
    return get_peft_model(model, config)


def recompute_activations(model) -> None:
    """Gradient checkpointing: each layer's activations are recomputed in the backward pass instead of kept.
    Non-reentrant, so a frozen embedding under a LoRA adapter needs no input gradients; passes without
    gradients (sampling with the KV cache) run as before."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def value_head(model) -> torch.nn.Linear:
    """A zero linear head from the model's hidden size to one number: every value starts at 0, so the first
    advantages are the rewards themselves rather than a random head's error."""
    head = torch.nn.Linear(model.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    return head.to(next(model.parameters()).device)


def scalar_head(model, seed: int) -> torch.nn.Linear:
    """A fresh linear head from the model's hidden size to one number, seeded, on the model's device."""
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, hidden ** -0.5, generator=generator)
        head.bias.zero_()
    return head.to(next(model.parameters()).device)
