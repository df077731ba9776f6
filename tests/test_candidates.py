"""Candidate generation on the tiny model: two different candidates per prompt, in the prompts' order,
pairs the labelling page accepts, and no file ever overwritten."""

import json

import pytest

from rlhf.data.pairs import read_pairs
from rlhf.labeling.candidates import generate_candidates
from rlhf.labeling.config import CandidateConfig
from tests.conftest import rlhf

pytestmark = pytest.mark.slow

PROMPTS = [
    {"input_text": "Our dog barks at night and the neighbours complained twice this week.", "source": "p.jsonl:1"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My cat ran away."}],
     "source": "p.jsonl:2"},
    {"input_text": "I got a job offer with more pay but a longer commute. Should I take it?", "source": "p.jsonl:3"},
    {"input_text": "Our dog barks at night and the neighbours complained twice this week.", "source": "p.jsonl:4"},
    {"input_text": "Short post.", "source": "p.jsonl:5"},
]


def config(**overrides):
    return CandidateConfig(**{"target_sequence_length": 8, "batch_size": 2, "instruction": "Summarize.", **overrides})


@pytest.fixture(scope="module")
def result(tiny_model_dir):
    return generate_candidates(PROMPTS, str(tiny_model_dir), config(), model_name="tiny")


def test_two_different_candidates_per_prompt_in_the_prompts_order(result):
    assert result.unusable == []
    assert [p["source"] for p in result.pairs] == [r["source"] for r in PROMPTS]
    for prompt, pair in zip(PROMPTS, result.pairs):
        for key in ("input_text", "messages"):
            assert pair.get(key) == prompt.get(key)
        assert pair["candidate_0"].strip() and pair["candidate_1"].strip()
        assert pair["candidate_0"] != pair["candidate_1"]
        generation = pair["generation"]
        assert generation["model"] == "tiny" and generation["temperatures"] == [0.7, 1.0]
        assert generation["seeds"][0] != generation["seeds"][1]
        assert len(generation["ended"]) == 2
    assert len({p["pair_id"] for p in result.pairs}) == len(PROMPTS)


def test_the_pairs_file_is_what_the_labelling_page_reads(result, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in result.pairs))
    assert read_pairs(str(path)) == result.pairs


def test_same_settings_same_pairs(tiny_model_dir, result):
    again = generate_candidates(PROMPTS, str(tiny_model_dir), config(), model_name="tiny")
    assert again.pairs == result.pairs


def test_prompts_that_only_give_identical_candidates_are_resampled_then_left_out(tiny_model_dir):
    # Near-zero temperature: both candidates are the greedy completion, the same text every time.
    frozen = generate_candidates(PROMPTS[:3], str(tiny_model_dir), config(temperatures=(1e-4, 1e-4), max_attempts=2))
    assert frozen.pairs == []
    assert frozen.unusable == ["p.jsonl:1", "p.jsonl:2", "p.jsonl:3"]
    assert frozen.resampled == 3


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"temperatures \(0.7, 0.0\) must be above 0"):
        config(temperatures=(0.7, 0.0)).validate()
    with pytest.raises(ValueError, match="top_p"):
        config(top_p=1.5).validate()
    # The command names each bad setting by its flag, in one line, before any model loads.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"input_text": "fine"}\n')
    refused = rlhf("generate-candidates", "--prompt-dataset", str(prompts), "--output", str(tmp_path / "out.jsonl"),
                   "--temperatures", "0.7", "0", "--inference-batch-size", "0", "--large-model-reference", "/nowhere")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert ("candidate generation: --inference-batch-size 0 must be at least 1; candidate generation: "
            "--temperatures (0.7, 0.0) must be above 0") in refused.stderr


def test_cli_writes_pairs_and_never_overwrites(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "source"}) + "\n" for r in PROMPTS))
    output = tmp_path / "pairs.jsonl"
    command = ["generate-candidates", "--prompt-dataset", str(prompts), "--output", str(output),
               "--large-model-reference", str(tiny_model_dir), "--target-sequence-length", "8",
               "--inference-batch-size", "2", "--device", "cpu"]
    made = rlhf(*command)
    assert made.returncode == 0, made.stderr
    assert "candidate generation: 5/5 prompts" in made.stderr
    pairs = read_pairs(str(output))
    assert [p["source"] for p in pairs] == [f"{prompts}:{n}" for n in range(1, 6)]
    written = output.read_bytes()
    refused = rlhf(*command)
    assert refused.returncode == 2 and "exists" in refused.stderr and "Traceback" not in refused.stderr
    assert output.read_bytes() == written


def test_cli_reports_bad_prompt_rows_by_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"input_text": "fine"}\n{"text": "wrong key"}\n')
    result = rlhf("generate-candidates", "--prompt-dataset", str(prompts), "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2 and f"{prompts}:2: unexpected key 'text'" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_an_existing_gcs_output_counts_as_existing(gcs_bucket):
    from rlhf.cli import _uri_exists

    uri = f"gs://{gcs_bucket.name}/pairs.jsonl"
    assert not _uri_exists(uri)
    gcs_bucket.blob("pairs.jsonl").upload_from_string(b"{}\n")
    assert _uri_exists(uri)
