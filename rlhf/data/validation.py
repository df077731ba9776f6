"""Read JSONL datasets row by row and say exactly what is wrong with each bad row.

Three kinds of dataset share one reader:
- preference: `input_text` (or chat `messages`), `candidate_0`, `candidate_1`, `choice` (0 or 1);
- prompt: `input_text` (or `messages`);
- eval: prompt rows, or preference rows when the eval set also holds human choices.

Every problem becomes one `FILE:LINE: what is wrong`. Line 0 stands for the file as a whole (missing,
unreadable, empty, or a pattern that matched nothing). With `on_invalid="skip"` bad rows are dropped and
counted by kind; problems with a whole file are never skipped.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from rlhf.data.storage import StorageError, expand, read_bytes

DatasetKind = Literal["preference", "prompt", "eval"]
OnInvalid = Literal["fail", "skip"]

PROMPT_KEYS = ("input_text", "messages")
CANDIDATE_KEYS = ("candidate_0", "candidate_1", "choice")
# Where a row was first read ("FILE:LINE"): validation adds it, so the splits it writes carry it, and a split
# read again keeps it.
SOURCE_KEY = "source"
ROLES = ("system", "user", "assistant")

@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class Dataset:
    """Valid rows as given (plus `source`, "FILE:LINE"), and what was wrong with the rest."""

    kind: DatasetKind
    uri: str
    files: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems


class RowError(Exception):
    """What is wrong with one row, and its kind (the key `on_invalid=skip` counts under)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def read_dataset(uri: str, kind: DatasetKind, on_invalid: OnInvalid = "fail") -> Dataset:
    """Every row of every file the URI names, validated as `kind`."""
    if kind not in ("preference", "prompt", "eval"):
        raise ValueError(f"unknown dataset kind {kind!r}")
    if on_invalid not in ("fail", "skip"):
        raise ValueError(f"on_invalid must be 'fail' or 'skip', not {on_invalid!r}")
    dataset = Dataset(kind=kind, uri=uri)
    try:
        dataset.files = expand(uri)
    except StorageError as error:
        dataset.problems.append(Problem(uri, 0, "no_match", error.reason))
        return dataset
    for file in dataset.files:
        _read_file(file, dataset, on_invalid)
    if on_invalid == "skip" and not dataset.rows and not dataset.problems:
        dataset.problems.append(Problem(uri, 0, "empty_file", "no valid row left after skipping invalid rows"))
    return dataset


def _read_file(file: str, dataset: Dataset, on_invalid: OnInvalid) -> None:
    try:
        data = read_bytes(file)
    except StorageError as error:
        dataset.problems.append(Problem(file, 0, "unreadable", error.reason))
        return
    data = data.removeprefix(b"\xef\xbb\xbf")
    rows_in_file = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        rows_in_file += 1
        try:
            row = _parse_row(raw, dataset.kind)
        except RowError as error:
            if on_invalid == "skip":
                dataset.skipped[error.kind] += 1
            else:
                dataset.problems.append(Problem(file, number, error.kind, error.message))
            continue
        row.setdefault(SOURCE_KEY, f"{file}:{number}")
        dataset.rows.append(row)
    if rows_in_file == 0:
        dataset.problems.append(Problem(file, 0, "empty_file", "empty file: no JSON rows"))


def _parse_row(raw: bytes, kind: DatasetKind) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RowError("invalid_utf8", f"invalid UTF-8 (byte {error.start + 1} of the line)") from None
    row = parse_json(text)
    if kind == "preference" or (kind == "eval" and any(k in row for k in CANDIDATE_KEYS)):
        _check_keys(row, required=CANDIDATE_KEYS)
        check_prompt(row)
        _check_candidates(row)
    else:
        _check_keys(row, required=())
        check_prompt(row)
    return dict(row)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in JSON")


def _unique_keys(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise RowError("duplicate_key", f"key {key!r} appears twice in one object")
        seen[key] = value
    return seen


def parse_json(text: str) -> dict:
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise RowError("not_json", f"not valid JSON: {error.msg} (column {error.colno})") from None
    except ValueError as error:
        raise RowError("not_json", f"not valid JSON: {error}") from None
    except RecursionError:
        raise RowError("not_json", "not valid JSON here: nested too deeply") from None
    if not isinstance(value, dict):
        raise RowError("not_object", f"expected a JSON object {{...}}, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({json.dumps(value)})"
    if isinstance(value, str):
        return f"a string ({_preview(value)})"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _preview(text: str, limit: int = 40) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return json.dumps(shown, ensure_ascii=False)


def _check_keys(row: dict, required: tuple[str, ...]) -> None:
    allowed = {*PROMPT_KEYS, *required, SOURCE_KEY}
    extra = [k for k in row if k not in allowed]
    if extra:
        expected = ", ".join(["input_text (or messages)", *required])
        raise RowError("extra_key", f"unexpected key {_keys(extra)}; a row holds {expected}")
    prompt_keys = [k for k in PROMPT_KEYS if k in row]
    if not prompt_keys:
        raise RowError("missing_key", "missing key 'input_text' (or chat 'messages')")
    if len(prompt_keys) == 2:
        raise RowError("extra_key", "give either 'input_text' or 'messages', not both")
    missing = [k for k in required if k not in row]
    if missing:
        raise RowError("missing_key", f"missing key {_keys(missing)}")


def _keys(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def check_text(row: dict, key: str) -> None:
    value = row[key]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"'{key}' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise RowError("empty_text", f"'{key}' is empty or only whitespace")


def check_prompt(row: dict) -> None:
    if "input_text" in row:
        check_text(row, "input_text")
        return
    messages = row["messages"]
    if not isinstance(messages, list):
        raise RowError("wrong_type", f"'messages' must be an array of {{role, content}}, got {_json_type(messages)}")
    if not messages:
        raise RowError("bad_messages", "'messages' is empty")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RowError("bad_messages", f"{where} must be an object {{role, content}}, got {_json_type(message)}")
        if set(message) != {"role", "content"}:
            raise RowError("bad_messages", f"{where} must have exactly the keys 'role' and 'content'")
        if message["role"] not in ROLES:
            raise RowError("bad_messages", f"{where}.role must be one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise RowError("wrong_type", f"{where}.content must be a string, got {_json_type(message['content'])}")
        if not message["content"].strip():
            raise RowError("empty_text", f"{where}.content is empty or only whitespace")
    if messages[-1]["role"] != "user":
        raise RowError("bad_messages", "the last message must be the user's: the completion answers it")


def _check_candidates(row: dict) -> None:
    check_text(row, "candidate_0")
    check_text(row, "candidate_1")
    choice = row["choice"]
    if type(choice) is not int or choice not in (0, 1):
        raise RowError("bad_choice", f"'choice' must be the integer 0 or 1, got {_json_type(choice)}")
    if row["candidate_0"].strip() == row["candidate_1"].strip():
        raise RowError("identical_candidates", "candidate_0 and candidate_1 are the same text")


def chosen(row: dict) -> str:
    return row[f"candidate_{row['choice']}"]


def rejected(row: dict) -> str:
    return row[f"candidate_{1 - row['choice']}"]


def longer_wins(row: dict) -> float:
    """1 when the chosen candidate is the longer one (in characters), 0 when shorter, 0.5 on equal length."""
    difference = len(chosen(row)) - len(rejected(row))
    return 0.5 if difference == 0 else float(difference > 0)


def user_input(row: dict) -> str:
    """The text a prompt row asks about: `input_text`, or the last (user) message of a chat."""
    return row["input_text"] if "input_text" in row else row["messages"][-1]["content"]


def prompt_key(row: dict) -> str:
    """A string that is equal for two rows exactly when they hold the same prompt."""
    if "input_text" in row:
        return row["input_text"]
    return json.dumps(row["messages"], ensure_ascii=False, sort_keys=True)


def is_preference_row(row: dict) -> bool:
    return "choice" in row
