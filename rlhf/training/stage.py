"""What every trainer sets up before it loads a model: the process's place among the stage's processes, its
device and precision, where the base model loads from, the tokenizer, and the prompt encoder of the stage's
settings."""

from __future__ import annotations

import sys
from typing import NamedTuple

from rlhf.data.prompts import PromptEncoder
from rlhf.models.loading import Placement, load_tokenizer, training_placement
from rlhf.models.reference import resolve_model_reference
from rlhf.training.distributed import Ranks, join, local_device


class StageStart(NamedTuple):
    ranks: Ranks
    placement: Placement
    base_path: str
    tokenizer: object
    encoder: PromptEncoder


def start_stage(config, large_model_reference: str, base_model_path: str | None) -> StageStart:
    """`config`: the stage's settings (its `device`, and the prompt settings the encoder reads).
    `base_model_path`: where `large_model_reference` loads from, when the caller resolved it already."""
    ranks = join()
    placement = training_placement(local_device(config.device))
    if ranks.main:
        print(f"{config.stage}: trains on {placement.device.type} in {str(placement.dtype).removeprefix('torch.')}",
              file=sys.stderr)
    base_path = base_model_path or resolve_model_reference(large_model_reference)
    tokenizer = load_tokenizer(base_path)
    return StageStart(ranks, placement, base_path, tokenizer, PromptEncoder.for_settings(tokenizer, config))
