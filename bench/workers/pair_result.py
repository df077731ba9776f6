"""What a preference-pair worker (a reward model or DPO; ours or TRL's) reports, in the same shape on both
sides: the wall and CPU seconds between optimizer steps, held-out accuracy, and the process's peak memory.
Standard library only, so TRL's virtual environment imports it too."""

import json
import resource
from pathlib import Path


def write_pair_result(path: str, step_ends: list[float], step_cpu_ends: list[float], accuracy: float,
                      pairs: int) -> None:
    result = {"step_seconds": [b - a for a, b in zip(step_ends, step_ends[1:])],
              "step_cpu_seconds": [b - a for a, b in zip(step_cpu_ends, step_cpu_ends[1:])],
              "held_out_accuracy": accuracy, "held_out_pairs": pairs,
              "self_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    Path(path).write_text(json.dumps(result))
