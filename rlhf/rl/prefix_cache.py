"""Prompts' keys and values under a frozen model, computed once and reused from one step to the next.

The reinforcement-learning loop sends the same prompts through the same frozen models step after step: the
reference (the policy with its adapter switched off) and the reward model read each of the bundled sample's
40 prompts at 8 of the local run's 20 steps, and the prompt is most of what they read (about 160 of 210
tokens a row). A frozen model's keys and values for a prompt never change, so they are computed the first
time and kept; every later pass runs the completion's tokens alone, attending to the kept prompt through
`transformers`' KV cache, as a decode step does. The prompt's work is done once instead of once per step.

Kept up to `PREFIX_CACHE_BYTES` per model, first come first kept (a prompt that does not fit is computed for
the pass and not kept), so memory is bounded whatever the prompt set. The passes agree with a full pass of
prompt and completion to float rounding where the reward model's packing is exact (`packing_problem`: full
attention through SDPA or eager); callers keep the full pass for other backbones.
"""

from __future__ import annotations

import torch

from rlhf.rl.rollouts import left_pad

# Per model. The default model keeps 46 KB a token in float32, so the bundled sample's 40 prompts take about
# 0.4 GB; a 7B model in bfloat16 keeps 0.5 MB a token, about ten long prompts.
PREFIX_CACHE_BYTES = 1 << 30


def worth_keeping(config, dtype, prompts: list[list[int]], passes: int,
                  capacity_bytes: int = PREFIX_CACHE_BYTES) -> bool:
    """Whether a run that sends `passes` prompts through a frozen model of this config and dtype, drawn from
    `prompts`, gains by keeping them: when it meets a prompt more than once on average and all of them fit.
    Otherwise each prompt would take a pass of its own (`PrefixCache` computes them one at a time) and be
    read once or never: no saving, and on a GPU, smaller passes than the batch's."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * config.num_hidden_layers * heads * width * dtype.itemsize
    return passes > len(prompts) and sum(map(len, prompts)) * bytes_per_token <= capacity_bytes


class PrefixCache:
    """Each prompt's keys and values in every layer, and its last token's hidden state, under `decoder` (a
    frozen transformer without its LM head, called as `transformers`' base models are). Callers enter
    whatever context makes `decoder` the frozen model they mean (e.g. an adapter switched off)."""

    def __init__(self, decoder, capacity_bytes: int = PREFIX_CACHE_BYTES):
        self.decoder = decoder
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.entries: dict[tuple[int, ...], tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]] = {}

    @torch.no_grad()
    def hidden_states(self, prompts: list[list[int]], continuations: torch.Tensor,
                      continuation_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [rows, 1 + continuation, hidden]: each prompt's last token's, then each
        continuation token's (`continuations` [rows, columns], right-padded, 1 in `continuation_mask` on real
        tokens), as a pass over the prompt followed by its continuation gives them."""
        from transformers import DynamicCache

        entries = self._entries(prompts)
        longest = max(len(p) for p in prompts)
        _, prompt_mask = left_pad(prompts, 0)
        device = continuations.device
        cache = DynamicCache(config=self.decoder.config)
        for layer in range(len(entries[0][0])):
            keys, values = (self._left_padded([entry[0][layer][part] for entry in entries], longest)
                            for part in (0, 1))
            cache.update(keys, values, layer)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        position_ids = lengths[:, None] + torch.arange(continuations.shape[1], device=device)
        attention_mask = torch.cat([prompt_mask.to(device), continuation_mask.to(prompt_mask.dtype)], dim=1)
        hidden = self.decoder(input_ids=continuations, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=True).last_hidden_state
        last = torch.stack([entry[1] for entry in entries]).to(hidden)
        return torch.cat([last[:, None], hidden], dim=1)

    def _entries(self, prompts: list[list[int]]):
        """The kept entry of each prompt, computing (and keeping, while there is room) those not kept yet."""
        missing = list(dict.fromkeys(tuple(p) for p in prompts if tuple(p) not in self.entries))
        computed = dict(zip(missing, self._compute([list(p) for p in missing]))) if missing else {}
        for key, entry in computed.items():
            size = sum(k.nbytes + v.nbytes for k, v in entry[0]) + entry[1].nbytes
            if self.used_bytes + size <= self.capacity_bytes:
                self.entries[key] = entry
                self.used_bytes += size
        return [self.entries[key] if key in self.entries else computed[key] for key in map(tuple, prompts)]

    def _compute(self, prompts: list[list[int]]):
        """Each prompt's keys, values and last hidden state, from a pass over that prompt alone: what is kept
        then depends on the prompt only, not on which others a step happened to bring with it, so a resumed
        run reads what an uninterrupted one would."""
        from transformers import DynamicCache

        device = next(self.decoder.parameters()).device
        computed = []
        for prompt in prompts:
            cache = DynamicCache(config=self.decoder.config)
            hidden = self.decoder(input_ids=torch.tensor([prompt], device=device), past_key_values=cache,
                                  use_cache=True).last_hidden_state
            computed.append(([(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers],
                             hidden[0, -1].clone()))
        return computed

    @staticmethod
    def _left_padded(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
        """[heads, tokens, width] tensors as one [rows, heads, length, width] batch, each at the right end."""
        heads, _, width = tensors[0].shape
        batch = tensors[0].new_zeros(len(tensors), heads, length, width)
        for row, tensor in enumerate(tensors):
            batch[row, :, length - tensor.shape[1]:] = tensor
        return batch
