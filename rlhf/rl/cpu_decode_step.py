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

The step computes what `transformers`' Llama computes, up to the order of its sums (in float32 the logits
agree within 1e-5, `tests/test_decoding.py`): the embedding, norms, rotary embedding and activation are the
model's own modules and functions, the attention is SDPA over the keys and values the prefill left in the decode
loop's preallocated cache. In bfloat16 (a training stage on a CPU with AMX, `rlhf.models.loading`), where
`adapter_merged` leaves a LoRA adapter beside the weights, the step adds the adapter's own low-rank product to
each adapted projection as `peft` does (in float32, then rounded to the layer's dtype), and the head computes
from its float32 copy (`float32_head`); the products read half the bytes and run about twice as fast (a
whole step 1.6-1.7x at 8 and 16 rows, no faster at 4: BENCHMARKS.md section 16). Anything else
(another architecture, biases, another dtype or device, an adapter kind other than plain LoRA, too little
memory for the reordered copy) gets no written-out step, and decoding runs the model's own forward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Projection(NamedTuple):
    """What a linear layer applies in a decode step: its weight, and the low-rank terms (A, B, scale) of the
    LoRA adapters acting beside it (none where the adapter is off or folded into the weight)."""

    weight: torch.Tensor
    low_rank: tuple[tuple[torch.Tensor, torch.Tensor, float], ...]


def _projection(layer) -> Projection | None:
    """None where an adapter acts in a way the step does not write out (DoRA, another adapter kind)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(layer, LoraLayer):
        return Projection(layer.weight, ())
    active = [] if layer.disable_adapters or layer.merged else [n for n in layer.active_adapters if n in layer.lora_A]
    if any(layer.use_dora.get(name) or not isinstance(layer.lora_A[name], torch.nn.Linear) for name in active):
        return None
    return Projection(layer.get_base_layer().weight,
                      tuple((layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n]) for n in active))


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

        def fused(*layers):
            """One product for several projections of the same input: the weights stacked and reordered, and
            each adapter's term placed at its projection's columns."""
            projections = [_projection(layer) for layer in layers]
            weight = torch.cat([p.weight for p in projections]).contiguous()
            widths = [p.weight.shape[0] for p in projections]
            terms = [(a, b, scale, sum(widths[:i]), widths[i])
                     for i, p in enumerate(projections) for a, b, scale in p.low_rank]
            return torch.ops.mkldnn._reorder_linear_weight(weight, rows), terms, weight.shape[0]

        self.layers = []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm,
                fused(attention.q_proj, attention.k_proj, attention.v_proj),
                fused(attention.o_proj),
                layer.post_attention_layernorm,
                fused(mlp.gate_proj, mlp.up_proj),
                mlp.act_fn,
                fused(mlp.down_proj),
            ))
        head = causal_lm.lm_head
        # float32_head's copy where the weights are in a lower precision: the model's own head computes from it.
        self.head = torch.ops.mkldnn._reorder_linear_weight(getattr(head, "weight_float32", head.weight), rows)

    @staticmethod
    def _product(inputs: torch.Tensor, fused) -> torch.Tensor:
        packed_weight, terms, width = fused
        output = torch.ops.mkldnn._linear_pointwise(inputs, packed_weight, None, "none", [], "")
        if not terms:
            return output
        low_rank = inputs.new_zeros(len(inputs), width, dtype=torch.float32)
        for a, b, scale, start, columns in terms:
            low_rank[:, start:start + columns] += (inputs.to(a.dtype) @ a.T) @ b.T * scale
        return (output + low_rank).to(output.dtype)

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
        logits = torch.ops.mkldnn._linear_pointwise(hidden.to(self.head.dtype), self.head, None, "none", [], "")
        return logits, hidden


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
            or getattr(config, "pretraining_tp", 1) != 1 or weight.device.type != "cpu"
            or weight.dtype not in (torch.float32, torch.bfloat16)
            or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not torch.backends.mkldnn.is_available()
            or (weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())):
        return None
    layers = [p for layer in causal_lm.model.layers for p in (
        layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
        layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
    projections = [_projection(layer) for layer in layers]
    head = _projection(causal_lm.lm_head)
    if any(p is None for p in projections) or head is None or head.low_rank:
        return None
    copy_bytes = sum(p.weight.numel() * p.weight.element_size() for p in projections) + weight.numel() * 4
    available = memory_available()
    if available is not None and available < 2 * copy_bytes:
        return None
    return CpuDecodeStep(causal_lm, rows)
