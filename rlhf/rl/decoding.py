"""Decoding: completions for a batch of prompts, one token at a time over the KV cache.

This is our own loop rather than `transformers`' `generate`, for PPO's sake. It keeps, at no extra cost,
what PPO needs from the sampling pass itself: the log-prob of every sampled token and the last hidden state
before it (for the value head), which spares every rollout a second full forward pass of the policy. And it
trims a decode step, which on a CPU is bound by reading every weight once per token plus a fixed cost per
operator call: `adapter_merged` folds the LoRA adapter into (a copy of) the adapted weights while
decoding, removing the adapter's own small products from every layer of every step, and
`preallocated_cache` writes each token's keys and values into room reserved up front instead of copying
the whole cache at every token. On a CPU, a Llama-architecture model (in float32, or in bfloat16 with the
adapter's low-rank term beside the weights) decodes every token after the first through `cpu_decode_step`:
the decoder written out for one token per row, over fused weights reordered for the CPU's kernel.

Sampling follows `generate`'s rules (temperature, then nucleus filtering that keeps at least one token),
and greedy decoding gives `generate`'s tokens. The draw itself is an inverse-CDF lookup with one uniform
number per row from the global torch generator: the same distribution as `torch.multinomial`, which
`generate` uses and which costs ~6 ms per call on a 49k vocabulary on a CPU (against ~0.1 ms here),
once per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf.models.loading import in_float32
from rlhf.rl.cpu_decode_step import cpu_decode_step
from rlhf.rl.rollouts import Rollout, completion_mask, left_pad, positions
from rlhf.training.distributed import ALONE, Ranks


@dataclass
class Decoded:
    """A rollout and what the sampling pass saw on the way."""

    rollout: Rollout
    log_probs: torch.Tensor  # [batch, completion]: log-prob of each token under the temperature-scaled distribution
    hidden: torch.Tensor | None  # [batch, completion, hidden]: the last hidden state that predicted each token


@contextmanager
def adapter_merged(model):
    """Within the block, a `peft` model runs with its active LoRA adapters folded into the base weights.

    The merged weights are new tensors; on leaving, the base layers get their original tensors back, bit
    for bit (subtracting the update again, as `unmerge` does, would leave rounding errors in the reference
    model after every step). The cost is the memory of those new tensors while the block runs: the adapted
    layers' weights once more (the attention projections: a fifth of the default model's weights).

    Float32 weights only: in bfloat16 the sum would round away most of a small update (a weight near 0.05
    moves in steps of 2.4e-4), and the model sampled would not be the policy trained; there the adapter
    stays as it is."""
    from peft.tuners.lora import LoraLayer

    if not in_float32(model):
        yield
        return
    swapped = []
    with model.disable_adapter():
        try:
            for module in model.modules():
                if not isinstance(module, LoraLayer):
                    continue
                names = [name for name in module.active_adapters if name in module.lora_A]
                if not names:
                    continue
                base = module.get_base_layer()
                original = base.weight.data
                base.weight.data = original + sum(module.get_delta_weight(name) for name in names).to(original.dtype)
                swapped.append((base, original))
            yield
        finally:
            for base, original in swapped:
                base.weight.data = original


def preallocated_cache(model, capacity: int):
    """`transformers`' dynamic cache, with every full-attention layer writing into room for `capacity` tokens
    reserved up front. The dynamic layer concatenates instead: a fresh copy of its whole cache, for every
    layer, at every token."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                batch, heads, _, width = key_states.shape
                self.key_room = key_states.new_empty(batch, heads, capacity, width)
                self.value_room = value_states.new_empty(batch, value_states.shape[1], capacity,
                                                         value_states.shape[-1])
                self.filled = 0
            end = self.filled + key_states.shape[-2]
            self.key_room[:, :, self.filled:end] = key_states
            self.value_room[:, :, self.filled:end] = value_states
            self.filled = end
            self.keys, self.values = self.key_room[:, :, :end], self.value_room[:, :, :end]
            return self.keys, self.values

    cache = DynamicCache(config=model.config)
    # Sliding-window and other special layers keep their own bookkeeping.
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool) -> torch.Tensor:
    """One token per row from next-token logits [batch, vocabulary]."""
    if greedy:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_p < 1.0:
        ascending, order = scores.sort(dim=-1)
        # Drop the least likely tokens whose total probability stays within 1 - top_p; the likeliest is always kept.
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    cumulative = scores.softmax(dim=-1).double().cumsum(dim=-1)
    point = torch.rand(len(cumulative), 1, dtype=torch.float64, device=cumulative.device) * cumulative[:, -1:]
    # The first token whose cumulative probability passes the point: never one of probability 0.
    return torch.searchsorted(cumulative, point, right=True).squeeze(1).clamp(max=cumulative.shape[1] - 1)


@torch.no_grad()
def decode(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
           temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, keep_hidden: bool = False,
           in_step: Ranks = ALONE) -> Decoded:
    """Sample (or greedily decode) up to `max_new_tokens` per prompt; a row stops at its first stop token
    (`stop_ids`: EOS and the model's other end-of-turn ids, see `modeling.stop_token_ids`) and is padded
    after it, and decoding stops once every row has stopped: every row of every rank of `in_step`, the ranks
    the model's weights are sharded over (`rlhf.training.sharding`), which run each token's pass together."""
    if max_new_tokens < 1:
        raise ValueError(f"decoding needs at least one new token, got max_new_tokens={max_new_tokens}")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    cache = preallocated_cache(model, ids.shape[1] + max_new_tokens)
    inputs, attention, position = ids, mask, positions(mask)
    stop = torch.tensor(list(stop_ids), device=device)
    stopped = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, log_probs, hidden = [], [], []
    written_out = None  # built once the prefill is done and a second token is wanted
    for index in range(max_new_tokens):
        if index == 1 and not in_step.parallel:  # the written-out step reads whole weights
            written_out = cpu_decode_step(model, len(prompts))
        if written_out is not None:
            logits, last_hidden = written_out(inputs[:, 0], position[:, 0], attention, cache)
        else:
            output = model(input_ids=inputs, attention_mask=attention, position_ids=position, past_key_values=cache,
                           use_cache=True, logits_to_keep=1, output_hidden_states=keep_hidden)
            logits = output.logits[:, -1].float()
            last_hidden = output.hidden_states[-1][:, -1] if keep_hidden else None
        chosen = pick_tokens(logits, temperature, top_p, greedy).masked_fill(stopped, pad_id)
        tokens.append(chosen)
        log_probs.append(F.log_softmax(logits / temperature, dim=-1).gather(1, chosen[:, None]).squeeze(1))
        if keep_hidden:
            hidden.append(last_hidden)
        stopped |= torch.isin(chosen, stop)
        if not in_step.any(not bool(stopped.all())):
            break
        inputs = chosen[:, None]
        attention = torch.cat([attention, torch.ones_like(inputs)], dim=1)
        position = position[:, -1:] + 1
    model.train(was_training)
    completions = torch.stack(tokens, dim=1)
    keep, ended = completion_mask(completions, stop_ids)
    rollout = Rollout(torch.cat([ids, completions], dim=1), torch.cat([mask, keep], dim=1), keep, ended)
    return Decoded(rollout, torch.stack(log_probs, dim=1), torch.stack(hidden, dim=1) if keep_hidden else None)


def generate(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, in_step: Ranks = ALONE) -> Rollout:
    """Completions only."""
    return decode(model, prompts, max_new_tokens, stop_ids, pad_id, temperature, top_p, greedy,
                  in_step=in_step).rollout
