"""Reading a compiled pipeline's YAML as Vertex AI Pipelines does: tasks inside branches (`dsl.If`, `dsl.Else`)
sit in their branch's own DAG, and take their inputs from the branch, which takes them from the pipeline."""

from __future__ import annotations

import yaml


def load(path) -> dict:
    return yaml.safe_load(path.read_text())


def tasks(spec: dict) -> dict[str, tuple[str, dict]]:
    """Every task of the pipeline, in the root DAG or a branch's, by name: (its DAG's component, the task)."""
    dags = {"root": spec["root"], **{name: c for name, c in spec["components"].items() if "dag" in c}}
    found = {}
    for scope, component in dags.items():
        for name, task in component["dag"]["tasks"].items():
            assert name not in found, f"two tasks named {name}"
            found[name] = (scope, task)
    return found


def source(spec: dict, task: str, name: str, kind: str = "parameters") -> dict:
    """Where a task's input `name` (a parameter, or with kind="artifacts" an artifact) comes from, followed up
    through the branches that hold the task: {"componentInputParameter": a pipeline parameter}, a task's output
    in the root DAG, or a constant."""
    every = tasks(spec)
    runs = {t["componentRef"]["name"]: (scope, t) for scope, t in every.values()}  # a branch's DAG: its task
    scope, given = every[task][0], every[task][1]["inputs"][kind][name]
    key = "componentInputParameter" if kind == "parameters" else "componentInputArtifact"
    while scope != "root" and key in given:
        scope, parent = runs[scope]
        given = parent["inputs"][kind][given[key]]
    return given


def producers(spec: dict, task: str, artifact: str) -> set[str]:
    """The tasks whose output a task's input artifact is: one, or one per branch of a `dsl.OneOf`."""
    given = source(spec, task, artifact, "artifacts")["taskOutputArtifact"]
    return _leaves(spec, given["producerTask"], given["outputArtifactKey"])


def _leaves(spec: dict, task: str, output: str) -> set[str]:
    component = spec["components"][tasks(spec)[task][1]["componentRef"]["name"]]
    if "dag" not in component:
        return {task}
    selectors = component["dag"]["outputs"]["artifacts"][output]["artifactSelectors"]
    return {leaf for s in selectors for leaf in _leaves(spec, s["producerSubtask"], s["outputArtifactKey"])}
