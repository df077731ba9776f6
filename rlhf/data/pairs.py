"""The pairs file: prompts with two candidates and no choice yet, what `rlhf generate-candidates` writes
and `rlhf label` shows to people.

A row holds `input_text` (or chat `messages`), `candidate_0` and `candidate_1`, and may hold:
- `pair_id`: what labels refer to; when absent, a hash of the prompt and both candidates, so labels stay
  attached to the same texts even if rows are reordered or the file is rebuilt;
- `source`: where the prompt came from (`FILE:LINE`);
- `generation`: the settings that produced the candidates (free-form, shown nowhere, kept for the record).

Rows are checked as strictly as preference rows (see rlhf.data.validation), with one `FILE:LINE: problem` each.
"""

from __future__ import annotations

import hashlib
import json

from rlhf.data.storage import StorageError, expand, read_bytes
from rlhf.data.validation import PROMPT_KEYS, Problem, RowError, check_prompt, check_text, parse_json, prompt_key
from rlhf.errors import UserError

CANDIDATES = ("candidate_0", "candidate_1")
METADATA_KEYS = ("pair_id", "source", "generation")


class PairsError(UserError):
    """A pairs file with problems; `problems` holds one `FILE:LINE: ...` each."""

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def pair_id(row: dict) -> str:
    """The row's own `pair_id`, else 12 hex digits of a hash of its prompt and candidates."""
    if "pair_id" in row:
        return row["pair_id"]
    content = json.dumps([prompt_key(row), row["candidate_0"], row["candidate_1"]], ensure_ascii=False)
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:12]


def read_pairs(uri: str) -> list[dict]:
    """Every pair of every file the URI names, each with its `pair_id` set; raises PairsError listing
    every problem (a pair that cannot be shown is never skipped silently)."""
    try:
        files = expand(uri)
    except StorageError as error:
        raise PairsError([Problem(uri, 0, "no_match", error.reason)]) from None
    pairs, problems, seen = [], [], {}
    for file in files:
        try:
            data = read_bytes(file).removeprefix(b"\xef\xbb\xbf")
        except StorageError as error:
            problems.append(Problem(file, 0, "unreadable", error.reason))
            continue
        rows_in_file = 0
        for number, raw in enumerate(data.split(b"\n"), start=1):
            if not raw.strip():
                continue
            rows_in_file += 1
            try:
                row = _parse_pair(raw.removesuffix(b"\r"))
                identity = pair_id(row)
                if identity in seen:
                    raise RowError("duplicate_pair", f"pair_id {identity!r} is already used at {seen[identity]}")
            except RowError as error:
                problems.append(Problem(file, number, error.kind, error.message))
                continue
            seen[identity] = f"{file}:{number}"
            pairs.append({**row, "pair_id": identity})
        if rows_in_file == 0:
            problems.append(Problem(file, 0, "empty_file", "empty file: no JSON rows"))
    if problems:
        raise PairsError(problems)
    return pairs


def _parse_pair(raw: bytes) -> dict:
    try:
        row = parse_json(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RowError("invalid_utf8", f"invalid UTF-8 (byte {error.start + 1} of the line)") from None
    extra = [k for k in row if k not in (*PROMPT_KEYS, *CANDIDATES, *METADATA_KEYS)]
    if extra:
        raise RowError("extra_key", f"unexpected key {', '.join(map(repr, extra))}; a pair row holds input_text "
                                     "(or messages), candidate_0, candidate_1, and optionally pair_id, source, "
                                     "generation")
    present = [k for k in PROMPT_KEYS if k in row]
    if len(present) != 1:
        raise RowError("missing_key" if not present else "extra_key",
                        "give either 'input_text' or 'messages'" + (", not both" if present else ""))
    missing = [k for k in CANDIDATES if k not in row]
    if missing:
        raise RowError("missing_key", f"missing key {', '.join(map(repr, missing))}")
    check_prompt(row)
    for key in CANDIDATES:
        check_text(row, key)
    if row["candidate_0"].strip() == row["candidate_1"].strip():
        raise RowError("identical_candidates", "candidate_0 and candidate_1 are the same text: there is nothing "
                                                "to choose between")
    if "pair_id" in row and (not isinstance(row["pair_id"], str) or not row["pair_id"].strip()):
        raise RowError("wrong_type", "'pair_id' must be a non-empty string")
    return row


def prompt_fields(row: dict) -> dict:
    """The prompt part of a row: `{"input_text": ...}` or `{"messages": [...]}`."""
    return {key: row[key] for key in PROMPT_KEYS if key in row}
