"""Writing and reading the model artifacts' files: safetensors weights and one JSON spec each."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf.errors import UserError

TENSORBOARD_DIR = "tensorboard"  # the training curves inside a reward-model or policy artifact


def save_weights(model, directory: Path) -> None:
    """save_pretrained in safetensors, without the model-card template peft adds: artifacts are data only."""
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)


def write_spec(path: Path, spec) -> None:
    path.write_text(json.dumps(asdict(spec), indent=2) + "\n")


def read_spec_file(directory: Path, file_name: str, spec_class, expected_format: str, what: str):
    path = Path(directory) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: not a {what} (no {file_name})")
    spec = spec_class(**json.loads(path.read_text()))
    if spec.format != expected_format:
        raise UserError(f"{path}: unknown {what} format {spec.format!r}")
    return spec


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickles(directory: Path) -> None:
    """Artifacts are read as safetensors and JSON only: a pickled file could run code when loaded."""
    found = sorted(p.relative_to(directory).as_posix() for p in Path(directory).rglob("*")
                   if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise UserError(f"{directory}: refusing to load an artifact holding pickled files ({', '.join(found)}); "
                         "only safetensors and JSON are read")


@dataclass
class ModelSpec:
    """What every model artifact records: its base model and how prompts were fed to it."""

    large_model_reference: str
    lora_dim: int
    prompt_sequence_length: int
    target_sequence_length: int
    instruction: str = ""
    use_chat_template: bool | None = None

    def prompt_format(self):
        from rlhf.data.prompts import PromptFormat

        return PromptFormat(self.instruction, self.use_chat_template)
