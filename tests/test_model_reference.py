import json

import pytest

from rlhf.models.reference import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    ModelReferenceError,
    cache_dir,
    prepare_default_model,
    resolve_model_reference,
)

pytestmark = pytest.mark.slow


def test_local_model_directory(tiny_model_dir, tmp_path):
    assert resolve_model_reference(str(tiny_model_dir), tmp_path) == str(tiny_model_dir.resolve())


def test_course_names_map_to_hub_ids_and_hub_ids_pass_through(tmp_path):
    assert resolve_model_reference("llama-2-7b", tmp_path) == "meta-llama/Llama-2-7b-hf"
    assert resolve_model_reference("LLAMA-2-7B-CHAT", tmp_path) == "meta-llama/Llama-2-7b-chat-hf"
    assert resolve_model_reference("HuggingFaceTB/SmolLM2-360M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-360M-Instruct"


@pytest.mark.parametrize("reference,phrase", [
    ("", "is empty"),
    ("text-bison@001", "no open weights"),
    ("t5-xl", "encoder-decoder"),
    ("not a model!", "unknown large_model_reference"),
    ("./no/such/dir", "no such directory"),
])
def test_unusable_references_list_what_is_accepted(reference, phrase, tmp_path):
    with pytest.raises(ModelReferenceError) as error:
        resolve_model_reference(reference, tmp_path)
    assert phrase in str(error.value)
    assert "accepted:" in str(error.value) and DEFAULT_MODEL in str(error.value)


def test_a_directory_without_config_is_not_a_model(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelReferenceError, match="no config.json"):
        resolve_model_reference(str(tmp_path / "weights"), tmp_path)


def test_cache_location_is_configurable(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("RLHF_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "rlhf"


def test_default_model_is_converted_once_to_a_plain_safetensors_directory(monkeypatch, tmp_path):
    """The real default model: converted on first use (~1 min), into a cache of this test's own, so the
    user's cache is neither used nor changed."""
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    messages = []
    directory = prepare_default_model(progress=messages.append)
    assert directory.is_relative_to(tmp_path / "cache") and messages
    assert resolve_model_reference(DEFAULT_MODEL, progress=messages.append) == str(directory)
    assert resolve_model_reference("SmolLM2-135M-Instruct", progress=messages.append) == str(directory)
    files = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".gguf")) for name in files)
    marker = (directory / COMPLETE_MARKER).stat().st_mtime_ns
    assert prepare_default_model(progress=messages.append) == directory
    assert (directory / COMPLETE_MARKER).stat().st_mtime_ns == marker

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.chat_template
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()


def test_a_model_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelReferenceError, match="only safetensors are loaded"):
        resolve_model_reference(str(tmp_path), tmp_path / "cache")
