"""Progress of long work: steps done, rate and ETA.

On a terminal it is a live tqdm bar. Elsewhere (the KFP local runner's pipes, Vertex AI's log viewer)
carriage-return bars arrive as one line at the end, so it prints a plain line every `interval` seconds.
"""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total: int, description: str, unit: str = "step", initial: int = 0, interval: float = 10.0,
                 stream=None):
        self.total, self.description, self.unit = total, description, unit
        self.done = self.initial = initial
        self.stream = stream or sys.stderr
        self.interval = interval
        self.started = self.last_line = time.monotonic()
        self.postfix = ""
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=description, file=self.stream,
                            dynamic_ncols=True, mininterval=1.0)

    def update(self, count: int = 1, **postfix) -> None:
        self.done += count
        self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval or self.done >= self.total:
            self.last_line = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = now - self.started
        done_here = self.done - self.initial
        rate = done_here / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        speed = f"{1 / rate:.2f} s/{self.unit}" if 0 < rate < 1 else f"{rate:.2f} {self.unit}/s"
        text = (f"{self.description}: {self.done}/{self.total} {self.unit}s ({100 * self.done / max(1, self.total):.0f}%), "
                f"{speed}, elapsed {_duration(elapsed)}, ETA {'?' if eta != eta else _duration(eta)}")
        return text + (f", {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
