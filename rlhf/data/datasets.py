"""From user URIs to the normalised datasets every later stage reads, with a summary a person can check.

`prepare_datasets` is what the pipeline's first step runs: it validates the preference, prompt and eval
datasets, splits held-out preference pairs off by prompt when the eval set holds no pairs of its own,
and writes JSONL files plus `summary.json` into one directory.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from rlhf.data.config import DataConfig
from rlhf.data.storage import StorageError, read_bytes
from rlhf.data.validation import (
    Dataset,
    Problem,
    chosen,
    is_preference_row,
    prompt_key,
    read_dataset,
    rejected,
)
from rlhf.errors import UserError

TRAIN_PAIRS = "train_preference.jsonl"
HELD_OUT_PAIRS = "eval_preference.jsonl"
PROMPTS = "prompts.jsonl"
EVAL_PROMPTS = "eval_prompts.jsonl"
SUMMARY = "summary.json"


class DatasetError(UserError):
    """Datasets with problems; `problems` holds one `FILE:LINE: ...` each."""

    def __init__(self, problems: list[Problem]):
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def sample_dataset(name: str) -> str:
    """Path of a bundled sample file: preference.jsonl, prompts.jsonl or eval.jsonl."""
    return str(resources.files("rlhf") / "sample_data" / name)


@dataclass
class PreparedData:
    train_pairs: list[dict]
    held_out_pairs: list[dict]
    prompts: list[dict]
    eval_prompts: list[dict]
    summary: dict


def prepare_datasets(
    preference_dataset: str,
    prompt_dataset: str | None = None,
    eval_dataset: str | None = None,
    data: DataConfig | None = None,
) -> PreparedData:
    """Validate all datasets; raise DatasetError listing every problem, or return the split data.

    - Held-out pairs (reward-model accuracy): the eval set's preference rows when it has any, else a
      seeded split of the preference data by prompt, so no prompt is on both sides.
    - Prompts for RL: the prompt dataset, else the training pairs' distinct prompts.
    - Eval prompts for bulk inference: the eval set's prompts, else the held-out pairs' prompts.
    """
    data = data or DataConfig()
    data.validate()
    on_invalid, eval_fraction, seed = data.on_invalid, data.eval_fraction, data.seed
    datasets = {"preference": read_dataset(preference_dataset, "preference", on_invalid)}
    if prompt_dataset:
        datasets["prompt"] = read_dataset(prompt_dataset, "prompt", on_invalid)
    if eval_dataset:
        datasets["eval"] = read_dataset(eval_dataset, "eval", on_invalid)
    problems = [p for d in datasets.values() for p in d.problems]
    if problems:
        raise DatasetError(problems)

    preference = datasets["preference"]
    eval_rows = datasets["eval"].rows if "eval" in datasets else []
    eval_pairs = [r for r in eval_rows if is_preference_row(r)]
    if eval_pairs:
        train_pairs, held_out_pairs = preference.rows, eval_pairs
    else:
        train_pairs, held_out_pairs = split_by_prompt(preference.rows, eval_fraction, seed, preference.uri)
    prompts = datasets["prompt"].rows if "prompt" in datasets else distinct_prompts(train_pairs)
    eval_prompts = distinct_prompts(eval_rows) if eval_rows else distinct_prompts(held_out_pairs)

    summary = {
        "preference": {**summarise_pairs(preference), "train_pairs": len(train_pairs),
                       "held_out_pairs": len(held_out_pairs),
                       "held_out_from": "eval_dataset" if eval_pairs else f"split by prompt (seed {seed})"},
        "prompt": summarise_prompts(datasets["prompt"]) if "prompt" in datasets else
        {"rows": len(prompts), "from": "the training pairs' prompts"},
        "eval": summarise_prompts(datasets["eval"]) if "eval" in datasets else
        {"rows": len(eval_prompts), "from": "the held-out pairs' prompts"},
    }
    train_keys = {prompt_key(r) for r in train_pairs}
    summary["eval"]["prompts_also_in_training_pairs"] = sum(prompt_key(r) in train_keys for r in eval_prompts)
    return PreparedData(train_pairs, held_out_pairs, prompts, eval_prompts, summary)


def write_prepared(data: PreparedData, output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in ((TRAIN_PAIRS, data.train_pairs), (HELD_OUT_PAIRS, data.held_out_pairs),
                       (PROMPTS, data.prompts), (EVAL_PROMPTS, data.eval_prompts)):
        write_jsonl(output_dir / name, rows)
    (output_dir / SUMMARY).write_text(json.dumps(data.summary, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file of objects that this package wrote: a stage's output, `rlhf infer` predictions.

    Such a file may still come from elsewhere (a copy, a user's predictions): a missing file or a line that
    is not a JSON object raises DatasetError with one `FILE:LINE: ...` per problem.
    """
    file = str(path)
    try:
        data = read_bytes(file)
    except StorageError as error:
        raise DatasetError([Problem(file, 0, "unreadable", error.reason)]) from None
    rows, problems = [], []
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(Problem(file, number, "not_json", f"not valid JSON: {error.msg} (column {error.colno})"))
        except UnicodeDecodeError:
            problems.append(Problem(file, number, "invalid_utf8", "not valid JSON: invalid UTF-8"))
        except RecursionError:
            problems.append(Problem(file, number, "not_json", "not valid JSON here: nested too deeply"))
        else:
            if isinstance(row, dict):
                rows.append(row)
            else:
                problems.append(Problem(file, number, "not_object", "expected a JSON object {...}"))
    if problems:
        raise DatasetError(problems)
    return rows


def distinct_prompts(rows: list[dict]) -> list[dict]:
    """One prompt row per distinct prompt, in first-seen order, with the source of its first row."""
    seen, prompts = set(), []
    for row in rows:
        key = prompt_key(row)
        if key not in seen:
            seen.add(key)
            field = "input_text" if "input_text" in row else "messages"
            prompts.append({field: row[field], "source": row["source"]})
    return prompts


def split_by_prompt(rows: list[dict], eval_fraction: float, seed: int, uri: str) -> tuple[list[dict], list[dict]]:
    """Seeded split of pairs into (train, held-out) such that no prompt lands on both sides."""
    keys = list(dict.fromkeys(prompt_key(r) for r in rows))
    if len(keys) < 2:
        raise DatasetError([Problem(uri, 0, "too_few_prompts",
                                    "needs at least 2 distinct prompts to hold some out for evaluation "
                                    "(or give an eval dataset with preference rows)")])
    random.Random(seed).shuffle(keys)
    held_out_count = min(len(keys) - 1, max(1, math.ceil(eval_fraction * len(keys))))
    held_out = set(keys[:held_out_count])
    train = [r for r in rows if prompt_key(r) not in held_out]
    return train, [r for r in rows if prompt_key(r) in held_out]


def percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"min": ordered[0], "p5": at(0.05), "p50": at(0.5), "p95": at(0.95), "max": ordered[-1]}


def _words(text: str) -> int:
    return len(text.split())


def _prompt_text(row: dict) -> str:
    return row["input_text"] if "input_text" in row else "\n".join(m["content"] for m in row["messages"])


def summarise_pairs(dataset: Dataset) -> dict:
    rows = dataset.rows
    choices = Counter(r["choice"] for r in rows)
    decided_by_length = [r for r in rows if len(chosen(r)) != len(rejected(r))]
    longer_wins = sum(len(chosen(r)) > len(rejected(r)) for r in decided_by_length)
    outcomes = defaultdict(set)
    duplicates = 0
    seen = set()
    for row in rows:
        candidates = frozenset((row["candidate_0"].strip(), row["candidate_1"].strip()))
        identity = (prompt_key(row), candidates, chosen(row).strip())
        duplicates += identity in seen
        seen.add(identity)
        outcomes[(prompt_key(row), candidates)].add(chosen(row).strip())
    return {
        "uri": dataset.uri,
        "files": len(dataset.files),
        "rows": len(rows),
        "distinct_prompts": len({prompt_key(r) for r in rows}),
        "choice_balance": {"0": choices[0], "1": choices[1],
                           "share_0": round(choices[0] / len(rows), 4) if rows else None},
        "prompt_words": percentiles([_words(_prompt_text(r)) for r in rows]),
        "chosen_words": percentiles([_words(chosen(r)) for r in rows]),
        "rejected_words": percentiles([_words(rejected(r)) for r in rows]),
        "longer_candidate_wins_share": round(longer_wins / len(decided_by_length), 4) if decided_by_length else None,
        "duplicate_pairs": duplicates,
        "contradictory_pairs": sum(len(winners) > 1 for winners in outcomes.values()),
        "skipped_rows": dict(dataset.skipped),
    }


def summarise_prompts(dataset: Dataset) -> dict:
    rows = dataset.rows
    keys = [prompt_key(r) for r in rows]
    return {
        "uri": dataset.uri,
        "files": len(dataset.files),
        "rows": len(rows),
        "distinct_prompts": len(set(keys)),
        "duplicate_prompts": len(keys) - len(set(keys)),
        "prompt_words": percentiles([_words(_prompt_text(r)) for r in rows]),
        "skipped_rows": dict(dataset.skipped),
    }
