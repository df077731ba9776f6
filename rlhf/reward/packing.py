"""Shared-prefix packing: one prompt and its completions in one sequence, the prompt computed once.

A pair `prompt + winner + loser` is laid out as `[prompt][winner][loser]`. An attention mask lets every
completion token see the prompt and the earlier tokens of its own completion only, and position ids
restart after the prompt for each completion, so each completion's hidden states are exactly those of
`[prompt][completion]` run alone; but the prompt, most of the tokens, is run once instead of twice.

Sequences are right-padded to the longest in the batch, not to a fixed maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_SEGMENT = -1
PROMPT_SEGMENT = 0
EXACT_ATTENTION = ("sdpa", "eager")  # implementations that apply the packing's own mask as given


def packing_problem(config, longest: int) -> str | None:
    """Why packing would not be exact for a backbone with this config and packed rows up to `longest` tokens,
    or None. Flash-attention kernels take no such mask (the loser would see the winner), and a sliding-window
    layer shorter than a row would see less of the prompt than the same completion run alone."""
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in EXACT_ATTENTION:
        return (f"attention implementation {implementation!r} does not apply the shared-prefix mask; "
                f"shared-prefix packing needs one of {', '.join(EXACT_ATTENTION)}")
    layer_types = getattr(config, "layer_types", None)
    sliding = "sliding_attention" in layer_types if layer_types else getattr(config, "sliding_window", None) is not None
    window = getattr(config, "sliding_window", None)
    if sliding and window is not None and window < longest:
        return (f"sliding-window attention of {window} tokens is shorter than a packed pair of up to {longest} "
                "tokens; lower prompt_sequence_length or target_sequence_length")
    return None


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [batch, length]
    position_ids: torch.Tensor  # [batch, length]
    segments: torch.Tensor  # [batch, length]: 0 prompt, k + 1 completion k, -1 padding
    last_token: torch.Tensor  # [batch, completions]: index of each completion's last token

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [batch, 1, length, length]: 0 where attention is allowed, the dtype's minimum elsewhere."""
        query, key = self.segments[:, :, None], self.segments[:, None, :]
        length = self.segments.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=self.segments.device).tril()
        allowed = causal & (key != PAD_SEGMENT) & ((key == PROMPT_SEGMENT) | (key == query))
        # Padding rows attend to themselves only, so no row is fully masked (which would give NaN).
        allowed |= torch.eye(length, dtype=torch.bool, device=self.segments.device) & (query == PAD_SEGMENT)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.segments.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(*(t.to(device) for t in (self.input_ids, self.position_ids, self.segments, self.last_token)))


def packed_length(prompt: list[int], completions: list[list[int]]) -> int:
    return len(prompt) + sum(len(c) for c in completions)


def pack(prompts: list[list[int]], completions: list[list[list[int]]], pad_id: int) -> PackedBatch:
    """Pack each prompt with its completions (the same number for every row, each at least one token)."""
    counts = {len(c) for c in completions}
    if len(counts) != 1:
        raise ValueError("every prompt needs the same number of completions")
    length = max(packed_length(p, c) for p, c in zip(prompts, completions))
    rows = len(prompts)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((rows, length), dtype=torch.long)
    segments = torch.full((rows, length), PAD_SEGMENT, dtype=torch.long)
    last_token = torch.zeros((rows, counts.pop()), dtype=torch.long)
    for row, (prompt, row_completions) in enumerate(zip(prompts, completions)):
        input_ids[row, :len(prompt)] = torch.tensor(prompt)
        position_ids[row, :len(prompt)] = torch.arange(len(prompt))
        segments[row, :len(prompt)] = PROMPT_SEGMENT
        start = len(prompt)
        for index, completion in enumerate(row_completions):
            if not completion:
                raise ValueError("a completion must hold at least one token")
            end = start + len(completion)
            input_ids[row, start:end] = torch.tensor(completion)
            position_ids[row, start:end] = torch.arange(len(prompt), len(prompt) + len(completion))
            segments[row, start:end] = index + 1
            last_token[row, index] = end - 1
            start = end
    return PackedBatch(input_ids, position_ids, segments, last_token)
