"""The wheel works outside the checkout: `rlhf compile` and `rlhf submit --dry-run` from a fresh virtual
environment in a temporary folder, with the compiled pipeline shipped as package data; and every package the
code imports is one pyproject declares."""

import ast
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO


@pytest.mark.slow
def test_the_wheel_compiles_and_submits_from_outside_the_checkout(tmp_path):
    # Built from a copy of the sources, so no build folder of the checkout's (or left in it) takes part.
    source = tmp_path / "source"
    for name in ("rlhf", "pipeline", "components"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "pipeline.yaml", "infer_pipeline.yaml"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert "absent from the `packages` configuration" not in built.stderr  # printed at every user's install
    wheel = next((tmp_path / "dist").glob("rlhf_pipeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("rlhf_pipeline-")} == {"rlhf"}
    assert {"rlhf/pipeline/pipeline.yaml", "rlhf/pipeline/infer_pipeline.yaml", "rlhf/labeling/templates/labeling.html",
            "rlhf/evaluation/templates/report.html", "rlhf/sample_data/preference.jsonl",
            "rlhf/sample_data/README.md"} <= set(names)

    # A fresh environment holding only the wheel; the dependencies come from this one's site-packages by
    # a path entry, which (unlike a site directory) does not run this checkout's editable-install hook.
    fresh = tmp_path / "env"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import rlhf.pipeline; print(rlhf.pipeline.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site)

    rlhf = fresh / "bin" / "rlhf"
    compiled = subprocess.run([rlhf, "compile", "--output", "mine.yaml"], cwd=elsewhere, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    assert (elsewhere / "mine.yaml").read_text() == (REPO / "pipeline.yaml").read_text()

    submitted = subprocess.run([rlhf, "submit", "--dry-run", "--project", "p1", "--location", "us-central1",
                                "--pipeline-root", "gs://bucket-x/runs", "--set", "kl_coeff=0.05",
                                "--set", "preference_dataset=gs://bucket-x/pref.jsonl",
                                "--set", "prompt_dataset=gs://bucket-x/prompts.jsonl"],
                               cwd=elsewhere, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    body = json.loads(submitted.stdout)
    assert body["pipelineSpec"] == yaml.safe_load((REPO / "pipeline.yaml").read_text())
    assert body["runtimeConfig"]["parameterValues"]["kl_coeff"] == 0.05
    inferred = subprocess.run([rlhf, "submit", "--dry-run", "--pipeline", "infer", "--project", "p1",
                               "--pipeline-root", "gs://bucket-x/runs", "--set", "prompt_dataset=gs://bucket-x/p.jsonl"],
                              cwd=elsewhere, capture_output=True, text=True)
    assert inferred.returncode == 0, inferred.stderr
    assert json.loads(inferred.stdout)["pipelineSpec"] == yaml.safe_load((REPO / "infer_pipeline.yaml").read_text())


def _imported_distributions(folders: list[str]) -> dict[str, set[str]]:
    """The installed distributions that the modules under `folders` import directly, each with the modules
    that import it (imports of the standard library and of this repository left out)."""
    providers = packages_distributions()
    ours = {"rlhf", "pipeline", "components", "tests", "bench", "experiments"}
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [f"{node.module}.{alias.name}" for alias in node.names]  # a name may be a module
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top in sys.stdlib_module_names or top in ours:
                        continue
                    # A namespace package (google) is provided by many distributions: the module's own
                    # distribution is the one whose files hold it.
                    for provider in _providers_of(module, providers.get(top, [top])):
                        found.setdefault(_normalised(provider), set()).add(str(path.relative_to(REPO)))
    return found


def _providers_of(module: str, candidates: list[str]) -> list[str]:
    """The distributions among `candidates` whose files hold the longest leading part of `module`."""
    if len(candidates) == 1:
        return candidates
    files = {name: [str(file) for file in distribution(name).files or []] for name in candidates}
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = "/".join(parts[:end])
        holders = [name for name in candidates
                   if any(file == f"{prefix}.py" or file.startswith(f"{prefix}/") for file in files[name])]
        if holders:
            return holders
    return candidates


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(*extras: str) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return {_normalised(re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)) for requirement in requirements}


@pytest.mark.parametrize("folders, extras", [(["rlhf", "pipeline", "components"], ()), (["tests"], ("test",))])
def test_every_imported_distribution_is_declared(folders, extras):
    """What the package (or the tests) import must be in pyproject's dependencies (or the test extra), not only
    arrive with another package that happens to need it today."""
    undeclared = {name: sorted(modules) for name, modules in _imported_distributions(folders).items()
                  if name not in _declared(*extras)}
    assert not undeclared, undeclared
