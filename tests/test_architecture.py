"""The layout ARCHITECTURE.md draws: the core's rooms import only rooms below them, and the core imports
neither kfp nor aiplatform nor the command line."""

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# Each room may import from rooms with a lower number only; the core is every room below `vertex`.
LAYERS = {"errors": 0, "settings": 1, "data": 2, "models": 3, "training": 4, "reward": 5, "rl": 6, "evaluation": 7,
          "labeling": 8, "serving": 8, "vertex": 9, "components": 10, "pipeline": 11, "cli": 12}
SOURCE_DIRS = {"components": REPO / "components", "pipeline": REPO / "pipeline"}
CORE = [room for room, layer in LAYERS.items() if layer < LAYERS["vertex"]]


def modules(room: str) -> list[Path]:
    root = SOURCE_DIRS.get(room, REPO / "rlhf" / room)
    return sorted(root.rglob("*.py")) if root.is_dir() else [REPO / "rlhf" / f"{room}.py"]


def imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
            [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
        rooms |= {name.split(".")[1] for name in names if name.startswith("rlhf.")}
    return rooms


def test_every_module_of_the_package_is_in_a_room():
    top_level = {p.stem for p in (REPO / "rlhf").iterdir() if p.suffix == ".py" and p.stem != "__init__"}
    packages = {p.name for p in (REPO / "rlhf").iterdir() if (p / "__init__.py").is_file()}
    assert top_level | packages == set(LAYERS) - set(SOURCE_DIRS)


def test_rooms_import_only_rooms_below_them():
    upward = [f"{path.relative_to(REPO)} imports rlhf.{target}"
              for room in LAYERS for path in modules(room) for target in imported_rooms(path)
              if target != room and LAYERS[target] >= LAYERS[room]]
    assert not upward


def test_the_core_imports_neither_kfp_nor_aiplatform_nor_the_orchestration():
    names = [".".join(("rlhf", *p.relative_to(REPO / "rlhf").with_suffix("").parts)).removesuffix(".__init__")
             for room in CORE for p in modules(room)]
    code = (f"import importlib, sys\nfor name in {names!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kfp' or 'aiplatform' in m "
            "or m.startswith(('rlhf.pipeline', 'rlhf.components', 'rlhf.cli'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert len(names) > 30 and result.stdout.strip() == "[]"


BLOCKS = (ast.For, ast.While, ast.If, ast.With, ast.Try)
TRAINERS = ("rlhf/training/loop.py", "rlhf/reward/training.py", "rlhf/rl/ppo.py", "rlhf/rl/dpo.py", "rlhf/rl/sft.py")


def nesting(node: ast.AST, depth: int = 0) -> int:
    """The deepest nesting of blocks in a function's body (an `elif` counts as its `if`)."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        is_elif = isinstance(node, ast.If) and child in node.orelse and isinstance(child, ast.If)
        deeper = isinstance(child, BLOCKS) and not is_elif
        deepest = max(deepest, nesting(child, depth + deeper))
    return deepest


def test_the_trainers_nest_at_most_three_blocks_deep():
    functions = [(path, node) for path in TRAINERS for node in ast.walk(ast.parse((REPO / path).read_text()))
                 if isinstance(node, ast.FunctionDef)]
    too_deep = [f"{path}: {node.name} nests {nesting(node)} deep" for path, node in functions if nesting(node) > 3]
    assert len(functions) > 20 and not too_deep
