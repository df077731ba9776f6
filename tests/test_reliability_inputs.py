"""Bad input stops the pipeline in its first stage, before any model loads, with one `FILE:LINE: ...` per
problem, for local files and gs:// objects alike; and no input, however malformed, makes a reader or the
validator raise anything but the project's own error."""

import json
import re
import subprocess
import sys
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kfp.dsl import Artifact, Dataset, Metrics

from rlhf.components.validate import validate_datasets
from rlhf.data.config import DataConfig
from rlhf.data.datasets import DatasetError, prepare_datasets, read_jsonl, sample_dataset, write_jsonl
from rlhf.data.validation import read_dataset
from tests.bad_inputs import file_cases, row_cases

pytestmark = pytest.mark.slow

PROBLEM_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+): (?P<message>.+)$")
SLOT = {"preference": "preference_dataset", "prompt": "prompt_dataset", "eval": "eval_dataset"}
CASES = row_cases() + file_cases()
MISSING_PHRASE = {"local": "file not found", "gs": "not found"}
NO_MATCH_PHRASE = {"local": "no file matches this pattern", "gs": "no object matches this pattern"}


@pytest.fixture(scope="module")
def bucket(gcs_emulator):
    return gcs_emulator.create_bucket(f"reliability-{uuid.uuid4().hex[:12]}")


def store(location: str, content: bytes, name: str, tmp_path, bucket) -> str:
    """The URI of `content` saved as a local file or a gs:// object."""
    if location == "gs":
        bucket.blob(name).upload_from_string(content)
        return f"gs://{bucket.name}/{name}"
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def validate_stage(tmp_path, **datasets) -> list[str]:
    """What the pipeline's first stage stops with, run as its component runs it, as message lines.

    Datasets not given are "" (the pipeline's way of leaving them out), except that a prompt or eval
    dataset under test gets the bundled preference sample beside it.
    """
    given = {slot: datasets.get(slot, "") for slot in SLOT.values()}
    if not datasets.get("preference_dataset"):
        given["preference_dataset"] = sample_dataset("preference.jsonl")
    outputs = tmp_path / "outputs"
    with pytest.raises(SystemExit) as stopped:
        validate_datasets.python_func(
            **given, on_invalid="fail", eval_fraction=0.1, seed=0,
            train_pairs=Dataset(uri=str(outputs / "train_pairs")), held_out_pairs=Dataset(uri=str(outputs / "held")),
            prompts=Dataset(uri=str(outputs / "prompts")), eval_prompts=Dataset(uri=str(outputs / "eval_prompts")),
            summary=Artifact(uri=str(outputs / "summary")), metrics=Metrics(uri=str(outputs / "metrics")))
    assert not outputs.exists(), "the stage wrote outputs although it failed"
    return str(stopped.value.code).splitlines()


@pytest.mark.parametrize("location", ["local", "gs"])
@pytest.mark.parametrize("kind,name,content,line,phrase", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_first_stage_stops_on_every_bad_input_kind(tmp_path, bucket, location, kind, name, content, line, phrase):
    uri = store(location, content, f"{uuid.uuid4().hex[:8]}-{kind}-{name}.jsonl", tmp_path, bucket)
    lines = validate_stage(tmp_path, **{SLOT[kind]: uri})
    assert lines[0] == "dataset validation failed:"
    assert len(lines) == 2, lines
    assert lines[1].startswith(f"{uri}:{line}: ") and phrase in lines[1], lines[1]


@pytest.mark.parametrize("location", ["local", "gs"])
@pytest.mark.parametrize("kind", list(SLOT))
def test_first_stage_stops_on_missing_files_and_empty_patterns(tmp_path, bucket, location, kind):
    root = f"gs://{bucket.name}/absent-{uuid.uuid4().hex[:8]}" if location == "gs" else str(tmp_path / "absent")
    for uri, phrase in ((f"{root}/{kind}.jsonl", MISSING_PHRASE[location]),
                        (f"{root}/shards/*.jsonl", NO_MATCH_PHRASE[location])):
        assert validate_stage(tmp_path, **{SLOT[kind]: uri}) == ["dataset validation failed:", f"{uri}:0: {phrase}"]


def bad_file(kind: str, name: str) -> bytes:
    return next(content for k, n, content, _, _ in row_cases() if (k, n) == (kind, name))


# Each dataset once as a local file and once as a gs:// object, two bad datasets per run.
PIPELINE_RUNS = [
    (("preference", "not_json", "local"), ("prompt", "messages_last_not_user", "gs")),
    (("prompt", "wrong_type", "local"), ("eval", "pair_choice_two", "gs")),
    (("eval", "invalid_utf8", "local"), ("preference", "identical_candidates", "gs")),
]


@pytest.mark.parametrize("bad", PIPELINE_RUNS,
                         ids=["-".join(f"{kind}.{where}" for kind, _, where in run) for run in PIPELINE_RUNS])
def test_the_pipeline_stops_at_validation_before_any_model_loads(tmp_path, bucket, unloadable_model_dir, bad):
    problems, sets = {}, ["--set", f"large_model_reference={unloadable_model_dir}"]
    for kind, name, location in bad:
        uri = store(location, bad_file(kind, name), f"{uuid.uuid4().hex[:8]}-{kind}.jsonl", tmp_path, bucket)
        problems[kind] = [str(p) for p in read_dataset(uri, kind).problems]
        sets += ["--set", f"{SLOT[kind]}={uri}"]
    expected = [line for kind in SLOT for line in problems.get(kind, [])]
    assert len(expected) == 2
    output = tmp_path / "run"
    # The emulator's address reaches the stage's own process through the inherited environment.
    result = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", "--output-dir", str(output), *sets],
                            capture_output=True, text=True)
    log = output / "logs" / "validate-datasets.log"
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"rlhf run: failed: stage 'validate-datasets' failed; its log: {log}\n" in result.stderr
    reason = result.stderr.split("its log:", 1)[1].splitlines()[1:]
    assert [line.strip() for line in reason] == ["dataset validation failed:", *expected]
    assert "Traceback" not in result.stderr
    # Nothing after validation ran: no other stage's log or outputs. The model given cannot be loaded, so
    # any stage that loaded it would have failed with another message.
    assert sorted(p.name for p in (output / "logs").iterdir()) == ["pipeline.log", "validate-datasets.log"]
    stages = [p.name for run in (output / "pipeline_root").iterdir() for p in run.iterdir()]
    assert stages == ["validate-datasets"]


text = st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, allow_infinity=False) | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3), max_leaves=8)
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": text | json_values}), max_size=3)
# Rows near the schema: every key present or not, with the right type or not, so valid rows come out too.
near_rows = st.fixed_dictionaries({}, optional={
    "input_text": text | json_values, "messages": messages | json_values, "candidate_0": text | json_values,
    "candidate_1": text | json_values, "choice": st.sampled_from([0, 1, 2, True, "1", 1.0, None]),
    "score": json_values})
lines = st.one_of(
    near_rows.map(lambda row: json.dumps(row).encode()),
    st.tuples(near_rows, json_values).map(lambda pair: json.dumps(pair[0] or pair[1], ensure_ascii=False).encode()),
    st.binary(max_size=40).map(lambda raw: raw.replace(b"\n", b"")),
    st.sampled_from([b"", b"  \r", b"\xef\xbb\xbf{}", b"[" * 5000, b'{"input_text": NaN}']))
files = st.lists(lines, max_size=6).map(lambda found: b"\n".join(found))
kinds = st.sampled_from(["preference", "prompt", "eval"])
fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_problems_name_file_and_line(problems, files_and_lengths: dict[str, int]):
    for problem in problems:
        match = PROBLEM_LINE.match(str(problem))
        assert match, str(problem)
        assert match["file"] in files_and_lengths
        assert 0 <= int(match["line"]) <= files_and_lengths[match["file"]]


def nonblank_lines(content: bytes) -> int:
    return sum(1 for line in content.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.removesuffix(b"\r").strip())


@fuzz
@given(content=files, kind=kinds, on_invalid=st.sampled_from(["fail", "skip"]))
def test_the_dataset_reader_only_reports_problems(tmp_path, content, kind, on_invalid):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    dataset = read_dataset(str(path), kind, on_invalid)
    assert_problems_name_file_and_line(dataset.problems, {str(path): content.count(b"\n") + 1})
    rows = nonblank_lines(content)
    if rows == 0:
        assert [p.kind for p in dataset.problems] == ["empty_file"]
    elif on_invalid == "fail":
        assert len(dataset.rows) + len(dataset.problems) == rows
    else:
        assert len(dataset.rows) + sum(dataset.skipped.values()) == rows
        assert all(p.line == 0 for p in dataset.problems)


@fuzz
@given(preference=files, prompt=st.none() | files, eval_set=st.none() | files,
       on_invalid=st.sampled_from(["fail", "skip"]))
def test_the_first_stage_only_reports_problems(tmp_path, preference, prompt, eval_set, on_invalid):
    uris, lengths = {}, {}
    for name, content in (("preference", preference), ("prompt", prompt), ("eval", eval_set)):
        if content is not None:
            path = tmp_path / f"{name}.jsonl"
            path.write_bytes(content)
            uris[name], lengths[str(path)] = str(path), content.count(b"\n") + 1
    try:
        data = prepare_datasets(uris["preference"], uris.get("prompt"), uris.get("eval"),
                                DataConfig(on_invalid=on_invalid))
    except DatasetError as error:
        assert error.problems
        assert_problems_name_file_and_line(error.problems, lengths)
    else:
        assert data.train_pairs and data.held_out_pairs and data.prompts and data.eval_prompts
        json.dumps(data.summary)


@fuzz
@given(content=st.binary(max_size=200) | files)
def test_reading_a_stage_output_only_reports_problems(tmp_path, content):
    path = tmp_path / "output.jsonl"
    path.write_bytes(content)
    try:
        rows = read_jsonl(path)
    except DatasetError as error:
        assert error.problems
        assert_problems_name_file_and_line(error.problems, {str(path): content.count(b"\n") + 1})
    else:
        assert all(isinstance(row, dict) for row in rows)


@fuzz
@given(rows=st.lists(st.dictionaries(text, json_values, max_size=4), max_size=5))
def test_stage_outputs_read_back_as_written(tmp_path, rows):
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert read_jsonl(tmp_path / "rows.jsonl") == rows


def test_reading_a_missing_stage_output_names_it(tmp_path):
    with pytest.raises(DatasetError) as raised:
        read_jsonl(tmp_path / "absent.jsonl")
    assert str(raised.value) == f"{tmp_path / 'absent.jsonl'}:0: file not found"

