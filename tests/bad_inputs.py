"""Every kind of bad input the validator knows, as file contents, for each dataset kind.

Each case is (kind, content as bytes, the line the problem is on, a phrase the message must hold).
Line 0 means the file as a whole.
"""

from __future__ import annotations

import json

GOOD = {
    "preference": {"input_text": "A post. [summary]: ", "candidate_0": "short", "candidate_1": "longer one", "choice": 1},
    "prompt": {"input_text": "A post. [summary]: "},
    "eval": {"input_text": "Another post. [summary]: "},
}


def _line(row) -> bytes:
    return json.dumps(row).encode() if not isinstance(row, bytes) else row


def _file(dataset_kind: str, bad_row) -> bytes:
    """A good first row, then the bad row on line 2, then a good row."""
    good = _line(GOOD[dataset_kind])
    return b"\n".join([good, _line(bad_row), good]) + b"\n"


def _with(dataset_kind: str, **changes) -> dict:
    row = dict(GOOD[dataset_kind])
    for key, value in changes.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return row


_DROP = object()

ROW_CASES_ANY = {
    "not_json": (b'{"input_text": "unterminated', "not valid JSON"),
    "not_json_nan": (b'{"input_text": NaN}', "not valid JSON"),
    "not_object": (b'["input_text", "a list"]', "expected a JSON object"),
    "not_object_string": (b'"just a string"', "expected a JSON object"),
    "duplicate_key": (b'{"input_text": "a", "input_text": "b"}', "appears twice"),
    "invalid_utf8": (b'{"input_text": "caf\xe9"}', "invalid UTF-8"),
}


def prompt_row_cases(kind: str) -> dict:
    return {
        "missing_key": (_with(kind, input_text=_DROP), "missing key 'input_text'"),
        "extra_key": (_with(kind, score=0.5), "unexpected key 'score'"),
        "both_prompt_keys": (_with(kind, messages=[{"role": "user", "content": "hi"}]), "not both"),
        "wrong_type": (_with(kind, input_text=42), "'input_text' must be a string"),
        "empty_text": (_with(kind, input_text=""), "'input_text' is empty"),
        "whitespace_text": (_with(kind, input_text=" \n\t "), "'input_text' is empty"),
        "messages_not_list": (_with(kind, input_text=_DROP, messages="hi"), "'messages' must be an array"),
        "messages_empty": (_with(kind, input_text=_DROP, messages=[]), "'messages' is empty"),
        "messages_bad_role": (_with(kind, input_text=_DROP, messages=[{"role": "bot", "content": "x"}]),
                              "messages[0].role"),
        "messages_last_not_user": (_with(kind, input_text=_DROP, messages=[
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]), "last message"),
        "messages_empty_content": (_with(kind, input_text=_DROP, messages=[{"role": "user", "content": "  "}]),
                                   "content is empty"),
    }


PREFERENCE_CASES = {
    "missing_candidate": (_with("preference", candidate_1=_DROP), "missing key 'candidate_1'"),
    "missing_choice": (_with("preference", choice=_DROP), "missing key 'choice'"),
    "choice_two": (_with("preference", choice=2), "'choice' must be the integer 0 or 1"),
    "choice_bool": (_with("preference", choice=True), "'choice' must be the integer 0 or 1"),
    "choice_string": (_with("preference", choice="1"), "'choice' must be the integer 0 or 1"),
    "choice_float": (_with("preference", choice=1.0), "'choice' must be the integer 0 or 1"),
    "choice_null": (_with("preference", choice=None), "'choice' must be the integer 0 or 1"),
    "candidate_wrong_type": (_with("preference", candidate_0=["a"]), "'candidate_0' must be a string"),
    "candidate_empty": (_with("preference", candidate_0="   "), "'candidate_0' is empty"),
    "identical_candidates": (_with("preference", candidate_0="same", candidate_1="same "), "the same text"),
}


def row_cases() -> list[tuple[str, str, bytes, int, str]]:
    """(dataset kind, case name, file content, problem line, phrase) for every row-level problem."""
    cases = []
    for kind in ("preference", "prompt", "eval"):
        named = {**ROW_CASES_ANY, **prompt_row_cases(kind)}
        if kind == "preference":
            named.update(PREFERENCE_CASES)
        if kind == "eval":
            named.update({f"pair_{k}": v for k, v in PREFERENCE_CASES.items()})
        for name, (row, phrase) in named.items():
            cases.append((kind, name, _file(kind, row), 2, phrase))
    return cases


FILE_CASES = {
    "empty_file": (b"", "empty file"),
    "blank_lines_only": (b"\n  \n\n", "empty file"),
}


def file_cases() -> list[tuple[str, str, bytes, int, str]]:
    """(dataset kind, case name, file content, 0, phrase) for every problem with a whole file's content."""
    return [(kind, name, content, 0, phrase)
            for kind in ("preference", "prompt", "eval") for name, (content, phrase) in FILE_CASES.items()]
