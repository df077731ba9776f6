"""Training checkpoints in safetensors and JSON only, each either complete or never loaded.

A checkpoint is a directory `step-NNNNNNN` holding the trainable weights, the optimizer state, the RNG
state and a `state.json` (step, run fingerprint, scheduler state, anything else the trainer keeps, and
the size of every other file). `state.json` is written last, under a temporary name renamed into place,
so it exists only once everything else is on disk; and a checkpoint counts only while its files have the
sizes it records. A process killed while saving, or a copy cut short, leaves a directory that is never
loaded and is removed when the run resumes.

No directory is ever renamed: on Cloud Storage FUSE (the `/gcs/` mount where a component's outputs live
on Vertex AI) renaming a directory is not atomic, and is refused unless the mount allows it.

A full disk (or a quota, or a file-size limit) while saving raises DiskFullError naming the checkpoint
and the last good one, which is kept; the half-written one is removed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlhf.data.storage import write_bytes
from rlhf.errors import RunFailure

STATE = "state.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"
RNG = "rng.safetensors"

DISK_FULL = {
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system or this process's file size limit",
}


class CheckpointMismatch(RunFailure):
    """Checkpoints from a different run (other data or settings) in the output directory."""


class DiskFullError(RunFailure):
    """A write that failed for lack of space; the message names the file and the checkpoint kept."""


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def copy_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put `weights` (by parameter name) into the model's parameters, in place."""
    parameters = dict(model.named_parameters())
    for name, value in weights.items():
        parameters[name].copy_(value)


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


def _error_number(error: BaseException) -> int | None:
    if isinstance(error, OSError):
        return error.errno
    # safetensors reports an I/O failure only as text, e.g. "... No space left on device (os error 28)".
    found = re.search(r"\(os error (\d+)\)", str(error)) if isinstance(error, SafetensorError) else None
    return int(found[1]) if found else None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _resume_hint(directory: Path) -> str:
    kept = latest_checkpoint(directory)
    if kept is None:
        return "no checkpoint was saved yet; free some space, then run the same command again"
    return f"the last good checkpoint, {kept}, is kept; free some space, then run the same command again to resume"


def save_checkpoint(directory: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """Write the checkpoint of `step` and keep the `keep` newest complete ones."""
    final = directory / f"step-{step:07d}"
    shutil.rmtree(final, ignore_errors=True)
    try:
        final.mkdir(parents=True)
        save_file(trainable_state(model), final / WEIGHTS)
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, final / OPTIMIZER_TENSORS)
        (final / OPTIMIZER_GROUPS).write_text(json.dumps(groups))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, final / RNG)
        files = {}
        for name in (WEIGHTS, OPTIMIZER_TENSORS, OPTIMIZER_GROUPS, RNG):
            _fsync(final / name)
            files[name] = (final / name).stat().st_size
        staged = final / f".{STATE}.partial"
        staged.write_text(json.dumps({**state, "step": step, "files": files}, indent=2))
        _fsync(staged)
        os.replace(staged, final / STATE)
    except BaseException as error:
        shutil.rmtree(final, ignore_errors=True)
        reason = DISK_FULL.get(_error_number(error))
        if reason is None:
            raise
        raise DiskFullError(f"{final}: cannot save the checkpoint: {reason}; {_resume_hint(directory)}") from None
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_complete(checkpoint: Path) -> bool:
    """Its state.json exists and every file it lists has the size it records (a state.json written
    before sizes were recorded lists none: it was renamed into place whole, with its directory)."""
    try:
        state = json.loads((checkpoint / STATE).read_text())
        return all((checkpoint / name).stat().st_size == size for name, size in state.get("files", {}).items())
    except (OSError, ValueError, AttributeError):
        return False


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [d for d in sorted(Path(directory).glob("step-*")) if d.is_dir() and is_complete(d)]


def latest_checkpoint(directory: Path) -> Path | None:
    complete = complete_checkpoints(directory)
    return complete[-1] if complete else None


def discard_incomplete(directory: Path) -> list[Path]:
    """Remove what interrupted saves left behind; return what was removed."""
    removed = [d for d in sorted(Path(directory).glob("step-*")) if not is_complete(d)]
    for leftover in removed:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return removed


@contextmanager
def disk_full_explained(directory: Path):
    """Turn a full disk met by any write during training (TensorBoard events, the final artifact) into a
    DiskFullError that names the file and the checkpoint a rerun resumes from.

    TensorBoard writes from a thread of its own, which hands its error to the next write of the training
    thread; meanwhile that thread's own traceback is held back, so the user reads the message only.
    """
    previous_hook = threading.excepthook

    def hold_back_disk_full(arguments) -> None:
        if DISK_FULL.get(_error_number(arguments.exc_value)) is None:
            previous_hook(arguments)

    threading.excepthook = hold_back_disk_full
    try:
        yield
    except (OSError, SafetensorError) as error:
        reason = DISK_FULL.get(_error_number(error))
        if reason is None:
            raise
        where = getattr(error, "filename", None) or Path(directory).parent
        raise DiskFullError(f"{where}: cannot write: {reason}; {_resume_hint(directory)}") from None
    finally:
        threading.excepthook = previous_hook


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
    copy_weights(model, weights)
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


def resume(checkpoint_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
           fingerprint: str, what: str, total_steps: int) -> tuple[int, list]:
    """Prepare `checkpoint_dir` and restore its last complete checkpoint, if any: (start step, history)."""
    # Made before anything else is written: an output directory holding it is one a rerun resumes in.
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    discard_incomplete(checkpoint_dir)
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is None:
        return 0, []
    state = load_checkpoint(checkpoint, model, optimizer, fingerprint)
    scheduler.load_state_dict(state["scheduler"])
    print(f"Resuming {what} from {checkpoint} (step {state['step']} of {total_steps})", file=sys.stderr)
    return state["step"], state["history"]


def finished_result(metrics_file: Path, fingerprint: str, what: str) -> dict | None:
    """The metrics of this run when it has already finished in their directory; None when it has not.
    A finished run of other data, settings or stage there is refused, never returned as this one."""
    if not metrics_file.is_file():
        return None
    finished = json.loads(metrics_file.read_text())
    if finished.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(f"{metrics_file.parent} holds the result of another run (other data, settings or "
                                 f"stage), not this {what}; write to a new output directory")
    print(f"{metrics_file.parent} already holds this {what}; returning it", file=sys.stderr)
    return finished


def finish(metrics_file: Path, checkpoint_dir: Path, metrics: dict) -> dict:
    """Mark the run finished: its metrics, written whole or not at all; its checkpoints are no longer needed."""
    write_bytes(str(metrics_file), (json.dumps(metrics, indent=2) + "\n").encode())
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics
