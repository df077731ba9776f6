"""A Trainer callback that stamps the wall and CPU time at the end of every optimizer step (TRL's side)."""

import time

from transformers import TrainerCallback


class StepClock(TrainerCallback):
    def __init__(self):
        self.step_ends, self.step_cpu_ends = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())
        self.step_cpu_ends.append(time.process_time())
