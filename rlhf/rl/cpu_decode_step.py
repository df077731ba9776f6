"""One decode step of a Llama-architecture model, written out for a CPU.

A decode step multiplies a few rows by every weight of the model, and on a CPU it is slow for two reasons
that have nothing to do with the arithmetic (`bench/decode_step.py`): the kernel reads the weights well under
the machine's memory rate when they are laid out as the checkpoint stores them, and `transformers`' layers add
a fixed cost per token (the mask, cache and module bookkeeping of a forward pass meant for any shape). Here
the step is the Llama decoder written out for one token per row: the query, key and value projections are
one product, the gate and up projections another, and every weight is reordered once, before the first
step, into oneDNN's blocked layout for the decode's row count (`torch.ops.mkldnn._reorder_linear_weight`,
the layout inductor packs CPU linears into). Reordering the default model's 538 MB of weights takes
0.2-0.4 s on a 2-core CPU, what about ten of its steps save; the copies live while decoding runs.

The step computes what `transformers`' Llama computes, in float32, up to the order of its sums (logits
agree within 1e-5, `tests/test_decoding.py`): the embedding, norms, rotary embedding and activation are the
model's own modules and functions, the attention is SDPA over the keys and values the prefill left in the decode loop's
preallocated cache. Anything else (another architecture, biases, another dtype, another device, an adapter
that is active and not folded into the weights, too little memory for the reordered copy) gets no
written-out step, and decoding runs the model's own forward pass as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _folded_weight(projection) -> torch.Tensor | None:
    """The weight a projection applies: its own, or a LoRA layer's base weight where no adapter is active
    on top of it (disabled, or merged into that weight). None where an adapter is active and separate."""
    from peft.tuners.lora import LoraLayer

    if isinstance(projection, LoraLayer):
        active = [name for name in projection.active_adapters if name in projection.lora_A]
        if active and not projection.disable_adapters and not projection.merged:
            return None
        projection = projection.get_base_layer()
    return projection.weight


class CpuDecodeStep:
    """Next-token logits and last hidden states for one new token per row."""

    def __init__(self, causal_lm, rows: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.rotated = apply_rotary_pos_emb  # the model's own, imported here: decoding's import stays light
        decoder = causal_lm.model
        config = causal_lm.config
        self.embed, self.rotary, self.final_norm = decoder.embed_tokens, decoder.rotary_emb, decoder.norm
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_width = getattr(config, "head_dim", None) or config.hidden_size // self.heads

        def packed(*weights):
            return torch.ops.mkldnn._reorder_linear_weight(torch.cat(weights).contiguous(), rows)

        self.layers = []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm,
                packed(*(_folded_weight(p) for p in (attention.q_proj, attention.k_proj, attention.v_proj))),
                packed(_folded_weight(attention.o_proj)),
                layer.post_attention_layernorm,
                packed(_folded_weight(mlp.gate_proj), _folded_weight(mlp.up_proj)),
                mlp.act_fn,
                packed(_folded_weight(mlp.down_proj)),
            ))
        self.head = packed(_folded_weight(causal_lm.lm_head))

    @staticmethod
    def _product(inputs: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs, packed_weight, None, "none", [], "")

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, position: torch.Tensor, attention: torch.Tensor,
                 cache) -> tuple[torch.Tensor, torch.Tensor]:
        """`tokens` and `position` [rows]; `attention` [rows, tokens so far with this one], 1 where a row
        has a real token; `cache` the decode loop's preallocated cache, which gets this token's keys and
        values. Returns the logits [rows, vocabulary] and the final norm's output [rows, hidden]."""
        rows, heads, kv_heads, width = len(tokens), self.heads, self.kv_heads, self.head_width
        hidden = self.embed(tokens)
        cos, sin = self.rotary(hidden, position[:, None])
        allowed = attention.bool()[:, None, None, :]
        for (input_norm, qkv, out, post_norm, gate_up, act, down), room in zip(self.layers, cache.layers):
            query, key, value = self._product(input_norm(hidden), qkv).split(
                [heads * width, kv_heads * width, kv_heads * width], dim=-1)
            query, key = self.rotated(query.view(rows, heads, 1, width), key.view(rows, kv_heads, 1, width), cos, sin)
            at = room.filled
            room.key_room[:, :, at] = key[:, :, 0]
            room.value_room[:, :, at] = value.view(rows, kv_heads, width)
            room.filled = at + 1
            mixed = F.scaled_dot_product_attention(query, room.key_room[:, :, :at + 1], room.value_room[:, :, :at + 1],
                                                   attn_mask=allowed, enable_gqa=True)
            hidden = hidden + self._product(mixed.reshape(rows, heads * width), out)
            gate, up = self._product(post_norm(hidden), gate_up).chunk(2, dim=-1)
            hidden = hidden + self._product(act(gate) * up, down)
        hidden = self.final_norm(hidden)
        return self._product(hidden, self.head), hidden


def memory_available() -> int | None:
    """Bytes the kernel can hand out without swapping (Linux's MemAvailable), or None where it does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_decode_step(model, rows: int) -> CpuDecodeStep | None:
    """The written-out step for `model` (a causal LM, or a `peft` model around one) at `rows` rows, or None
    where it would not compute exactly what the model's forward pass does, or would not be faster, or where
    its reordered copy of the weights would not fit twice in the memory left (a larger model on a laptop)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = causal_lm.config
    weight = causal_lm.lm_head.weight
    if (config.model_type != "llama" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
            or getattr(config, "pretraining_tp", 1) != 1 or weight.device.type != "cpu" or weight.dtype != torch.float32
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not torch.backends.mkldnn.is_available()):
        return None
    projections = [causal_lm.lm_head] + [p for layer in causal_lm.model.layers for p in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    if any(_folded_weight(p) is None for p in projections):
        return None
    copy_bytes = sum(p.weight.numel() * p.weight.element_size() for p in projections)
    available = memory_available()
    if available is not None and available < 2 * copy_bytes:
        return None
    return CpuDecodeStep(causal_lm, rows)
