"""What every benchmark shares: the data slice, the TRL virtual environment, running one side in a child
process with its peak memory, statistics, and writing results.

Each side runs in its own child process (ours in the project's virtual environment, TRL's in
bench/.venv-trl), so the peak resident memory the kernel reports for that child belongs to that side alone.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
SCRATCH = BENCH / "scratch"
DATA = REPO.parent / "shared" / "data" / "tldr"
TRL_VENV = BENCH / ".venv-trl"
TRL_PYTHON = TRL_VENV / "bin" / "python"
OUR_PYTHON = Path(sys.executable)

# The last TRL release with PPOTrainer (trl.experimental.ppo); it also has RewardTrainer. The other pins are the
# versions our environment runs, so both sides use the same torch kernels and the same model code.
TRL_VERSION = "1.12.0"
DATA_SEED = 0


def require_data() -> None:
    if not (DATA / "preference.jsonl").is_file():
        sys.exit(f"benchmark data not found: {DATA} (the shared TL;DR data set, expected beside the repository "
                 "as ../shared/data/tldr); nothing was run")


def our_versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
            "peft": peft.__version__}


def ensure_trl_venv() -> None:
    """Create bench/.venv-trl with TRL and the same torch, transformers and peft as ours (once)."""
    versions = our_versions()
    marker = TRL_VENV / "bench-pins.json"
    wanted = {"trl": TRL_VERSION, **versions}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    print(f"Creating {TRL_VENV} with trl=={TRL_VERSION} (once; a few minutes)", file=sys.stderr)
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base_python, "-m", "venv", str(TRL_VENV)], check=True)
    # torch is pinned: left free, pip would pull a multi-GB CUDA build.
    subprocess.run([str(TRL_PYTHON), "-m", "pip", "install", "--quiet", f"trl=={TRL_VERSION}",
                    f"torch=={versions['torch']}", f"transformers=={versions['transformers']}",
                    f"peft=={versions['peft']}"], check=True)
    marker.write_text(json.dumps(wanted) + "\n")


def start_comparison(steps: int) -> list[float]:
    """What every run against TRL does first: check the settings and the data, make the TRL environment;
    returns the load average at the start."""
    if steps < 2:
        sys.exit("--steps must be at least 2: the first step is warm-up")
    require_data()
    ensure_trl_venv()
    return load_average()


def trl_versions() -> dict:
    code = ("import json, torch, transformers, peft, trl; print(json.dumps({'trl': trl.__version__, "
            "'torch': torch.__version__.split('+')[0], 'transformers': transformers.__version__, "
            "'peft': peft.__version__}))")
    return json.loads(subprocess.run([str(TRL_PYTHON), "-c", code], check=True, capture_output=True,
                                     text=True).stdout)


def model_dir() -> str:
    from rlhf.models.reference import DEFAULT_MODEL, resolve_model_reference

    return resolve_model_reference(DEFAULT_MODEL)


@dataclass
class ChildRun:
    result: dict
    peak_rss_gb: float  # the child's peak resident memory, from the kernel
    wall_seconds: float


def run_child(python: Path, worker: str, spec: dict, name: str, with_repo_on_path: bool) -> ChildRun:
    """Run bench/workers/<worker> under `python` with `spec` as JSON; return its JSON result and peak memory."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = SCRATCH / f"{name}.spec.json", SCRATCH / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    environment = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # Only our side may import the project; the TRL side sees TRL and its dependencies only.
    environment.pop("PYTHONPATH", None)
    if with_repo_on_path:
        environment["PYTHONPATH"] = str(REPO)
    started = time.monotonic()
    child = subprocess.Popen([str(python), str(BENCH / "workers" / worker), str(spec_path), str(result_path)],
                             cwd=REPO, env=environment)
    _, status, usage = os.wait4(child.pid, 0)  # the child's own resource usage, peak memory included
    wall = time.monotonic() - started
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code != 0:
        sys.exit(f"{worker} ({name}) failed with exit code {exit_code}")
    return ChildRun(json.loads(result_path.read_text()), usage.ru_maxrss / 2 ** 20, wall)  # ru_maxrss is in KiB


def summary(values: list[float]) -> dict:
    """Median and spread of repeated timings."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": quartiles[0], "q3": quartiles[2], "n": len(ordered)}


def spread_text(stats: dict, digits: int = 2) -> str:
    return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}–{stats['max']:.{digits}f}]"


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_results(name: str, result: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nWrote {RESULTS / name}.json and .md", file=sys.stderr)
