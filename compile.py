"""Write pipeline.yaml from pipeline/definition.py (the same code path as `rlhf compile`).

`python3 compile.py` works from a checkout: where this Python lacks kfp it runs again under the project's
.venv (which `make run` and `make test` create), and where the package is not installed, pipeline/ and
components/ import as rlhf.pipeline and rlhf.components, the names the installed package gives them.
"""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"

if __name__ == "__main__":
    if importlib.util.find_spec("kfp") is None:
        if (VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != VENV:
            os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), str(Path(__file__).resolve())])
        sys.exit("compile.py needs kfp and this project's dependencies: run `make test` (or `make run`) once to "
                 "create .venv, then `python3 compile.py` again")
    import rlhf

    if importlib.util.find_spec("rlhf.pipeline") is None:
        rlhf.__path__.append(str(ROOT))  # a checkout not installed: pipeline/ and components/ sit beside rlhf/
    from rlhf.pipeline.compiler import compile_pipeline

    print(f"Wrote {compile_pipeline(ROOT / 'pipeline.yaml')}")
