import os
import socket
import uuid

import pytest

from tests.tiny_model import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny causal LM saved as a model directory."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real Cloud Storage emulator on loopback; yields a google-cloud-storage client for it."""
    from gcp_storage_emulator.server import create_server

    from rlhf.storage import gcs_client

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    gcs_client.cache_clear()
    try:
        yield gcs_client()
    finally:
        server.stop()
        if previous is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = previous
        gcs_client.cache_clear()


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """A fresh bucket for one test."""
    return gcs_emulator.create_bucket(f"test-{uuid.uuid4().hex[:16]}")


@pytest.fixture(scope="session")
def unloadable_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's config and tokenizer with weights that are not safetensors data: any stage that
    loads this model fails, and one that does not load it cannot tell it from a good one."""
    import shutil

    directory = tmp_path_factory.mktemp("unloadable-model")
    for file in tiny_model_dir.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, directory / file.name)
    (directory / "model.safetensors").write_bytes(b"these bytes are not a safetensors file")
    return directory
