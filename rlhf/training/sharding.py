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
"""

from __future__ import annotations

import torch

from rlhf.models.loading import Placement
from rlhf.training.distributed import Ranks


def loading_placement(placement: Placement, shard: bool) -> Placement:
    """Where a model loads: its placement, or the host when its weights will be sharded, so a model no GPU
    holds alone reaches each GPU as that process's share."""
    return Placement(torch.device("cpu"), placement.dtype) if shard else placement


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
