"""Training checkpoints in safetensors and JSON only, written atomically.

A checkpoint is a directory `step-NNNNNNN` holding the trainable weights, the optimizer state, the RNG
state and a `state.json` (step, run fingerprint, scheduler state, anything else the trainer keeps).
It is written under a temporary name and renamed into place once complete, so a process killed while
saving leaves at most an ignored `.partial-*` directory, never a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE = "state.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"
RNG = "rng.safetensors"


class CheckpointMismatch(Exception):
    """Checkpoints from a different run (other data or settings) in the output directory."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:07d}"
    partial = directory / f".partial-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file(trainable_state(model), partial / WEIGHTS)
    tensors, groups = _optimizer_tensors(optimizer)
    save_file(tensors, partial / OPTIMIZER_TENSORS)
    (partial / OPTIMIZER_GROUPS).write_text(json.dumps(groups))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, partial / RNG)
    (partial / STATE).write_text(json.dumps({**state, "step": step}, indent=2))
    for file in partial.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    complete = [d for d in sorted(directory.glob("step-*")) if (d / STATE).is_file()]
    return complete[-1] if complete else None


def load_checkpoint(checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: str) -> dict:
    """Restore weights, optimizer and RNG in place; return the saved state (with its step)."""
    state = json.loads((checkpoint / STATE).read_text())
    if state.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(
            f"{checkpoint} belongs to a run with other data or settings; resume it with the same "
            "command, or write to a new output directory")
    device = next(model.parameters()).device
    weights = load_file(checkpoint / WEIGHTS, device=str(device))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)
    groups = json.loads((checkpoint / OPTIMIZER_GROUPS).read_text())
    tensors = load_file(checkpoint / OPTIMIZER_TENSORS, device=str(device))
    restored: dict = {}
    for key, value in [*tensors.items(), *groups["scalars"].items()]:
        index, name = key.split(".", 1)
        restored.setdefault(int(index), {})[name] = value
    for values in restored.values():
        if "step" in values and torch.is_tensor(values["step"]):
            values["step"] = values["step"].cpu()
    optimizer.load_state_dict({"state": restored, "param_groups": groups["param_groups"]})
    rng = load_file(checkpoint / RNG)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state
