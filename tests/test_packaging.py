"""The wheel works outside the checkout: `rlhf compile` and `rlhf submit --dry-run` from a fresh virtual
environment in a temporary folder, with the compiled pipeline shipped as package data."""

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_the_wheel_compiles_and_submits_from_outside_the_checkout(tmp_path):
    # Built from a copy of the sources, so no build folder of the checkout's (or left in it) takes part.
    source = tmp_path / "source"
    for name in ("rlhf", "pipeline", "components"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "pipeline.yaml"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    assert "absent from the `packages` configuration" not in built.stderr  # printed at every user's install
    wheel = next((tmp_path / "dist").glob("rlhf_pipeline-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("rlhf_pipeline-")} == {"rlhf"}
    assert {"rlhf/pipeline/pipeline.yaml", "rlhf/labeling/templates/labeling.html",
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
