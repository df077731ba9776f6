"""Reading datasets and models from gs:// through google-cloud-storage, against a local emulator."""

import json

from rlhf.data.datasets import prepare_datasets
from rlhf.data.storage import expand, read_bytes, write_bytes
from rlhf.data.validation import read_dataset
from rlhf.models.reference import COMPLETE_MARKER, resolve_model_reference
from tests.conftest import rlhf


def upload(bucket, name: str, content: bytes) -> str:
    bucket.blob(name).upload_from_string(content)
    return f"gs://{bucket.name}/{name}"


def pair(index: int) -> dict:
    return {"input_text": f"post {index} [summary]: ", "candidate_0": f"good {index}",
            "candidate_1": f"bad {index}", "choice": 0}


def test_read_one_object_and_write_back(gcs_bucket):
    uri = upload(gcs_bucket, "data/prompts.jsonl", b'{"input_text": "hello"}\n')
    assert read_bytes(uri) == b'{"input_text": "hello"}\n'
    write_bytes(f"gs://{gcs_bucket.name}/out/copy.jsonl", read_bytes(uri))
    assert gcs_bucket.blob("out/copy.jsonl").download_as_bytes() == b'{"input_text": "hello"}\n'


def test_globs_match_like_gsutil(gcs_bucket):
    for name in ("rlhf/train/part-0.jsonl", "rlhf/train/part-1.jsonl", "rlhf/train/deeper/part-2.jsonl",
                 "rlhf/train/readme.txt", "rlhf/eval/part-0.jsonl"):
        upload(gcs_bucket, name, b'{"input_text": "x"}\n')
    root = f"gs://{gcs_bucket.name}/rlhf"
    assert expand(f"{root}/train/*.jsonl") == [f"{root}/train/part-0.jsonl", f"{root}/train/part-1.jsonl"]
    assert expand(f"{root}/train/**/*.jsonl") == [
        f"{root}/train/deeper/part-2.jsonl", f"{root}/train/part-0.jsonl", f"{root}/train/part-1.jsonl"]
    assert expand(f"{root}/*/part-0.jsonl") == [f"{root}/eval/part-0.jsonl", f"{root}/train/part-0.jsonl"]
    assert expand(f"{root}/train/") == [f"{root}/train/part-0.jsonl", f"{root}/train/part-1.jsonl"]


def test_sharded_preference_data_validates_like_local_files(gcs_bucket):
    for shard in range(3):
        rows = [pair(shard * 10 + i) for i in range(4)]
        upload(gcs_bucket, f"prefs/train/shard-{shard}.jsonl", "\n".join(json.dumps(r) for r in rows).encode())
    uri = f"gs://{gcs_bucket.name}/prefs/train/*.jsonl"
    data = prepare_datasets(uri)
    assert len(data.train_pairs) + len(data.held_out_pairs) == 12
    assert data.summary["preference"]["files"] == 3


def test_problems_name_the_gs_uri_and_line(gcs_bucket):
    uri = upload(gcs_bucket, "bad.jsonl", json.dumps(pair(0)).encode() + b'\n{"input_text": "x", "choice": 1}\n')
    problems = [str(p) for p in read_dataset(uri, "preference").problems]
    assert problems == [f"{uri}:2: missing key 'candidate_0', 'candidate_1'"]


def test_missing_objects_and_empty_globs(gcs_bucket):
    missing = f"gs://{gcs_bucket.name}/nothing.jsonl"
    assert [str(p) for p in read_dataset(missing, "prompt").problems] == [f"{missing}:0: not found"]
    pattern = f"gs://{gcs_bucket.name}/none/*.jsonl"
    assert [str(p) for p in read_dataset(pattern, "prompt").problems] == [f"{pattern}:0: no object matches this pattern"]
    no_bucket = "gs://no-such-bucket-here/x.jsonl"
    assert [str(p) for p in read_dataset(no_bucket, "prompt").problems] == [f"{no_bucket}:0: not found"]


def test_model_directory_is_copied_into_the_cache_once(gcs_bucket, tiny_model_dir, tmp_path):
    for file in tiny_model_dir.iterdir():
        upload(gcs_bucket, f"models/tiny/{file.name}", file.read_bytes())
    uri = f"gs://{gcs_bucket.name}/models/tiny"
    messages = []
    local = resolve_model_reference(uri, tmp_path / "cache", messages.append)
    assert (tmp_path / "cache" / "gcs" / gcs_bucket.name / "models" / "tiny").samefile(local)
    assert {p.name for p in tiny_model_dir.iterdir()} | {COMPLETE_MARKER} == {p.name for p in local_files(local)}
    gcs_bucket.blob("models/tiny/config.json").delete()
    assert resolve_model_reference(uri, tmp_path / "cache", messages.append) == local
    assert len(messages) == 1

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(local).config.num_hidden_layers == 2


def local_files(directory):
    from pathlib import Path

    return list(Path(directory).iterdir())


def test_an_unresolvable_storage_host_fails_at_once_in_one_line(tmp_path):
    # `.invalid` never resolves (RFC 2606). Retried, such a call would take two minutes and end in a
    # RetryError line; the timeout below only stops a hang.
    result = rlhf("validate", "--preference-dataset", "gs://some-bucket/pairs.jsonl",
                  env={"STORAGE_EMULATOR_HOST": "http://no-such-host.invalid:4443"}, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("gs://some-bucket/pairs.jsonl:0: cannot reach Cloud Storage: its host no-such-host.invalid does not "
            "resolve") in result.stderr
    assert "RetryError" not in result.stderr
