"""A pipeline stage on several machines: a Vertex AI custom job whose worker pools run the stage's own
container, the way Vertex AI runs distributed training (and GCPC's `create_custom_training_job_from_component`
runs a component): the chief in worker pool 0, the other replicas in worker pool 1, every one with the same
machine. Each replica gets `CLUSTER_SPEC` from Vertex AI, and the stage's processes meet at the chief's address
(`rlhf.training.distributed.Machines`).

`python -m rlhf.vertex.custom_job [options] -- COMMAND...` is the launcher: the pipeline task that runs it needs
no accelerator; it creates the job, reports its state until it ends, and cancels it when the task is stopped
or the job's state can no longer be read.
The job's replicas run COMMAND, the stage component's own command with its inputs and outputs already filled
in by Vertex AI Pipelines, so the stage reads and writes the same Cloud Storage paths it would on one machine.

Vertex AI's REST API through google-auth (a dependency of google-cloud-aiplatform), with the environment's
credentials: on Vertex AI, the pipeline's service account.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from dataclasses import dataclass

from rlhf.errors import RunFailure, UserError

FINAL_STATES = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED")
POLL_SECONDS = 30.0
TRIES = 6  # reads of a job's state before its launcher gives up (about a minute of waits at the default backoff)


@dataclass(frozen=True)
class MachineType:
    name: str
    cpus: int
    memory_gib: float


def _n1(cpus_at_most: int) -> list[MachineType]:
    """N1 machines, to which T4, V100 and P100 GPUs attach, up to the vCPUs a GPU count allows."""
    return [MachineType(f"n1-standard-{n}", n, 3.75 * n) for n in (4, 8, 16, 32, 64, 96) if n <= cpus_at_most]


# The machines each GPU comes on, by GPU count, as Compute Engine offers them (vCPUs, memory in GiB).
MACHINE_TYPES: dict[str, dict[int, list[MachineType]]] = {
    "NVIDIA_L4": {1: [MachineType(f"g2-standard-{n}", n, 4 * n) for n in (4, 8, 12, 16, 32)],
                  2: [MachineType("g2-standard-24", 24, 96)], 4: [MachineType("g2-standard-48", 48, 192)],
                  8: [MachineType("g2-standard-96", 96, 384)]},
    "NVIDIA_TESLA_A100": {n: [MachineType(f"a2-highgpu-{n}g", 12 * n, 85 * n)] for n in (1, 2, 4, 8)},
    "NVIDIA_A100_80GB": {n: [MachineType(f"a2-ultragpu-{n}g", 12 * n, 170 * n)] for n in (1, 2, 4, 8)},
    "NVIDIA_H100_80GB": {n: [MachineType(f"a3-highgpu-{n}g", 26 * n, 234 * n)] for n in (1, 2, 4, 8)},
    "NVIDIA_H100_MEGA_80GB": {8: [MachineType("a3-megagpu-8g", 208, 1872)]},
    "NVIDIA_H200_141GB": {8: [MachineType("a3-ultragpu-8g", 224, 2952)]},
    "NVIDIA_B200": {8: [MachineType("a4-highgpu-8g", 224, 3968)]},
    "NVIDIA_TESLA_T4": {1: _n1(48), 2: _n1(48), 4: _n1(96)},
    "NVIDIA_TESLA_V100": {1: _n1(12), 2: _n1(24), 4: _n1(48), 8: _n1(96)},
    "NVIDIA_TESLA_P100": {1: _n1(16), 2: _n1(32), 4: _n1(64)},
}

_MEMORY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                 "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_MEMORY = re.compile(r"([0-9]+)(|K|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)")
_CPU = re.compile(r"([0-9]*\.?[0-9]+)(m?)")


def cpu_count(limit: str) -> float:
    """A Kubernetes CPU quantity ("8", "0.5", "500m") as a number of CPUs, as the pipeline's `*_cpu_limit`."""
    match = _CPU.fullmatch(str(limit))
    if not match:
        raise UserError(f"{limit!r}: a number of CPUs, such as 8 or 500m")
    return float(match[1]) / (1000 if match[2] else 1)


def memory_bytes(limit: str) -> int:
    """A Kubernetes memory quantity ("32G", "64Gi"), as the pipeline's `*_memory_limit`, in bytes."""
    match = _MEMORY.fullmatch(str(limit))
    if not match:
        raise UserError(f"{limit!r}: a size, such as 32G")
    return int(match[1]) * _MEMORY_UNITS[match[2]]


# What a stage's machine is made of: the pipeline's `<stage>_<setting>` parameters, `machine_type`'s arguments.
MACHINE_SETTINGS = ("accelerator_type", "accelerator_count", "cpu_limit", "memory_limit")


def machine_type(accelerator_type: str, accelerator_count: int, cpu_limit: str, memory_limit: str) -> str:
    """The smallest machine with `accelerator_count` of `accelerator_type` and at least the CPUs and memory the
    stage asks for (on one machine, Vertex AI Pipelines chooses it from the same settings)."""
    offered = MACHINE_TYPES.get(accelerator_type, {}).get(accelerator_count)
    if not offered:
        counts = sorted(MACHINE_TYPES.get(accelerator_type, {}))
        raise UserError(f"{accelerator_count} x {accelerator_type}: no Vertex AI machine carries that; "
                        + (f"this GPU comes {', '.join(map(str, counts))} to a machine" if counts else
                           f"one of {', '.join(MACHINE_TYPES)}"))
    cpus, memory_gib = cpu_count(cpu_limit), memory_bytes(memory_limit) / 2**30
    for machine in offered:
        if machine.cpus >= cpus and machine.memory_gib >= memory_gib:
            return machine.name
    largest = offered[-1]
    raise UserError(f"{accelerator_count} x {accelerator_type} with {cpu_limit} CPUs and {memory_limit} of memory: "
                    f"the largest machine with these GPUs, {largest.name}, has {largest.cpus} vCPUs and "
                    f"{largest.memory_gib:g} GiB")


def worker_pool_specs(image: str, command: list[str], replica_count: int, machine: str, accelerator_type: str,
                      accelerator_count: int) -> list[dict]:
    """The chief's pool (one replica) and, for `replica_count` above 1, the workers' (the rest): the same
    machine and container for all, as Vertex AI's distributed training expects."""
    if replica_count < 1:
        raise UserError(f"replica_count={replica_count}: a stage runs on at least one machine")
    pool = {"machineSpec": {"machineType": machine, "acceleratorType": accelerator_type,
                            "acceleratorCount": accelerator_count},
            "replicaCount": 1, "containerSpec": {"imageUri": image, "command": list(command)},
            "diskSpec": {"bootDiskType": "pd-ssd", "bootDiskSizeGb": 100}}
    return [pool] + ([{**pool, "replicaCount": replica_count - 1}] if replica_count > 1 else [])


class CustomJobs:
    """Vertex AI's custom jobs in one project and region, over REST."""

    def __init__(self, project: str, location: str, api_endpoint: str = "", backoff_seconds: float = 2.0):
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
        from google.auth.transport.requests import AuthorizedSession

        try:
            credentials, default_project = google.auth.default(
                scopes=["https://www.googleapis.com/auth/cloud-platform"])
        except DefaultCredentialsError as error:
            raise UserError(f"no Google Cloud credentials here: {error}") from None
        self.project = project or default_project
        if not self.project:
            raise UserError("project: the custom job needs a project; give `project` or run where the environment "
                            "has one")
        self.location = location
        self.api = f"{api_endpoint or f'https://{location}-aiplatform.googleapis.com'}/v1"
        self.session = AuthorizedSession(credentials)
        self.backoff_seconds = backoff_seconds

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        """One request; a read that fails for a passing reason (no connection, HTTP 429 or 5xx) is tried again,
        up to TRIES times, waiting twice as long each time: a job runs for hours, and one dropped read must not
        fail its stage."""
        for attempt in range(TRIES if method == "GET" else 1):
            if attempt:
                time.sleep(self.backoff_seconds * 2 ** (attempt - 1))
            try:
                response = self.session.request(method, f"{self.api}/{path}", json=body, timeout=60)
            except OSError as error:  # requests' connection errors and timeouts are OSErrors
                problem = f"{type(error).__name__}: {error}"
                continue
            if response.status_code == 200:
                return response.json()
            problem = f"HTTP {response.status_code}: {response.text[:500]}"
            if response.status_code != 429 and response.status_code < 500:
                break
        raise RunFailure(f"Vertex AI did not answer {method} {path} ({problem})")

    def create(self, display_name: str, pools: list[dict], encryption_spec_key_name: str = "") -> dict:
        body = {"displayName": display_name, "jobSpec": {"workerPoolSpecs": pools}}
        if encryption_spec_key_name:
            body["encryptionSpec"] = {"kmsKeyName": encryption_spec_key_name}
        return self._call("POST", f"projects/{self.project}/locations/{self.location}/customJobs", body)

    def get(self, name: str) -> dict:
        return self._call("GET", name)

    def cancel(self, name: str) -> None:
        self._call("POST", f"{name}:cancel", {})


def run_custom_job(jobs: CustomJobs, display_name: str, pools: list[dict], encryption_spec_key_name: str = "",
                   poll_seconds: float = POLL_SECONDS) -> dict:
    """Create the job, print each change of its state, and return it once it has succeeded. A failed, cancelled
    or expired job is a RunFailure with Vertex AI's reason; a SIGTERM (the pipeline task stopped) cancels it."""
    job = jobs.create(display_name, pools, encryption_spec_key_name)
    name = job["name"]
    replicas = sum(int(pool["replicaCount"]) for pool in pools)
    print(f"custom job {name}: {replicas} machine(s) of {pools[0]['machineSpec']['machineType']}; "
          f"https://console.cloud.google.com/vertex-ai/locations/{jobs.location}/training/{name.rsplit('/', 1)[-1]}"
          f"/cpu?project={jobs.project}", flush=True)

    def cancel(signum, frame):
        print(f"custom job {name}: stop requested; cancelling it", flush=True)
        jobs.cancel(name)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, cancel)
    started, state = time.monotonic(), None
    try:
        while job.get("state") not in FINAL_STATES:
            if job.get("state") != state:
                state = job.get("state")
                print(f"custom job {name}: {state} ({time.monotonic() - started:.0f} s)", flush=True)
            time.sleep(poll_seconds)
            job = jobs.get(name)
    except RunFailure as error:
        # A retry of the stage starts a new job on the same checkpoint: this one must not run on beside it.
        print(f"custom job {name}: its state cannot be read; cancelling it", flush=True)
        try:
            jobs.cancel(name)
            outcome = "it was cancelled, and running the stage again resumes from its checkpoint"
        except RunFailure:
            outcome = "cancelling it failed too: cancel it in the console before running the stage again"
        raise RunFailure(f"custom job {name}: {error}; {outcome}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"custom job {name}: {job['state']} ({time.monotonic() - started:.0f} s)", flush=True)
    if job["state"] != "JOB_STATE_SUCCEEDED":
        reason = job.get("error", {}).get("message", "no reason given")
        raise RunFailure(f"custom job {name} ended {job['state']}: {reason}. Its logs are in Cloud Logging; a "
                         "training stage's checkpoint is kept, and running the stage again resumes from it")
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.vertex.custom_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--display-name", required=True)
    parser.add_argument("--project", default="", help="empty: the environment's project")
    parser.add_argument("--location", required=True)
    parser.add_argument("--replica-count", type=int, required=True)
    parser.add_argument("--accelerator-type", required=True)
    parser.add_argument("--accelerator-count", type=int, required=True)
    parser.add_argument("--cpu-limit", required=True)
    parser.add_argument("--memory-limit", required=True)
    parser.add_argument("--image", required=True)
    parser.add_argument("--encryption-spec-key-name", default="")
    parser.add_argument("--api-endpoint", default="", help="empty: the region's Vertex AI endpoint")
    parser.add_argument("--poll-seconds", type=float, default=POLL_SECONDS)
    parser.add_argument("command", nargs="+", help="after --: what each replica runs")
    arguments = parser.parse_args(argv)
    try:
        machine = machine_type(arguments.accelerator_type, arguments.accelerator_count, arguments.cpu_limit,
                               arguments.memory_limit)
        pools = worker_pool_specs(arguments.image, arguments.command, arguments.replica_count, machine,
                                  arguments.accelerator_type, arguments.accelerator_count)
        jobs = CustomJobs(arguments.project, arguments.location, arguments.api_endpoint,
                          backoff_seconds=min(2.0, arguments.poll_seconds))
        run_custom_job(jobs, arguments.display_name, pools, arguments.encryption_spec_key_name,
                       arguments.poll_seconds)
    except (UserError, RunFailure) as error:
        print(f"rlhf: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
