"""Loading models and tokenizers: device and precision choice, safetensors only, LoRA set-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def pick_placement(device: str = "auto") -> Placement:
    """CUDA with bfloat16 when present (float32 where bf16 is unsupported), else the CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = torch.device(device)
    if chosen.type == "cuda":
        return Placement(chosen, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    return Placement(chosen, torch.float32)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token, which marks where a completion ends")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _no_dropout(config) -> None:
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


class ModelLoadError(RuntimeError):
    """A model directory that exists but cannot be loaded (corrupt or truncated weights, a bad config)."""


def _load(auto_class, path: str, placement: Placement, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        _no_dropout(config)
        model = auto_class.from_pretrained(path, config=config, dtype=placement.dtype, use_safetensors=True,
                                           trust_remote_code=trust_remote_code, attn_implementation="sdpa")
    except Exception as error:  # transformers, safetensors and the OS each fail with their own types
        raise ModelLoadError(f"cannot load the model from {path}: {type(error).__name__}: {error}") from error
    return model.to(placement.device)


def load_backbone(path: str, placement: Placement, trust_remote_code: bool = False):
    """The transformer without its language-model head (the reward model needs hidden states only)."""
    from transformers import AutoModel

    return _load(AutoModel, path, placement, trust_remote_code)


def load_causal_lm(path: str, placement: Placement, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, path, placement, trust_remote_code)


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


def scalar_head(model, seed: int) -> torch.nn.Linear:
    """A fresh linear head from the model's hidden size to one number, seeded, on the model's device."""
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, hidden ** -0.5, generator=generator)
        head.bias.zero_()
    return head.to(next(model.parameters()).device)
