"""A stop request from SIGTERM (a preempted machine), SIGHUP (a closed terminal) or a first Ctrl-C: training
checkpoints and stops after the current step, so running the same command again (or a retry of the stage)
resumes."""

from __future__ import annotations

import signal
import sys

from rlhf.errors import RunFailure


class StopFlag:
    """Callable: True once a stop was requested (SIGTERM, SIGHUP or a first Ctrl-C; a run on the KFP local
    runner also forwards the terminal's Ctrl-C as SIGTERM, which counts as the same request). A second
    Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self.interrupts = 0

    def install(self) -> StopFlag:
        def request(signum, frame):
            self.interrupts += signum == signal.SIGINT
            if self.interrupts > 1:
                raise KeyboardInterrupt
            if not self.requested:
                self.requested = True
                print("\nStopping after this step (checkpoint first); press Ctrl-C again to abort now",
                      file=sys.stderr, flush=True)

        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, request)
        return self

    def __call__(self) -> bool:
        return self.requested


class Interrupted(RunFailure):
    """Training stopped on request with a checkpoint; the stage must fail so that a retry resumes it."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"{stage} stopped on request after step {step}; its checkpoint is kept, and running the "
                         "stage again with the same output location resumes from it")
