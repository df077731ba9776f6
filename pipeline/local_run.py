"""Run `rlhf_pipeline` on the KFP local runner (SubprocessRunner: this Python environment, no installs).

Each stage's output (its component's stdout and stderr) goes to `OUTPUT/logs/<stage>.log`; the terminal
gets one line when a stage starts and one when it ends, with its time. The report and metrics of the
evaluate stage are copied to `OUTPUT/report.html` and `OUTPUT/metrics.json`.

A run stops on Ctrl-C, SIGTERM or a closed terminal with the running stage's checkpoint, and the same
command resumes it: `OUTPUT/run.json` records the settings, every stage keeps its output path from one
invocation to the next, KFP's local cache reuses the stages that finished, and the stopped stage resumes
from its checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sys
import textwrap
import time
import warnings
from pathlib import Path

from rlhf.data.datasets import sample_dataset
from rlhf.data.storage import is_gcs
from rlhf.errors import RunFailure, UserError
from rlhf.models.reference import DEFAULT_MODEL

# Sized for a 2-core laptop CPU and the bundled sample (the aim: `make run` from a fresh clone within 15 minutes;
# the times measured, which miss it on slower machines, are in LEARNING.md).
# Vertex-sized defaults are the pipeline's own (see pipeline/definition.py); anything here can be changed
# with --params or --set. How each value was chosen, with the runs that chose it: LEARNING.md.
LOCAL_DEFAULTS = {
    "preference_dataset": sample_dataset("preference.jsonl"),
    "prompt_dataset": sample_dataset("prompts.jsonl"),
    "eval_dataset": sample_dataset("eval.jsonl"),
    "large_model_reference": DEFAULT_MODEL,
    "instruction": "Summarize in less than 50 words.",
    # Epochs at x10 rank the policy's own samples by the rule far better than 2 at x30 (both reach 1.00 on the
    # held-out pairs): experiments/reward_rule_agreement.py, LEARNING.md. 3 epochs of the 126 training pairs.
    "reward_model_train_epochs": 3,
    "reward_model_batch_size": 16,
    "reward_model_learning_rate_multiplier": 10.0,
    "reinforcement_learning_train_steps": 20,
    "reinforcement_learning_batch_size": 16,
    "reinforcement_learning_micro_batch_size": 8,
    # All 16 rollouts in one sampling pass: a decode step of 16 rows costs little more than one of 8
    # (BENCHMARKS.md sections 7 and 16).
    "reinforcement_learning_rollout_micro_batch_size": 16,
    "reinforcement_learning_minibatch_size": 8,
    "reinforcement_learning_ppo_epochs": 1,  # fresher rollouts: 20 steps of one epoch beat 12 of two (LEARNING.md)
    "reinforcement_learning_rate_multiplier": 5.0,
    # PPO improves what the policy samples, and the base model samples a summary about once in a hundred
    # tries: a warm-up on the training pairs first, as the best pipelines start PPO from a tuned model. DPO
    # steps rather than supervised ones: learning from the losers too, they leave no copy of the post on the
    # greedy path and cost a third of the KL (LEARNING.md, "A DPO warm-up, and the warmed-up policy as PPO's
    # reference"). PPO's KL penalty is then to the warmed-up policy.
    "dpo_warmup_steps": 8,
    "dpo_beta": 0.5,
    # The warm-up alone is 4-5 nats from the base, and the KL to the base grew with PPO's KL to the warmed-up
    # policy: at 0.3, that stayed near 3 nats on two seeds of three and the KL to the base passed 10 (LEARNING.md,
    # "Loops are not summaries, and a tighter leash").
    "kl_coeff": 0.5,
    "target_sequence_length": 64,
}

_TASK_START = re.compile(r"Executing task '?(?P<task>[\w-]+)'?")
_TASK_END = re.compile(r"Task '?(?P<task>[\w-]+)'? finished with status (?P<status>\w+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTOR_LINE = re.compile(r"^\s*\[KFP Executor [^\]]*\]")
_PROGRESS = re.compile(r": \d+/\d+ \w+ \(\d+%\), ")  # the lines rlhf.training.progress prints
PROGRESS_EVERY_SECONDS = 5.0


RUN_RECORD = "run.json"  # the settings and input digests of the run an output directory holds
DATASET_PARAMETERS = ("preference_dataset", "prompt_dataset", "eval_dataset")


class RunError(RunFailure):
    """A stage failed; the message names it and its log."""


class RunStopped(RunFailure):
    """The run stopped on request; the running stage kept its checkpoint and the same command resumes."""


def input_digests(parameters: dict) -> dict[str, str]:
    """sha256 of each local dataset file, so a resumed run refuses inputs that changed since it started."""
    digests = {}
    for name in DATASET_PARAMETERS:
        path = parameters.get(name)
        if path and not is_gcs(path) and Path(path).is_file():
            digests[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digests


def resumes(parameters: dict, output_dir: Path) -> bool:
    """True when `output_dir` holds the record of an earlier run with these settings and inputs (the run
    resumes it), False when it holds none (the CLI's one overwrite check has refused a directory that holds
    anything else); a UserError when the recorded run's settings or inputs differ."""
    record = Path(output_dir) / RUN_RECORD
    if not record.is_file():
        return False
    earlier = json.loads(record.read_text())
    names = set(earlier["parameters"]) | set(parameters)
    differ = sorted(n for n in names if earlier["parameters"].get(n) != parameters.get(n))
    if differ:
        raise UserError(f"--output-dir {output_dir} holds a run with other settings ({', '.join(differ)}); "
                        "choose a new directory, or give the same settings to resume it")
    changed = sorted(n for n, d in input_digests(parameters).items() if earlier["inputs"].get(n) != d)
    if changed:
        raise UserError(f"--output-dir {output_dir} holds a run whose inputs have changed since "
                        f"({', '.join(changed)}); choose a new directory")
    return True


def _stage_pids() -> list[int]:
    """Every process below this one (Linux /proc): the running stage, which the KFP local runner starts under
    a shell (`sh -c ... python3 -m kfp.dsl.executor_main`), and its ranks when it has several. The signal must
    reach the Python processes themselves: the shell dies of a SIGTERM without passing it on."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    below, frontier = [], [os.getpid()]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        below += children
        frontier = children
    return below


class _StopOnSignal:
    """While the pipeline runs, the first Ctrl-C, SIGTERM or SIGHUP asks the running stage to checkpoint and
    stop: it is forwarded to the stage as SIGTERM (a terminal's Ctrl-C reaches it too, and its StopFlag takes
    both as one request); between stages the run stops at once. A second Ctrl-C aborts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self) -> _StopOnSignal:
        self.previous = {s: signal.signal(s, self._request) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _request(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        stages = _stage_pids()
        for pid in stages:
            with contextlib.suppress(ProcessLookupError):  # it may have ended since
                os.kill(pid, signal.SIGTERM)
        if not stages:
            raise KeyboardInterrupt


def _one_run_per_directory(pipeline_name: str) -> str:
    """The KFP local runner names each run's folder after the time it started; a fixed name keeps every
    stage's output path the same from one invocation to the next, which is what lets a stage resume."""
    return pipeline_name


class _StageRouter(io.TextIOBase):
    """Stands in for sys.stdout during a run: the KFP local runner prints its own log lines and each
    component's output there. Lines go to the current stage's log file; stage starts and ends are
    reported on the terminal with their times."""

    def __init__(self, logs: Path, terminal):
        self.logs = logs
        self.terminal = terminal
        self.current = open(logs / "pipeline.log", "a", encoding="utf-8")
        self.started: dict[str, float] = {}
        self.failed: str | None = None
        self.pending = ""
        self.last_progress = 0.0
        self.progress_shown = False
        self.interactive = terminal.isatty()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        plain = _ANSI.sub("", line)
        start, end = _TASK_START.search(plain), _TASK_END.search(plain)
        if start:
            task = start["task"]
            self.started[task] = time.monotonic()
            self.current.close()
            self.current = open(self.logs / f"{task}.log", "a", encoding="utf-8")
            self.say(f"[{time.strftime('%H:%M:%S')}] {task}: started")
        self.current.write(plain + "\n")
        self.current.flush()
        if _PROGRESS.search(plain):
            self._progress(plain.strip())
        if end:
            task, status = end["task"], end["status"]
            seconds = time.monotonic() - self.started.get(task, time.monotonic())
            self.say(f"[{time.strftime('%H:%M:%S')}] {task}: {status.lower()} in {seconds:.0f} s")
            if status != "SUCCESS":
                self.failed = task

    def _progress(self, bar: str) -> None:
        """Stage progress bars (steps, rate, ETA) on the terminal, at most every few seconds."""
        now = time.monotonic()
        if now - self.last_progress < PROGRESS_EVERY_SECONDS and "(100%)" not in bar:
            return
        self.last_progress = now
        if self.interactive:
            self.terminal.write(f"\r    {bar[:150]}\x1b[K")
            self.progress_shown = True
        else:
            self.terminal.write(f"    {bar[:150]}\n")
        self.terminal.flush()

    def say(self, line: str) -> None:
        if self.progress_shown:
            self.terminal.write("\n")
            self.progress_shown = False
        self.terminal.write(line + "\n")
        self.terminal.flush()

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = ""
        self.current.close()
        super().close()


def _find(root: Path, task: str, output: str) -> Path | None:
    matches = sorted(root.glob(f"*/{task}/{output}"))
    return matches[-1] if matches else None


def _branch_artifacts(cls, dag_outputs_spec, io_store) -> dict:
    """The output artifacts of a DAG, where a `dsl.OneOf` (a training stage on one machine or on several) takes
    the artifact of the branch that ran: what KFP's local runner does for a `dsl.OneOf` of parameters, and
    Vertex AI Pipelines for both."""
    outputs = {}
    for key, spec in dag_outputs_spec.artifacts.items():
        produced = []
        for selector in spec.artifact_selectors:
            try:
                produced.append(io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key))
            except (KeyError, ValueError):  # a branch that did not run
                continue
        if len(produced) != 1:
            raise RunFailure(f"the pipeline's output {key!r} came from {len(produced)} of its branches, not one")
        outputs[key] = produced[0]
    return outputs


def run_local(parameters: dict, output_dir: Path, echo=print) -> Path:
    """Run the pipeline, or resume the one `output_dir` holds (see `resumes`); return the report's path.
    Raises RunError naming a failed stage and its log, or RunStopped when stopped on request."""
    from kfp import local
    from kfp.local import executor_input_utils
    from kfp.local.orchestrator.orchestrator_utils import OrchestratorUtils

    from rlhf.evaluation.compare import COMPARISON_FILE, METRICS_FILE, REPORT_HTML, REPORT_MARKDOWN
    from rlhf.models.reference import resolve_model_reference
    from rlhf.pipeline.definition import build_pipeline

    output_dir = Path(output_dir)
    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_RECORD).write_text(json.dumps({"parameters": parameters, "inputs": input_digests(parameters)},
                                                    indent=2, sort_keys=True) + "\n")
    echo(f"Model: {parameters['large_model_reference']}")
    resolve_model_reference(parameters["large_model_reference"], progress=echo)
    root = output_dir / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True,
               enable_caching=True)

    router = _StageRouter(logs, sys.stderr)
    real_stdout, run_name = sys.stdout, executor_input_utils.get_local_pipeline_resource_name
    dag_artifacts = OrchestratorUtils.__dict__["get_dag_output_artifacts"]
    sys.stdout, executor_input_utils.get_local_pipeline_resource_name = router, _one_run_per_directory
    OrchestratorUtils.get_dag_output_artifacts = classmethod(_branch_artifacts)
    started = time.monotonic()
    stop = _StopOnSignal()
    try:
        with warnings.catch_warnings(), stop:
            warnings.simplefilter("ignore")
            build_pipeline(retries=0)(**parameters)
    except (RuntimeError, KeyboardInterrupt) as error:
        router.close()
        if stop.requested:
            during = f" during {router.failed}" if router.failed else ""
            raise RunStopped(f"stopped{during}; run the same command, with --output-dir {output_dir}, to resume") \
                from None
        if router.failed:
            log = logs / f"{router.failed}.log"
            raise RunError(f"stage {router.failed!r} failed; its log: {log}\n{_reason(log) or _tail(log)}") from None
        if isinstance(error, KeyboardInterrupt):
            raise
        raise RunError(f"the pipeline failed: {_ANSI.sub('', str(error))}") from None
    finally:
        sys.stdout, executor_input_utils.get_local_pipeline_resource_name = real_stdout, run_name
        OrchestratorUtils.get_dag_output_artifacts = dag_artifacts
        if not router.closed:
            router.close()

    evaluation = _find(root, "evaluate", "evaluation")
    if evaluation is None:
        raise RunError(f"the pipeline finished but left no evaluation under {root}")
    for name in (REPORT_HTML, METRICS_FILE, REPORT_MARKDOWN, COMPARISON_FILE):
        shutil.copyfile(evaluation / name, output_dir / name)
    echo(f"Pipeline finished in {time.monotonic() - started:.0f} s")
    return output_dir / REPORT_HTML


def _reason(log: Path, limit: int = 30) -> str:
    """What a failed stage said about its failure, without the runner's lines around it: the exception
    (not the stack frames above it) when it raised one, else the message it exited with."""
    if not log.is_file():
        return ""
    lines = log.read_text(errors="replace").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if "Streamed logs:" in line), 0)
    end = next((i for i in range(len(lines) - 1, start - 1, -1) if _TASK_END.search(lines[i])), len(lines))
    output, remaining = [], iter(lines[start:end])
    for line in remaining:
        if "Got executor_input:" in line:
            # The JSON that follows, up to the closing brace at the indentation of its opening one.
            closing = next(remaining, "").rstrip()[:-1] + "}"
            next((inner for inner in remaining if inner.rstrip() == closing), None)
        elif not _EXECUTOR_LINE.match(line):
            output.append(line)
    tracebacks = [i for i, line in enumerate(output) if line.strip() == "Traceback (most recent call last):"]
    if tracebacks:
        base = _indent(output[tracebacks[-1]])
        frames_end = next((i for i in range(tracebacks[-1] + 1, len(output))
                           if output[i].strip() and _indent(output[i]) <= base), len(output))
        output = output[frames_end:]
    text = textwrap.dedent("\n".join(output)).strip("\n")
    shown = text.splitlines()
    if len(shown) > limit:
        shown = shown[:limit] + [f"... and {len(shown) - limit} more lines in the log"]
    return textwrap.indent("\n".join(shown), "  ")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _tail(log: Path, lines: int = 15) -> str:
    if not log.is_file():
        return ""
    text = log.read_text(errors="replace").splitlines()
    return "\n".join(f"  | {line}" for line in text[-lines:])
