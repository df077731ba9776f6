import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.data.validation import read_dataset
from tests.bad_inputs import FILE_CASES, GOOD, row_cases

PROBLEM_LINE = re.compile(r"^(?P<file>.+):(?P<line>\d+): (?P<message>.+)$")


def write(tmp_path, content: bytes, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("kind,name,content,line,phrase", row_cases(), ids=[f"{c[0]}-{c[1]}" for c in row_cases()])
def test_each_bad_row_gives_one_file_line_message(tmp_path, kind, name, content, line, phrase):
    path = write(tmp_path, content)
    dataset = read_dataset(path, kind)
    assert len(dataset.problems) == 1, [str(p) for p in dataset.problems]
    match = PROBLEM_LINE.match(str(dataset.problems[0]))
    assert match, str(dataset.problems[0])
    assert match["file"] == path
    assert int(match["line"]) == line
    assert phrase in match["message"]
    assert len(dataset.rows) == 2


@pytest.mark.parametrize("kind,name,content,line,phrase", row_cases(), ids=[f"{c[0]}-{c[1]}" for c in row_cases()])
def test_skip_policy_drops_bad_rows_and_counts_them(tmp_path, kind, name, content, line, phrase):
    dataset = read_dataset(write(tmp_path, content), kind, on_invalid="skip")
    assert dataset.ok
    assert len(dataset.rows) == 2
    assert sum(dataset.skipped.values()) == 1


@pytest.mark.parametrize("kind", ["preference", "prompt", "eval"])
@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_empty_files_are_reported(tmp_path, kind, case):
    content, phrase = FILE_CASES[case]
    path = write(tmp_path, content)
    for policy in ("fail", "skip"):
        dataset = read_dataset(path, kind, on_invalid=policy)
        assert [str(p) for p in dataset.problems] == [f"{path}:0: empty file: no JSON rows"]


@pytest.mark.parametrize("kind", ["preference", "prompt", "eval"])
def test_missing_file_glob_without_match_and_unreadable_file(tmp_path, kind):
    missing = str(tmp_path / "nope.jsonl")
    assert [str(p) for p in read_dataset(missing, kind).problems] == [f"{missing}:0: file not found"]
    pattern = str(tmp_path / "shards" / "*.jsonl")
    assert [str(p) for p in read_dataset(pattern, kind).problems] == [f"{pattern}:0: no file matches this pattern"]
    (tmp_path / "a_directory.jsonl").mkdir()
    directory = str(tmp_path / "a_directory.jsonl")
    assert "directory holds no *.jsonl" in str(read_dataset(directory, kind).problems[0])


def test_unreadable_file(tmp_path):
    a_file = write(tmp_path, json.dumps(GOOD["prompt"]).encode())
    beneath_a_file = f"{a_file}/shard.jsonl"
    problems = read_dataset(beneath_a_file, "prompt").problems
    assert [str(p) for p in problems] == [f"{beneath_a_file}:0: cannot read: Not a directory"]


def test_every_problem_in_a_file_is_listed_with_its_line(tmp_path):
    good = json.dumps(GOOD["preference"]).encode()
    content = b"\n".join([good, b"{oops", good, b"[]", b"", good, b'{"input_text": "x"}']) + b"\n"
    dataset = read_dataset(write(tmp_path, content), "preference")
    assert [(p.line, p.kind) for p in dataset.problems] == [(2, "not_json"), (4, "not_object"), (7, "missing_key")]
    assert [r["source"].rsplit(":", 1)[1] for r in dataset.rows] == ["1", "3", "6"]


def test_skip_counts_each_kind(tmp_path):
    good = json.dumps(GOOD["preference"]).encode()
    bad_choice = json.dumps({**GOOD["preference"], "choice": 3}).encode()
    content = b"\n".join([good, b"{oops", bad_choice, bad_choice, b"\xff\xfe"]) + b"\n"
    dataset = read_dataset(write(tmp_path, content), "preference", on_invalid="skip")
    assert dataset.ok and len(dataset.rows) == 1
    assert dict(dataset.skipped) == {"not_json": 1, "bad_choice": 2, "invalid_utf8": 1}


def test_skip_with_no_valid_row_left_fails(tmp_path):
    dataset = read_dataset(write(tmp_path, b"{oops\n"), "prompt", on_invalid="skip")
    assert [p.kind for p in dataset.problems] == ["empty_file"]


def test_valid_rows_are_kept_as_given_with_their_source(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
            "candidate_0": "Hi!", "candidate_1": "Greetings, friend.", "choice": 0}
    content = "\ufeff".encode() + b"\r\n".join([json.dumps(GOOD["preference"]).encode(),
                                              json.dumps(chat, ensure_ascii=False).encode()])
    path = write(tmp_path, content)
    dataset = read_dataset(path, "preference")
    assert dataset.ok
    assert dataset.rows == [{**GOOD["preference"], "source": f"{path}:1"}, {**chat, "source": f"{path}:2"}]


def test_rows_written_by_validation_read_again_keep_their_first_source(tmp_path):
    """The splits the validate stage writes (rows with their `source`) can be given to any stage by hand."""
    original = write(tmp_path, json.dumps(GOOD["preference"]).encode())
    rows = read_dataset(original, "preference").rows
    split = tmp_path / "train_pairs"
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = read_dataset(str(split), "preference")
    assert again.ok and again.rows == rows and rows[0]["source"] == f"{original}:1"


def test_glob_and_directory_read_every_shard_in_order(tmp_path):
    shards = tmp_path / "train"
    shards.mkdir()
    for index in range(3):
        (shards / f"part-{index}.jsonl").write_text(json.dumps({"input_text": f"post {index}"}) + "\n")
    (shards / "notes.txt").write_text("not data")
    for uri in (str(shards / "*.jsonl"), str(shards)):
        dataset = read_dataset(uri, "prompt")
        assert dataset.ok and [r["input_text"] for r in dataset.rows] == ["post 0", "post 1", "post 2"]
    assert len(read_dataset(str(tmp_path / "**" / "*.jsonl"), "prompt").rows) == 3


def test_eval_rows_may_be_prompts_or_pairs(tmp_path):
    content = b"\n".join(json.dumps(r).encode() for r in (GOOD["eval"], GOOD["preference"]))
    dataset = read_dataset(write(tmp_path, content), "eval")
    assert dataset.ok and len(dataset.rows) == 2


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["input_text", "messages", "candidate_0", "candidate_1", "choice", "role", "content", "x"])
        | st.text(max_size=5), children, max_size=5),
    max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=400), kind=st.sampled_from(["preference", "prompt", "eval"]))
def test_random_bytes_never_raise(tmp_path, content, kind):
    path = write(tmp_path, content)
    dataset = read_dataset(path, kind)
    for problem in dataset.problems:
        assert PROBLEM_LINE.match(str(problem)) and problem.file == path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(json_values, min_size=1, max_size=5), kind=st.sampled_from(["preference", "prompt", "eval"]))
def test_random_json_never_raises(tmp_path, rows, kind):
    path = write(tmp_path, "\n".join(json.dumps(r) for r in rows).encode())
    dataset = read_dataset(path, kind)
    assert len(dataset.rows) + len(dataset.problems) == len(rows)
    for problem in dataset.problems:
        assert PROBLEM_LINE.match(str(problem)), str(problem)
