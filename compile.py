"""Write pipeline.yaml and infer_pipeline.yaml from pipeline/definition.py (the code path of `rlhf compile`).

`python3 compile.py` works from a checkout: where this Python lacks kfp it runs again under the project's
.venv (which `make run` and `make test` create), creating .venv with only kfp at pyproject.toml's pin where
there is none yet (about half a minute; `make` later installs the rest into it), and where the package is not
installed, pipeline/ and components/ import as rlhf.pipeline and rlhf.components, the names the installed
package gives them.
"""

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"


def install_kfp() -> None:
    """Install the kfp pinned in pyproject.toml into the running .venv: compiling needs kfp and nothing heavier."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    kfp = next(d for d in dependencies if d.startswith("kfp=="))
    print(f"compile.py: installing {kfp} into {VENV} (about 30 s; `make` installs the rest there later)", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                    kfp], check=True)
    importlib.invalidate_caches()


if __name__ == "__main__":
    if importlib.util.find_spec("kfp") is None:
        if Path(sys.prefix).resolve() != VENV:
            if not VENV_PYTHON.exists():
                subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            os.execv(VENV_PYTHON, [str(VENV_PYTHON), str(Path(__file__).resolve())])
        install_kfp()
    import rlhf

    if importlib.util.find_spec("rlhf.pipeline") is None:
        rlhf.__path__.append(str(ROOT))  # a checkout not installed: pipeline/ and components/ sit beside rlhf/
    from rlhf.pipeline.compiler import COMPILED, compile_pipeline

    for pipeline, path in COMPILED.items():
        print(f"Wrote {compile_pipeline(ROOT / path.name, pipeline)}")
