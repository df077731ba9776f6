"""Data parallelism: the processes of one stage (`torch.distributed.run` starts them, one per device) each take
a share of every step's rows, and add their gradients, losses and counts together before the optimizer
steps, so N processes take the same steps as one process given the whole batch.

Gradients are summed with one `all_reduce` per trainable tensor rather than through
`DistributedDataParallel`: a rank's share is cut into micro-batches by tokens, so ranks run different
numbers of backward passes per step (DDP needs the same number on every rank, or `no_sync` around all but
one), and only the adapters' small tensors train. Rank 0 alone writes checkpoints, TensorBoard, progress and
the artifact; every rank resumes from the same checkpoint, and a stop requested on any rank stops all of
them at the same step.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Rank 0 alone scores the final evaluation while the others wait at a barrier: longer than gloo's default.
COLLECTIVE_TIMEOUT = timedelta(hours=4)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the stage's processes (rank 0 of 1 when it runs alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def share(self, items: list) -> list:
        """This rank's items: every `world_size`-th from its rank on, so shares differ in size by one at most."""
        return items[self.rank::self.world_size]

    def total(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if not self.parallel:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def most(self, value: float) -> float:
        """The largest of the ranks' values."""
        return self._reduced(value, dist.ReduceOp.MAX)

    def least(self, value: float) -> float:
        """The smallest of the ranks' values."""
        return self._reduced(value, dist.ReduceOp.MIN)

    def _reduced(self, value: float, op) -> float:
        if not self.parallel:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        return float(tensor)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one."""
        return self.total([float(flag)])[0] > 0

    def gather(self, item) -> list:
        """Every rank's `item`, in rank order."""
        if not self.parallel:
            return [item]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, item)
        return gathered

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Each gradient summed over the ranks (a rank that had no rows contributes zeros)."""
        if not self.parallel:
            return
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)

    def wait(self) -> None:
        if self.parallel:
            dist.barrier()


ALONE = Ranks()


def seed_of(*parts: int) -> int:
    """A seed for one piece of a run (a micro-batch's sampling, an epoch's minibatch order), the same in every
    process: a run gives the same result however many processes share it, and on resume."""
    return hash(parts) % 2**63


def backend(cuda: bool) -> str:
    """The process group's backends: gloo on CPUs; on GPUs NCCL for CUDA tensors (gradients, sharded weights) and
    gloo for CPU ones (the summed losses and counts, `Ranks.total` and `most`, objects, barriers), which NCCL alone
    cannot carry."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def join() -> Ranks:
    """This process's ranks: the process group `torch.distributed.run` describes in the environment (`backend`),
    or a single rank when the process runs alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ALONE
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend(cuda), timeout=COLLECTIVE_TIMEOUT)
    return Ranks(dist.get_rank(), dist.get_world_size())


def leave() -> None:
    """Once this process's work is done (on every rank: a finished or stopped stage): wait for the others and
    close the process group. A process that exits with the group still open leaves gloo's connections to be torn
    down during interpreter shutdown, which can abort it (status -6) after a run that finished. Not after an
    error: the other ranks may never reach the barrier."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """The device of this process: "cuda" becomes the rank's own GPU when several processes share a machine."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{local_rank}"
    return device


# How long the stage's processes get, once a stop is requested, to finish their step and checkpoint.
STOP_GRACE_SECONDS = 1800


@dataclass(frozen=True)
class Machines:
    """The machines a stage runs on and how their processes meet: this one alone, or the replicas Vertex AI
    describes in `CLUSTER_SPEC` (the chief in worker pool 0, the others in worker pool 1), which meet at the
    chief's address. The chief is machine 0, so its first process is rank 0, the one that writes the outputs:
    KFP lets only the chief write a task's outputs."""

    count: int
    meeting_point: str  # host:port of the rendezvous
    rank: int  # this machine's place among them: its processes' ranks follow those of the machines before it
    run_id: str  # the same on every machine of the run

    @classmethod
    def from_environment(cls) -> Machines:
        spec = os.environ.get("CLUSTER_SPEC")
        if not spec:
            return cls(1, "localhost:0", 0, f"rlhf-{os.getpid()}")
        cluster = json.loads(spec)
        pools = cluster["cluster"]
        chiefs, workers = pools.get("workerpool0", []), pools.get("workerpool1", [])
        task = cluster["task"]
        index = int(task.get("index", 0))
        rank = index if task["type"] == "workerpool0" else len(chiefs) + index
        digest = hashlib.sha256(json.dumps(pools, sort_keys=True).encode()).hexdigest()[:12]
        return cls(len(chiefs) + len(workers), (chiefs + workers)[0], rank, f"rlhf-{digest}")


def launch(processes: int, argv: list[str], module: str = "rlhf.cli") -> int:
    """Run `python -m <module> <argv>` (the `rlhf` command) as `processes` processes on this machine, and on
    each machine of `CLUSTER_SPEC` when Vertex AI gives one, through PyTorch's elastic launcher (what `torchrun`
    runs); shows each machine's first process's output. Returns the exit status the command would have had
    in one process: 75 when the ranks stopped at a checkpoint, the first failed rank's status otherwise."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Each process would otherwise start a thread per core, and the processes would fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    machines = Machines.from_environment()
    # One machine: a rendezvous on any free port. Several: each machine's place is fixed (a static rendezvous at
    # the chief's address, which CLUSTER_SPEC gives with its port), where a dynamic one would order them at will.
    rendezvous = (dict(rdzv_backend="c10d", rdzv_configs={"is_host": True}) if machines.count == 1 else
                  dict(rdzv_backend="static", rdzv_configs={"rank": machines.rank}))
    config = LaunchConfig(min_nodes=machines.count, max_nodes=machines.count, nproc_per_node=processes,
                          run_id=machines.run_id, rdzv_endpoint=machines.meeting_point, **rendezvous, max_restarts=0,
                          logs_specs=DefaultLogsSpecs(local_ranks_filter={0}), shutdown_timeout=STOP_GRACE_SECONDS)
    try:
        elastic_launch(config, sys.executable)("-m", module, *argv)
    except ChildFailedError as error:
        statuses = {f.exitcode for f in error.failures.values()}
        if len(statuses) == 1 and len(error.failures) == processes:
            return statuses.pop()
        rank, failure = error.get_first_failure()
        print(f"rlhf: process {rank} ended first, with status {failure.exitcode}; the others were stopped. Run the "
              "same command again to resume from the last checkpoint", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0
