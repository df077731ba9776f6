"""What every trainer does around its algorithm: identify the run, return it when it has finished, resume it
from its last checkpoint, log each step (TensorBoard, progress line), stop at a checkpoint when asked, and
finish with the metrics of its last steps.

A trainer reads:

    run_id = run_fingerprint(config, [model_reference, ...], rows)
    finished = finished_result(output_dir / METRICS_FILE, run_id, "reward model")
    if finished is not None:
        return finished
    ... model, optimizer, scheduler ...
    with TrainingLoop(output_dir, run_id, "reward model", config, model, optimizer, scheduler,
                      stop_requested) as loop:
        for step in loop.steps():
            ... the algorithm's step ...
            loop.log(record, items=len(batch), loss=...)
        if loop.interrupted:
            return loop.stopped()
        if not loop.ranks.main:
            return loop.result_of_main()
        ... final evaluation, save the artifact ...
        return loop.finish(metrics)

With several processes (`rlhf.training.distributed`), every rank runs the steps on its share of the rows;
rank 0 alone checkpoints, logs, shows progress and finishes.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from rlhf.models.artifacts import TENSORBOARD_DIR
from rlhf.settings import RUN_OPTIONS
from rlhf.training.checkpoints import disk_full_explained, finish, resume, save_checkpoint
from rlhf.training.distributed import ALONE, Ranks
from rlhf.training.progress import Progress

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"


def run_fingerprint(config, identity: list, rows: list[dict]) -> str:
    """Identifies a run: the settings that change its result, what else it depends on (`identity`: the model
    reference, the reward function), and its data (without the `source` each row records)."""
    settings = {k: v for k, v in asdict(config).items() if k not in RUN_OPTIONS}
    digest = hashlib.sha256(json.dumps([settings, *identity], sort_keys=True).encode())
    for row in rows:
        digest.update(json.dumps({k: v for k, v in row.items() if k != "source"}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def clock(device: torch.device) -> float:
    """Wall time once the device's queued work is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def final_window(history: list[dict]) -> list[dict]:
    """The steps the final metrics average over: the last fifth of the run, at least 1 step and at most 10,
    so one noisy step does not make the result."""
    return history[-max(1, min(10, len(history) // 5)):]


def final_mean(history: list[dict], name: str) -> float:
    window = final_window(history)
    return sum(h[name] for h in window) / len(window)


def require_finite(loss: float, stage: str, step: int, checkpoint_dir: Path) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"{stage}: the loss is {loss} at step {step + 1}; the last good checkpoint in "
                                 f"{checkpoint_dir} is kept")


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler, clipped: list[list[torch.nn.Parameter]],
                   max_grad_norm: float) -> list[float]:
    """Clip the gradient norm of each parameter group in `clipped` on its own, step the optimizer and the
    schedule, clear the gradients; returns each group's norm before clipping."""
    norms = [float(torch.nn.utils.clip_grad_norm_(group, max_grad_norm)) for group in clipped]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norms


class TrainingLoop:
    """The steps of one run in `output_dir`, from its last checkpoint (or step 0) to `total_steps` (by default
    `config.train_steps`).

    `steps()` yields each step still to do; after the trainer's body it saves a checkpoint every
    `config.checkpoint_every` steps, and stops early (checkpoint saved) once `stop_requested()` says so on
    any rank.
    """

    def __init__(self, output_dir: Path, run_id: str, what: str, config, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, stop_requested: Callable[[], bool],
                 progress_label: str | None = None, ranks: Ranks = ALONE, total_steps: int | None = None):
        self.output_dir, self.run_id, self.what = Path(output_dir), run_id, what
        self.progress_label = progress_label or what
        self.total_steps = config.train_steps if total_steps is None else total_steps
        self.checkpoint_every = config.checkpoint_every
        self.log_every = getattr(config, "log_every", 1)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.stop_requested = stop_requested
        self.ranks = ranks
        self.checkpoint_dir = self.output_dir / CHECKPOINT_DIR
        self.interrupted = False
        self.items = 0
        self._stack = ExitStack()

    def __enter__(self) -> TrainingLoop:
        from torch.utils.tensorboard import SummaryWriter

        self._stack.enter_context(disk_full_explained(self.checkpoint_dir))
        # Rank 0 first clears what an interrupted save left (the others wait for it); then every rank restores
        # the same checkpoint.
        if not self.ranks.main:
            self.ranks.wait()
        self.start_step, self.history = resume(self.checkpoint_dir, self.model, self.optimizer, self.scheduler,
                                               self.run_id, f"the {self.what}", self.total_steps)
        if self.ranks.main:
            self.ranks.wait()
        self.writer = self.progress = None
        if self.ranks.main:
            self.writer = SummaryWriter(str(self.output_dir / TENSORBOARD_DIR), purge_step=self.start_step + 1)
            self._stack.callback(self.writer.close)
            self.progress = Progress(self.total_steps, self.progress_label, initial=self.start_step)
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def steps(self) -> Iterator[int]:
        for step in range(self.start_step, self.total_steps):
            yield step
            done = step + 1
            self.interrupted = self.ranks.any(self.stop_requested()) and done < self.total_steps
            if done % self.checkpoint_every == 0 or self.interrupted:
                if self.ranks.main:
                    save_checkpoint(self.checkpoint_dir, done, self.model, self.optimizer,
                                    {"fingerprint": self.run_id, "scheduler": self.scheduler.state_dict(),
                                     "history": self.history})
                self.ranks.wait()
            if self.interrupted:
                break
        if self.progress is not None:
            self.progress.close()
        self.elapsed = time.monotonic() - self.started

    def log(self, record: dict, items: int, **shown) -> None:
        """Keep the step's record, write its numbers to TensorBoard (every `log_every` steps and the last),
        count the `items` (pairs, episodes) it took, and show `shown` on the progress line."""
        self.history.append(record)
        self.items += items
        if not self.ranks.main:
            return
        step = record["step"]
        if step % self.log_every == 0 or step == self.total_steps:
            for name, value in record.items():
                if name != "step" and value is not None:
                    self.writer.add_scalar(name, value, step)
        self.progress.update(1, **shown)

    def items_per_second(self) -> float | None:
        return self.items / self.elapsed if self.elapsed > 0 and self.items else None

    def stopped(self) -> dict:
        step = self.history[-1]["step"]
        if self.ranks.main:
            print(f"Stopped at step {step}; run the same command again to resume", file=sys.stderr)
        return {"interrupted": True, "step": step}

    def result_of_main(self) -> dict:
        """On a rank other than 0: the metrics rank 0 finishes with, once it has."""
        self.ranks.wait()
        return json.loads((self.output_dir / METRICS_FILE).read_text())

    def finish(self, metrics: dict) -> dict:
        """On rank 0: write the metrics (which mark the run finished) and remove the checkpoints."""
        self.writer.close()
        finished = finish(self.output_dir / METRICS_FILE, self.checkpoint_dir, {**metrics, "fingerprint": self.run_id})
        self.ranks.wait()
        return finished
