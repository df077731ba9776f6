"""Sharded weights (PyTorch's FSDP2, `fully_shard`): each of a stage's processes keeps 1/N of the frozen
decoder layers' weights and gathers one layer's whole weights from the others only while it computes with it,
so N GPUs together hold a model that none holds alone. What trains (the LoRA adapters, the heads) stays whole
on every process, left out of the sharding, and its gradients are summed as in plain data parallelism
(`Ranks.sum_gradients`): only frozen weights are split, the training is unchanged. The embeddings, the final
norm and the language-model head stay whole too: the passes call the decoder and the head on their own (the
head on the positions that predict completion tokens only), and a tied head is the embedding's own weight.

What sharding asks of the loop: a layer's weights come from every process at once, so every process must run
the same passes, forward and backward, in the same order. A rank whose share of a step cuts into fewer
micro-batches than another's makes up the difference with idle passes (`lockstep`): a pass over rows of the
batch whose loss counts 0.

A model to shard loads whole on the host first, then each process keeps its share; a machine's processes load
in turns where its host memory does not hold a whole copy for each (`loading_turn`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from rlhf.models.loading import Placement
from rlhf.training.distributed import Ranks

# The host memory, in bytes, that a machine's sharded processes may load whole models into; unset: what the
# kernel reports available (MemAvailable) when the model loads.
HOST_MEMORY_VARIABLE = "RLHF_LOADING_HOST_MEMORY"
# A whole model on the host, while it loads, against its weights' bytes: room for one tensor converted at a time.
LOADING_MARGIN = 1.25


def loading_placement(placement: Placement, shard: bool) -> Placement:
    """Where a model loads: its placement, or the host when its weights will be sharded, so a model no GPU
    holds alone reaches each GPU as that process's share."""
    return Placement(torch.device("cpu"), placement.dtype) if shard else placement


def loading_turns(processes: int, copies: int) -> int:
    """How many turns a machine's `processes` take to load, `copies` whole models at a time."""
    return math.ceil(processes / max(1, copies))


def _weights_bytes(model_path: str, dtype: torch.dtype) -> int | None:
    """The bytes of the model's weights in `dtype`, from its config.json; None where that is not readable."""
    from rlhf.models.memory import ModelShape

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
        return ModelShape.from_config(config).parameters * dtype.itemsize
    except (OSError, ValueError, KeyError):
        return None


def _host_memory() -> int:
    if HOST_MEMORY_VARIABLE in os.environ:
        return int(os.environ[HOST_MEMORY_VARIABLE])
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


@contextmanager
def loading_turn(in_step: Ranks, shard: bool, model_path: str, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, this process loads the model at `model_path` whole on the host and, with `shard`, shards
    it over `in_step`, then keeps only its share: in its turn, as many of a machine's processes at a time as its
    host memory holds whole copies of the weights, so that 8 processes of a 70B model do not hold 8 copies at
    once. The others wait at barriers; every process passes as many, in the same order. One turn (no wait)
    where the memory holds every copy, or where the model's size is not known from its config."""
    if not (shard and in_step.parallel):
        yield
        return
    weights = _weights_bytes(model_path, dtype)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", in_step.world_size))
    copies = local if weights is None else int(_host_memory() // (LOADING_MARGIN * weights))
    copies = max(1, int(in_step.least(min(copies, local))))  # the fewest any machine holds
    turns = int(in_step.most(loading_turns(local, copies)))
    mine = int(os.environ.get("LOCAL_RANK", in_step.rank)) // copies
    if turns > 1 and in_step.main:
        print(f"loading {model_path}: in {turns} turns of {copies} process(es) a machine, as many whole copies of "
              "its weights as the host's memory holds at a time", file=sys.stderr)
    for _ in range(mine):
        in_step.wait()
    yield
    for _ in range(turns - mine):
        in_step.wait()


def shard_frozen_weights(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> bool:
    """Shard the frozen weights of `model`'s decoder layers over the ranks, each layer a unit gathered on its
    own; the trainable parameters, the embeddings, the final norm and the head stay whole on every rank.
    Returns whether it sharded (one process has nothing to share)."""
    if not ranks.parallel:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world_size,))
    transformer = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
    decoder = transformer.get_decoder()
    layer_kinds = set(transformer._no_split_modules or ())
    layers = [m for m in decoder.modules() if type(m).__name__ in layer_kinds]
    if not layers:
        raise ValueError(f"{type(transformer).__name__} names no decoder layer (_no_split_modules) to shard by")
    trained = {p for p in model.parameters() if p.requires_grad}
    # Each layer its own root: no unit around them (the rest is whole), and a unit around the decoder would
    # change its class, which `transformers` looks its output-capturing hooks up by (the hidden states the
    # value head reads). A root keeps its weights gathered after its forward pass by default; these give
    # them back, or each process would end the pass holding every layer.
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=trained, reshard_after_forward=True)
    return True


def lockstep(groups: list, in_step: Ranks) -> list:
    """The micro-batches this rank runs: its own `groups`, then `None` for each idle pass it owes until it has run
    as many as the rank of `in_step` that has the most (`in_step`: the ranks a model's weights are sharded over,
    or `ALONE`)."""
    if not in_step.parallel:
        return groups
    most = int(in_step.most(len(groups)))
    return list(groups) + [None] * (most - len(groups))
