"""Human labels of candidate pairs: an append-only JSONL store, where to resume, agreement between
annotators, and the export as a preference dataset.

One line per decision, written with a single `write` and fsync'ed before the page moves on, so killing the
server or closing the browser loses nothing:

    {"pair_id": "3f2a...", "annotator": "ana", "choice": 1, "left": 1, "time": "2025-01-31T10:00:00+00:00"}
    {"pair_id": "9c01...", "annotator": "ana", "skipped": true, "left": 0, "time": "..."}

`choice` counts in the pairs file's order (candidate_0 / candidate_1), already mapped back from the
screen; `left` says which stored candidate was on the left, to measure position bias. Nothing is ever
rewritten: when one annotator decided a pair more than once, the last line counts.

Export: for each pair, the annotators' last choices (skips aside) are put to a vote. The majority wins;
pairs with a tie, and pairs nobody chose on, are left out and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import combinations
from pathlib import Path

from rlhf.data.pairs import prompt_fields
from rlhf.data.validation import Problem
from rlhf.errors import UserError


class LabelsError(UserError):
    """A labels file with problems; `problems` holds one `FILE:LINE: ...` each."""

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Label:
    pair_id: str
    annotator: str
    choice: int | None  # 0 or 1 in the pairs file's order; None: skipped
    left: int  # the stored candidate that was shown on the left
    time: str  # ISO 8601, UTC

    def to_json(self) -> dict:
        decision = {"skipped": True} if self.choice is None else {"choice": self.choice}
        return {"pair_id": self.pair_id, "annotator": self.annotator, **decision, "left": self.left,
                "time": self.time}


def screen_order(pair_id: str, annotator: str) -> tuple[int, int]:
    """The stored candidates as (left, right) on this annotator's screen: a coin flip per pair that is
    the same on every reload and restart, so people cannot learn that one side tends to be better."""
    flip = hashlib.sha256(f"{pair_id}\0{annotator}".encode()).digest()[0] & 1
    return (1, 0) if flip else (0, 1)


def _parse_label(text: str) -> Label:
    row = json.loads(text)
    if not isinstance(row, dict):
        raise ValueError("expected a JSON object")
    for key in ("pair_id", "annotator", "time"):
        if not isinstance(row.get(key), str) or not row[key]:
            raise ValueError(f"'{key}' must be a non-empty string")
    if row.get("left") not in (0, 1) or type(row["left"]) is not int:
        raise ValueError("'left' must be 0 or 1")
    if row.get("skipped") is True and "choice" not in row:
        choice = None
    elif type(row.get("choice")) is int and row["choice"] in (0, 1) and "skipped" not in row:
        choice = row["choice"]
    else:
        raise ValueError("expected 'choice' 0 or 1, or 'skipped': true")
    return Label(row["pair_id"], row["annotator"], choice, row["left"], row["time"])


def read_labels(path: Path) -> list[Label]:
    """Every label in the file, in order (none when the file does not exist yet); raises LabelsError."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise LabelsError([Problem(str(path), 0, "unreadable", error.strerror or str(error))]) from None
    labels, problems = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            labels.append(_parse_label(raw.decode("utf-8")))
        except (ValueError, UnicodeDecodeError) as error:
            # A line cut short by a power loss lands here too: the message says which line to delete.
            problems.append(Problem(str(path), number, "bad_label", f"not a label line: {error}"))
    if problems:
        raise LabelsError(problems)
    return labels


class LabelStore:
    """The labels file of one labelling session: what it held when opened, plus every label recorded since."""

    def __init__(self, path: Path):
        self.path = path
        self.labels = read_labels(path)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # A hand-edited file may lack its final newline; the next label must start on a line of its own.
        if path.stat().st_size and not _ends_with_newline(path):
            os.write(self._fd, b"\n")

    def record(self, pair_id: str, annotator: str, choice: int | None, left: int) -> Label:
        label = Label(pair_id, annotator, choice, left, datetime.now(UTC).isoformat(timespec="seconds"))
        line = (json.dumps(label.to_json(), ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            # One write of the whole line on an O_APPEND descriptor: lines of two servers sharing the file
            # do not interleave, and a killed process leaves whole lines behind.
            os.write(self._fd, line)
            os.fsync(self._fd)
            self.labels.append(label)
        return label

    def close(self) -> None:
        os.close(self._fd)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def last_decisions(labels: list[Label]) -> dict[tuple[str, str], Label]:
    """(pair_id, annotator) -> that annotator's last label of the pair."""
    return {(label.pair_id, label.annotator): label for label in labels}


def next_pair(pairs: list[dict], labels: list[Label], annotator: str) -> int | None:
    """Index of the first pair this annotator has neither chosen on nor skipped; None when all are done."""
    decided = {pair_id for pair_id, who in last_decisions(labels) if who == annotator}
    return next((i for i, pair in enumerate(pairs) if pair["pair_id"] not in decided), None)


def annotator_progress(pairs: list[dict], labels: list[Label]) -> dict[str, dict]:
    """Per annotator: pairs chosen on, skipped, and still to do."""
    known = {pair["pair_id"] for pair in pairs}
    counts: dict[str, Counter] = defaultdict(Counter)
    for (pair_id, annotator), label in last_decisions(labels).items():
        if pair_id in known:
            counts[annotator]["skipped" if label.choice is None else "chosen"] += 1
    return {annotator: {"chosen": c["chosen"], "skipped": c["skipped"],
                        "remaining": len(known) - c["chosen"] - c["skipped"]}
            for annotator, c in sorted(counts.items())}


def cohen_kappa(first: list[int], second: list[int]) -> float | None:
    """Cohen's kappa of two annotators' 0/1 choices on the same pairs; None when chance agreement is 1
    (both always gave the same single answer, so agreement says nothing)."""
    if len(first) != len(second) or not first:
        raise ValueError("cohen_kappa needs two equally long, non-empty lists of choices")
    count = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / count
    share_first, share_second = sum(first) / count, sum(second) / count
    expected = share_first * share_second + (1 - share_first) * (1 - share_second)
    if expected == 1:
        return None
    return (observed - expected) / (1 - expected)


def _choices_by_pair(pairs: list[dict], labels: list[Label]) -> dict[str, dict[str, int]]:
    """pair_id -> {annotator: choice} for the pairs of the file, skips left out."""
    known = {pair["pair_id"] for pair in pairs}
    by_pair: dict[str, dict[str, int]] = defaultdict(dict)
    for (pair_id, annotator), label in last_decisions(labels).items():
        if pair_id in known and label.choice is not None:
            by_pair[pair_id][annotator] = label.choice
    return by_pair


def agreement(pairs: list[dict], labels: list[Label]) -> dict:
    """How often annotators agree: over pairs chosen on by two or more of them, the share where all agree,
    and for every two annotators, their raw agreement and Cohen's kappa on the pairs they share."""
    by_pair = _choices_by_pair(pairs, labels)
    shared = [choices for choices in by_pair.values() if len(choices) >= 2]
    annotators = sorted({a for choices in by_pair.values() for a in choices})
    pairwise = []
    for first, second in combinations(annotators, 2):
        both = [(c[first], c[second]) for c in by_pair.values() if first in c and second in c]
        if both:
            kappa = cohen_kappa([a for a, _ in both], [b for _, b in both])
            pairwise.append({"annotators": [first, second], "shared_pairs": len(both),
                             "agreement": round(sum(a == b for a, b in both) / len(both), 4),
                             "cohen_kappa": None if kappa is None else round(kappa, 4)})
    return {
        "pairs_with_several_annotators": len(shared),
        "all_agree_share": round(sum(len(set(c.values())) == 1 for c in shared) / len(shared), 4) if shared else None,
        "pairwise": pairwise,
    }


def position_bias(labels: list[Label]) -> dict:
    """How often the candidate shown on the left was chosen: near 0.5 unless people favour a side."""
    chosen = [label for label in last_decisions(labels).values() if label.choice is not None]
    left = sum(label.choice == label.left for label in chosen)
    return {"choices": len(chosen), "left_chosen_share": round(left / len(chosen), 4) if chosen else None}


def export_preferences(pairs: list[dict], labels: list[Label]) -> tuple[list[dict], dict]:
    """Preference rows {input_text|messages, candidate_0, candidate_1, choice} in the pairs' order, and
    counts of how each pair was resolved."""
    by_pair = _choices_by_pair(pairs, labels)
    rows, counts = [], Counter()
    for pair in pairs:
        votes = Counter(by_pair.get(pair["pair_id"], {}).values())
        if not votes:
            counts["not_chosen_on"] += 1
            continue
        if votes[0] == votes[1]:
            counts["ties_left_out"] += 1
            continue
        choice = 0 if votes[0] > votes[1] else 1
        counts["unanimous" if len(votes) == 1 else "by_majority"] += 1
        rows.append({**prompt_fields(pair), "candidate_0": pair["candidate_0"], "candidate_1": pair["candidate_1"],
                     "choice": choice})
    return rows, {"rows": len(rows), **{key: counts[key] for key in
                                        ("unanimous", "by_majority", "ties_left_out", "not_chosen_on")}}


def summary(pairs: list[dict], labels: list[Label]) -> dict:
    """Everything `rlhf label --stats` reports."""
    known = {pair["pair_id"] for pair in pairs}
    return {
        "pairs": len(pairs),
        "annotators": annotator_progress(pairs, labels),
        "agreement": agreement(pairs, labels),
        "position": position_bias([label for label in labels if label.pair_id in known]),
        "labels_of_unknown_pairs": sum(label.pair_id not in known for label in labels),
    }
