"""A stop request from SIGTERM (a preempted machine) or a first Ctrl-C: training checkpoints and stops after
the current step, so running the same command again (or a retry of the stage) resumes."""

from __future__ import annotations

import signal
import sys


class StopFlag:
    """Callable: True once a stop was requested. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False

    def install(self) -> "StopFlag":
        def request(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nStopping after this step (checkpoint first); press Ctrl-C again to abort now", file=sys.stderr,
                  flush=True)

        signal.signal(signal.SIGTERM, request)
        signal.signal(signal.SIGINT, request)
        return self

    def __call__(self) -> bool:
        return self.requested


class Interrupted(RuntimeError):
    """Training stopped on request with a checkpoint; the stage must fail so that a retry resumes it."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"{stage} stopped on request after step {step}; its checkpoint is kept, and running the "
                         "stage again with the same output location resumes from it")
