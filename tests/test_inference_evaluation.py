import json

import pytest

from rlhf.evaluation import bootstrap_interval, evaluate_outputs, win_rate
from rlhf.inference import InferenceConfig, bulk_infer
from rlhf.report import histogram, line_chart, render_html, render_markdown, verdict

ROWS = [
    {"input_text": "A long post about a dog that barks every single night and the neighbours complain. [summary]: "},
    {"input_text": "Short post. [summary]: "},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My cat ran away."}]},
    {"input_text": "A medium post about a job offer with more pay. [summary]: "},
    {"input_text": "Another short one. [summary]: "},
]


@pytest.fixture(scope="module")
def predictions(tiny_model_dir):
    config = InferenceConfig(target_sequence_length=6, batch_size=2, instruction="Summarize.")
    return bulk_infer(ROWS, str(tiny_model_dir), config)


def test_outputs_line_up_with_inputs_and_have_the_vertex_shape(predictions):
    assert len(predictions) == len(ROWS)
    for row, output in zip(ROWS, predictions):
        for key in ("input_text", "messages"):
            assert output.get(key) == row.get(key)
        assert isinstance(output["prediction"], str)
        assert output["inputs"]["inputs_pretokenized"].startswith("Summarize.\n")
        assert 1 <= output["prediction_tokens"] <= 6


def test_outputs_are_the_same_whatever_the_batching(tiny_model_dir, predictions):
    one_by_one = bulk_infer(ROWS, str(tiny_model_dir),
                            InferenceConfig(target_sequence_length=6, batch_size=1, instruction="Summarize."))
    assert [o["prediction"] for o in one_by_one] == [o["prediction"] for o in predictions]


def test_vertex_tools_read_our_outputs_as_they_read_vertex_outputs(predictions):
    from pathlib import Path

    vertex = Path(__file__).resolve().parents[2] / "shared" / "data" / "tldr" / "vertex_bulk_inference_tuned.jsonl"
    if not vertex.is_file():
        pytest.skip("the shared Vertex bulk-inference sample is not present")
    theirs = json.loads(vertex.read_text().splitlines()[0])
    ours = predictions[0]
    assert set(theirs["inputs"]) & set(ours["inputs"]) == {"inputs_pretokenized"}
    assert type(ours["prediction"]) is type(theirs["prediction"])


def test_win_rate_counts_ties_as_half_and_the_interval_holds_it():
    assert win_rate([0.0, 0.0, 1.0, 2.0], [1.0, 0.0, 0.0, 3.0]) == pytest.approx(0.625)
    low, high = bootstrap_interval([0.0] * 20, [float(i % 3 - 1) for i in range(20)], seed=1)
    assert low <= win_rate([0.0] * 20, [float(i % 3 - 1) for i in range(20)]) <= high


def test_evaluation_metrics_have_the_design_keys(tiny_model_dir, tmp_path, predictions):
    from tests.test_reward_model import config as reward_config, marker_pairs
    from rlhf.reward_training import train_reward_model

    rows = marker_pairs(24)
    train_reward_model(reward_config(train_steps=2), rows[:20], rows[20:], str(tiny_model_dir), tmp_path / "rm")
    tuned = [dict(p, prediction=p["prediction"] + " great") for p in predictions]
    metrics, comparison = evaluate_outputs(predictions, tuned, tmp_path / "rm", str(tiny_model_dir), None)
    assert {"base_mean_reward", "tuned_mean_reward", "win_rate_vs_base", "kl_to_base", "base_mean_words",
            "tuned_mean_words", "prompts"} <= set(metrics)
    assert metrics["prompts"] == 5 and metrics["tuned_mean_words"] == metrics["base_mean_words"] + 1
    assert [c["reward_gain"] for c in comparison] == sorted((c["reward_gain"] for c in comparison), reverse=True)
    with pytest.raises(ValueError, match="same prompt order"):
        evaluate_outputs(predictions, list(reversed(tuned)), tmp_path / "rm", str(tiny_model_dir), None)


EVALUATION = {"prompts": 3, "base_mean_reward": -0.2, "tuned_mean_reward": 0.4, "win_rate_vs_base": 2 / 3,
              "win_rate_ci95": [0.33, 1.0], "kl_to_base": 3.2, "base_mean_words": 35.0, "tuned_mean_words": 28.0}
COMPARISON = [{"input_text": "post <b>one</b>", "base": "b1", "tuned": "t1", "base_reward": -0.5, "tuned_reward": 0.5,
               "reward_gain": 1.0},
              {"input_text": "post two", "base": "b2", "tuned": "t2 | pipe", "base_reward": 0.1, "tuned_reward": 0.0,
               "reward_gain": -0.1}]


def test_verdict_is_plain_language():
    assert verdict(EVALUATION) == ("The tuned model beats the base model on 67% of 3 prompts (95% interval 33%–100%): "
                                   "mean reward +0.40 against -0.20, KL to base 3.20 nats per completion. Tuned "
                                   "completions average 28 words, base 35.")


def test_verdict_says_when_wins_and_mean_reward_disagree_or_tuning_lost():
    mixed = {**EVALUATION, "tuned_mean_reward": -0.5}
    assert verdict(mixed).startswith("The tuned model wins on 67% of 3 prompts (95% interval 33%–100%) but its mean "
                                     "reward is lower: mean reward -0.50 against -0.20")
    lost = {**EVALUATION, "win_rate_vs_base": 0.25}
    assert verdict(lost).startswith("The tuned model does not beat the base model: it wins on 25% of 3 prompts")


def test_report_holds_charts_table_and_escaped_text():
    metrics = {"reward_model": {"eval_accuracy": 0.7}, "policy": {"final_reward": 0.3}, "evaluation": EVALUATION}
    page = render_html({"kl_coeff": 0.1}, metrics, COMPARISON, {"rank_loss": [(1, 0.7), (2, 0.5)]},
                       {"reward": [(1, 0.1), (2, 0.3)], "kl_loss": [(1, 0.0), (2, 0.1)]})
    assert page.count("<svg") == 6
    assert page.count("<tr><td class=\"prompt\">") == 2
    assert "post &lt;b&gt;one&lt;/b&gt;" in page and "<b>one</b>" not in page
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    markdown = render_markdown(metrics, COMPARISON)
    assert "t2 \\| pipe" in markdown and "| evaluation.prompts | 3 |" in markdown


def test_charts_handle_empty_and_flat_series():
    assert "no data" in line_chart([], "empty")
    assert "<path" in line_chart([(1, 0.5), (2, 0.5)], "flat")
    assert "<rect" in histogram({"base": [0.1, 0.1], "tuned": [0.1]}, "same")
