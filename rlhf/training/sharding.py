"""Sharded weights (PyTorch's FSDP2, `fully_shard`): each of a stage's processes keeps 1/N of the frozen
backbone's weights and gathers one layer's whole weights from the others only while it computes with them, so
N GPUs together hold a model that none holds alone. What trains (the LoRA adapters, the heads) stays whole on
every process, left out of the sharding, and its gradients are summed as in plain data parallelism
(`Ranks.sum_gradients`): only the frozen weights are split, the training is unchanged.

What sharding asks of the loop: a layer's weights come from every process at once, so every process must run
the same passes, forward and backward, in the same order. A rank whose share of a step cuts into fewer
micro-batches than another's makes up the difference with idle passes (`lockstep`): a pass over rows of the
batch whose loss counts 0.
"""

from __future__ import annotations

import torch

from rlhf.training.distributed import Ranks


def shard_frozen_weights(model: torch.nn.Module, ranks: Ranks, device: torch.device) -> bool:
    """Shard `model`'s frozen weights over the ranks, each decoder layer a unit gathered on its own and the rest
    (embeddings, final norm) one more; the trainable parameters stay whole on every rank. Returns whether it
    sharded (with one process there is nothing to share)."""
    if not ranks.parallel:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world_size,))
    trained = {p for p in model.parameters() if p.requires_grad}
    layer_kinds = set(_transformer(model)._no_split_modules or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_kinds]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer (_no_split_modules) to shard by")
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=trained)
    fully_shard(_transformer(model), mesh=mesh, ignored_params=trained)
    return True


def _transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The `transformers` model itself, under a peft wrapper when there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lockstep(groups: list, in_step: Ranks) -> list:
    """The micro-batches this rank runs: its own `groups`, then `None` for each idle pass it owes until it has run
    as many as the rank of `in_step` that has the most (`in_step`: the ranks a model's weights are sharded over,
    or `ALONE`)."""
    if not in_step.parallel:
        return groups
    most = int(in_step.most(len(groups)))
    return list(groups) + [None] * (most - len(groups))
