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

from rlhf.settings import CPU_PRECISION_VARIABLE

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
SCRATCH = BENCH / "scratch"
DATA = REPO.parent / "shared" / "data" / "tldr"
OUR_PYTHON = Path(sys.executable)

# The last TRL release with PPOTrainer (trl.experimental.ppo); it also has RewardTrainer. The other pins are the
# versions our environment runs, so both sides use the same torch kernels and the same model code.
TRL_VERSION = "1.12.0"
# The TRL release the DPO, RLOO and GRPO baselines run (DPOTrainer, RLOOTrainer, GRPOTrainer), in its own venv.
TRL_PREFERENCE_VERSION = "1.16.0"


def trl_venv(version: str = TRL_VERSION) -> Path:
    return BENCH / (".venv-trl" if version == TRL_VERSION else f".venv-trl-{version}")


def trl_python(version: str = TRL_VERSION) -> Path:
    return trl_venv(version) / "bin" / "python"


TRL_PYTHON = trl_python()
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


def ensure_trl_venv(version: str = TRL_VERSION) -> None:
    """Create the venv of TRL `version` with the same torch, transformers and peft as ours (once)."""
    versions = our_versions()
    venv, python = trl_venv(version), trl_python(version)
    marker = venv / "bench-pins.json"
    wanted = {"trl": version, **versions}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return
    print(f"Creating {venv} with trl=={version} (once; a few minutes)", file=sys.stderr)
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    # torch is pinned: left free, pip would pull a multi-GB CUDA build.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"trl=={version}",
                    f"torch=={versions['torch']}", f"transformers=={versions['transformers']}",
                    f"peft=={versions['peft']}"], check=True)
    marker.write_text(json.dumps(wanted) + "\n")


def start_comparison(steps: int, version: str = TRL_VERSION) -> list[float]:
    """What every run against TRL does first: check the settings and the data, make the TRL environment;
    returns the load average at the start."""
    if steps < 2:
        sys.exit("--steps must be at least 2: the first step is warm-up")
    require_data()
    ensure_trl_venv(version)
    return load_average()


def trl_versions(version: str = TRL_VERSION) -> dict:
    code = ("import json, torch, transformers, peft, trl; print(json.dumps({'trl': trl.__version__, "
            "'torch': torch.__version__.split('+')[0], 'transformers': transformers.__version__, "
            "'peft': peft.__version__}))")
    return json.loads(subprocess.run([str(trl_python(version)), "-c", code], check=True, capture_output=True,
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
    # The TRL side trains in float32 (bf16=False): ours too, also on a CPU with AMX, where it would pick bfloat16.
    environment[CPU_PRECISION_VARIABLE] = "float32"
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


INSTRUCTION = "Summarize in less than 50 words."  # the local run's


def bundled_prompts(tokenizer, new_tokens: int, count: int | None = None) -> tuple[list[dict], list[list[int]]]:
    """The bundled sample's prompt rows (the first `count`) and their ids as the local run encodes them: the
    course's instruction, prompts of up to 512 tokens."""
    from rlhf.data.datasets import read_jsonl, sample_dataset
    from rlhf.data.prompts import PromptEncoder, PromptFormat

    rows = read_jsonl(Path(sample_dataset("prompts.jsonl")))[:count]
    encoder = PromptEncoder(tokenizer, PromptFormat(INSTRUCTION, None), 512, new_tokens)
    return rows, [encoder.encode_prompt(r) for r in rows]


def decoding_policy(new_tokens: int, count: int, dtype=None, adapter_std: float = 0.0):
    """What the decoding benchmarks decode with: the default model (in `dtype`, float32 unless given) with a
    fresh rank-8 LoRA adapter (seed 0) as a policy with no stop token, its tokenizer, and the ids of the first
    `count` bundled prompts. `adapter_std` above 0 draws the adapter's B matrices from N(0, adapter_std^2), an
    adapter that changes the weights as a trained one does (a fresh one adds nothing)."""
    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_placement
    from rlhf.rl.policy import Policy

    base = model_dir()
    tokenizer = load_tokenizer(base)
    _, prompts = bundled_prompts(tokenizer, new_tokens, count)
    torch.manual_seed(0)
    policy = Policy.create(load_causal_lm(base, pick_placement("cpu", dtype)), 8, [-1], tokenizer.pad_token_id)
    if adapter_std:
        with torch.no_grad():
            for name, parameter in policy.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, adapter_std)
    return policy, tokenizer, prompts


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes per second of summing a 400 MB float32 tensor (its pages touched first), the median of `repeats`:
    what bounds a decode step, which reads every weight once, from below."""
    import torch

    data = torch.randn(100_000_000)
    data.sum()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - started)
    return data.numel() * 4 / summary(times)["median"]


def alternated(ways: dict, repeats: int) -> tuple[dict, list[float]]:
    """Each way (a function returning {pass name: seconds}) run `repeats` rounds after a warm-up round, in
    alternating order, in this process: {way: {pass name: summary}}, and the read bandwidth before and after."""
    bandwidth = [read_bandwidth()]
    timings = {way: {} for way in ways}
    for round_ in range(repeats + 1):
        for way in list(ways) if round_ % 2 == 0 else reversed(list(ways)):
            seconds = ways[way]()
            if round_ == 0:
                continue  # warm-up: first-call allocations and kernel selection
            for name, value in seconds.items():
                timings[way].setdefault(name, []).append(value)
    bandwidth.append(read_bandwidth())
    return {way: {name: summary(values) for name, values in by_name.items()} for way, by_name in timings.items()}, bandwidth


def summary(values: list[float]) -> dict:
    """Median and spread of repeated timings."""
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": quartiles[0], "q3": quartiles[2], "n": len(ordered)}


def pair_side(runs: list[ChildRun], batch_size: int, pair_tokens: float) -> dict:
    """One side of a pair-training benchmark (reward model, DPO) over its runs: step times, pairs/s, tokens/s,
    peak memory, held-out accuracy per run."""
    step_seconds = [s for run in runs for s in run.result["step_seconds"]]
    return {
        "step_seconds": summary(step_seconds),
        # CPU time of the child: with idle cores it is about threads x wall time; much less means the child
        # waited for cores that other processes held.
        "step_cpu_seconds": summary([s for run in runs for s in run.result["step_cpu_seconds"]]),
        "pairs_per_second": summary([batch_size / s for s in step_seconds]),
        "tokens_per_second": summary([batch_size * pair_tokens / s for s in step_seconds]),
        "peak_rss_gb": max(run.peak_rss_gb for run in runs),
        "held_out_accuracy": [run.result["held_out_accuracy"] for run in runs],
        "run_wall_seconds": [round(run.wall_seconds, 1) for run in runs],
    }


def spread_text(stats: dict, digits: int = 2) -> str:
    return f"{stats['median']:.{digits}f} [{stats['min']:.{digits}f}–{stats['max']:.{digits}f}]"


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)}


def resident_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: resident now; VmHWM: the peak since
    the last reset of the counter through /proc/self/clear_refs), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_results(name: str, result: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nWrote {RESULTS / name}.json and .md", file=sys.stderr)
