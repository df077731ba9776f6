import json
from pathlib import Path

import pytest

from rlhf.data.config import DataConfig
from rlhf.data.datasets import (
    EVAL_PROMPTS,
    HELD_OUT_PAIRS,
    PROMPTS,
    SUMMARY,
    TRAIN_PAIRS,
    DatasetError,
    prepare_datasets,
    read_jsonl,
    sample_dataset,
    split_by_prompt,
    write_prepared,
)
from rlhf.data.validation import prompt_key
from tests.conftest import SHARED_DATA

SHARED_TLDR = SHARED_DATA / "tldr"


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pair(prompt: str, winner: str, loser: str, choice: int = 0) -> dict:
    candidates = [winner, loser] if choice == 0 else [loser, winner]
    return {"input_text": prompt, "candidate_0": candidates[0], "candidate_1": candidates[1], "choice": choice}


def test_bundled_sample_has_the_promised_size_and_is_valid():
    data = prepare_datasets(sample_dataset("preference.jsonl"), sample_dataset("prompts.jsonl"),
                            sample_dataset("eval.jsonl"))
    summary = data.summary
    assert summary["preference"]["rows"] >= 48
    assert summary["prompt"]["rows"] >= 24
    assert summary["eval"]["rows"] >= 8
    assert summary["eval"]["prompts_also_in_training_pairs"] == 0
    assert 0.3 <= summary["preference"]["longer_candidate_wins_share"] <= 0.7
    assert summary["preference"]["choice_balance"]["share_0"] == 0.5


def test_summary_counts_balance_lengths_duplicates_and_contradictions(tmp_path):
    rows = [
        pair("p1", "a fine summary", "bad", choice=0),
        pair("p1", "a fine summary", "bad", choice=1),   # the same judgement, candidates swapped: duplicate
        pair("p1", "bad", "a fine summary", choice=0),   # the opposite judgement: contradiction
        pair("p2", "short", "a much longer one", choice=1),
        pair("p3", "x", "yy", choice=0),
    ]
    data = prepare_datasets(write_rows(tmp_path / "p.jsonl", rows), data=DataConfig(eval_fraction=0.3))
    summary = data.summary["preference"]
    assert summary["rows"] == 5
    assert summary["distinct_prompts"] == 3
    assert summary["choice_balance"] == {"0": 3, "1": 2, "share_0": 0.6}
    assert summary["duplicate_pairs"] == 1
    assert summary["contradictory_pairs"] == 1
    assert summary["longer_candidate_wins_share"] == 0.4
    assert summary["chosen_words"]["max"] == 3


def test_split_by_prompt_is_seeded_and_never_shares_a_prompt():
    rows = [pair(f"prompt {i % 20}", f"good {i}", f"bad {i}") for i in range(60)]
    train, held_out = split_by_prompt(rows, 0.1, seed=7, uri="x")
    assert len(train) + len(held_out) == 60
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in held_out}
    assert len({prompt_key(r) for r in held_out}) == 2
    assert split_by_prompt(rows, 0.1, seed=7, uri="x") == (train, held_out)
    assert split_by_prompt(rows, 0.1, seed=8, uri="x") != (train, held_out)


def test_one_prompt_cannot_be_split(tmp_path):
    uri = write_rows(tmp_path / "p.jsonl", [pair("only", "a", "b"), pair("only", "c", "d")])
    with pytest.raises(DatasetError) as error:
        prepare_datasets(uri)
    assert str(error.value).startswith(f"{uri}:0: needs at least 2 distinct prompts")


def test_eval_pairs_are_the_held_out_set_and_prompts_default_to_training_prompts(tmp_path):
    train_uri = write_rows(tmp_path / "train.jsonl", [pair(f"p{i}", "a", "b") for i in range(4)])
    eval_uri = write_rows(tmp_path / "eval.jsonl", [pair("e1", "a", "b"), pair("e1", "c", "d"), {"input_text": "e2"}])
    data = prepare_datasets(train_uri, eval_dataset=eval_uri)
    assert len(data.train_pairs) == 4 and len(data.held_out_pairs) == 2
    assert [p["input_text"] for p in data.prompts] == ["p0", "p1", "p2", "p3"]
    assert [p["input_text"] for p in data.eval_prompts] == ["e1", "e2"]
    assert data.summary["preference"]["held_out_from"] == "eval_dataset"


def test_problems_of_all_datasets_are_reported_together(tmp_path):
    good = write_rows(tmp_path / "good.jsonl", [pair("p1", "a", "b"), pair("p2", "a", "b")])
    bad_prompts = tmp_path / "prompts.jsonl"
    bad_prompts.write_text('{"input_text": ""}\n')
    with pytest.raises(DatasetError) as error:
        prepare_datasets(good, str(bad_prompts), str(tmp_path / "missing.jsonl"))
    assert [str(p) for p in error.value.problems] == [
        f"{bad_prompts}:1: 'input_text' is empty or only whitespace",
        f"{tmp_path / 'missing.jsonl'}:0: file not found",
    ]


def test_written_datasets_read_back(tmp_path):
    data = prepare_datasets(sample_dataset("preference.jsonl"))
    write_prepared(data, tmp_path / "out")
    assert read_jsonl(tmp_path / "out" / TRAIN_PAIRS) == data.train_pairs
    assert read_jsonl(tmp_path / "out" / HELD_OUT_PAIRS) == data.held_out_pairs
    assert read_jsonl(tmp_path / "out" / PROMPTS) == data.prompts
    assert read_jsonl(tmp_path / "out" / EVAL_PROMPTS) == data.eval_prompts
    assert json.loads((tmp_path / "out" / SUMMARY).read_text()) == data.summary


@pytest.mark.skipif(not SHARED_TLDR.is_dir(), reason="the shared TL;DR data is not present")
def test_course_tldr_data_validates_with_the_published_length_baseline():
    data = prepare_datasets(str(SHARED_TLDR / "preference.jsonl"), str(SHARED_TLDR / "prompts.jsonl"),
                            str(SHARED_TLDR / "eval_prompts.jsonl"))
    summary = data.summary["preference"]
    assert summary["rows"] == 928
    assert summary["longer_candidate_wins_share"] == pytest.approx(0.616, abs=0.001)
    assert not {prompt_key(r) for r in data.train_pairs} & {prompt_key(r) for r in data.held_out_pairs}
