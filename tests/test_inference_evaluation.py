import json

import pytest

from rlhf.evaluation.compare import KL_SAMPLES_PER_PROMPT, bootstrap_interval, evaluate_outputs, win_rate
from rlhf.evaluation.config import InferenceConfig
from rlhf.evaluation.inference import bulk_infer
from rlhf.evaluation.report import histogram, line_chart, render_html, render_markdown, verdict
from tests.conftest import EVALUATION, SHARED_DATA

pytestmark = pytest.mark.slow

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

    vertex = SHARED_DATA / "tldr" / "vertex_bulk_inference_tuned.jsonl"
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
    from rlhf.reward.training import train_reward_model
    from tests.conftest import marker_pairs, reward_config

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


COMPARISON = [{"input_text": "post <b>one</b>", "base": "b1", "tuned": "t1", "base_reward": -0.5, "tuned_reward": 0.5,
               "reward_gain": 1.0},
              {"input_text": "post two", "base": "b2", "tuned": "t2 | pipe", "base_reward": 0.1, "tuned_reward": 0.0,
               "reward_gain": -0.1}]


def test_verdict_is_plain_language():
    assert verdict(EVALUATION) == ("The tuned model beats the base model on 67% of 3 prompts (95% interval 33%–100%): "
                                   "mean reward +0.40 against -0.20, KL to base 3.20 nats per completion. Tuned "
                                   "completions average 28 words, base 35.")
    sampled = {**EVALUATION, "kl_to_base_sampling": {"temperature": 1.0, "top_p": 1.0, "completions": 12,
                                                     "standard_error": 0.41}}
    assert "KL to base 3.20 nats per completion (standard error 0.41, 12 sampled completions)." in verdict(sampled)


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


@pytest.fixture(scope="module")
def perturbed_policy(tiny_model_dir, tmp_path_factory):
    """A policy artifact whose adapter moves the model, trained at temperature 0.5."""
    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_placement
    from rlhf.rl.policy import Policy, PolicySpec, save_policy

    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = Policy.create(load_causal_lm(str(tiny_model_dir), pick_placement("cpu")), 4, [tokenizer.eos_token_id],
                           tokenizer.pad_token_id)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    directory = tmp_path_factory.mktemp("perturbed-policy")
    spec = PolicySpec(large_model_reference=str(tiny_model_dir), lora_dim=4, prompt_sequence_length=64,
                      target_sequence_length=6, instruction="Summarize.", temperature=0.5)
    save_policy(policy, spec, directory, tokenizer, merged=False)
    return directory, spec, policy, tokenizer


def _kl_by_hand(policy, prompts: list[list[int]], per_pass: int, temperature: float, seed: int) -> float:
    """The evaluation's draws by hand, `per_pass` prompts a pass: tuned and base log-softmax at the temperature,
    each from a full forward pass of the whole rollout (nothing packed, nothing from the sampling pass)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    sums = []
    for first in range(0, len(prompts), per_pass):
        rollout = policy.generate(prompts[first:first + per_pass], 6, temperature, 1.0)
        length = rollout.completion_mask.shape[1]
        inputs = {"input_ids": rollout.sequences, "attention_mask": rollout.attention_mask,
                  "position_ids": (rollout.attention_mask.cumsum(1) - 1).clamp(min=0)}
        with torch.no_grad():
            tuned_logits = policy.model(**inputs).logits
            with policy.model.disable_adapter():
                base_logits = policy.model(**inputs).logits
        targets = rollout.sequences[:, -length:, None]
        per_token = [F.log_softmax(logits[:, -length - 1:-1] / temperature, -1).gather(-1, targets).squeeze(-1)
                     for logits in (tuned_logits, base_logits)]
        sums += ((per_token[0] - per_token[1]) * rollout.completion_mask).sum(1).tolist()
    return sum(sums) / len(sums)


def test_kl_to_base_is_measured_on_completions_sampled_at_the_training_temperature(perturbed_policy,
                                                                                   tiny_model_dir):
    import torch

    from rlhf.data.prompts import PromptEncoder
    from rlhf.evaluation.compare import KL_BATCH, kl_to_base
    from rlhf.evaluation.inference import load_generator
    from rlhf.models.loading import pick_placement
    from rlhf.rl.policy import ADAPTER_DIR

    directory, spec, policy, tokenizer = perturbed_policy
    encoder = PromptEncoder(tokenizer, spec.prompt_format(), spec.prompt_sequence_length, spec.target_sequence_length)
    prompts = [encoder.encode_prompt(r) for r in ROWS]
    model = load_generator(str(tiny_model_dir), directory / ADAPTER_DIR, pick_placement("cpu"))
    measured, _, completions = kl_to_base(model, tokenizer, prompts, spec, seed=3, samples_per_prompt=1)
    assert completions == len(prompts)
    assert measured == pytest.approx(_kl_by_hand(policy, prompts, KL_BATCH, 0.5, seed=3), rel=1e-4, abs=1e-5)
    assert measured > 0.01
    # Several completions per prompt: each prompt drawn that many times in a row, in passes of whole groups whose
    # base pass packs the prompt once; the same value as full passes of each completion, and its error reported.
    several, error, completions = kl_to_base(model, tokenizer, prompts, spec, seed=3, samples_per_prompt=3)
    assert completions == 3 * len(prompts) and 0 < error < several
    drawn = [prompt for prompt in prompts for _ in range(3)]
    assert several == pytest.approx(_kl_by_hand(policy, drawn, KL_BATCH // 3 * 3, 0.5, seed=3), rel=1e-4, abs=1e-5)
    # A policy equal to its base (a fresh adapter) is at KL 0.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    assert kl_to_base(model, tokenizer, prompts, spec, seed=3)[0] == pytest.approx(0.0, abs=1e-6)


def test_the_rule_judge_scores_both_sides_where_the_instruction_defines_it(tiny_model_dir, tmp_path,
                                                                           perturbed_policy):
    from dataclasses import replace

    from rlhf.reward.training import train_reward_model
    from rlhf.rl.policy import ADAPTER_DIR
    from tests.conftest import marker_pairs, reward_config

    directory, spec, _, _ = perturbed_policy
    rows = marker_pairs(24)
    train_reward_model(reward_config(train_steps=2), rows[:20], rows[20:], str(tiny_model_dir), tmp_path / "rm")
    post = {"input_text": "My neighbour parks his truck across my driveway every morning. What should I do?"}
    base = [dict(post, prediction="You should call the city about the truck.", ended=True),
            dict(post, prediction="My neighbour blocks my driveway with his truck each morning.", ended=True)]
    tuned = [dict(post, prediction="A neighbour blocks the poster's driveway with a truck each morning.",
                  ended=True),
             dict(post, prediction="My neighbour blocks my driveway with his truck each morning and", ended=False)]
    ruled = replace(spec, instruction="Summarize in less than 50 words.")
    metrics, comparison = evaluate_outputs(base, tuned, tmp_path / "rm", str(tiny_model_dir), directory / ADAPTER_DIR,
                                           ruled)
    assert metrics["judges"] == ["reward_model", "rule"]
    assert metrics["rule_pass_rate_base"] == 0.5 and metrics["rule_pass_rate_tuned"] == 0.5
    assert metrics["rule_checks_base"]["no_advice"] == 0.5 and metrics["rule_checks_tuned"]["ended"] == 0.5
    judged = {entry["tuned"]: entry["tuned_rule"] for entry in comparison}
    assert judged[tuned[1]["prediction"]] == {"passed": False, "failed": ["ended"]}
    sampling = metrics["kl_to_base_sampling"]
    assert {key: sampling[key] for key in ("temperature", "top_p", "completions")} == {
        "temperature": 0.5, "top_p": 1.0, "completions": 2 * KL_SAMPLES_PER_PROMPT}
    assert sampling["standard_error"] > 0
    plain, _ = evaluate_outputs(base, tuned, tmp_path / "rm", str(tiny_model_dir), directory / ADAPTER_DIR, spec)
    assert plain["judges"] == ["reward_model"] and "rule_pass_rate_tuned" not in plain


def test_repeated_ngrams_measure_degenerate_loops():
    from rlhf.evaluation.rule_judge import repeated_ngram_share

    assert repeated_ngram_share("the dog barks at night and the cat sleeps") == 0.0
    loop = "I am not sure. " * 5
    assert repeated_ngram_share(loop) > 0.7
    assert repeated_ngram_share("too short") == 0.0


def test_copied_ngrams_measure_how_much_of_a_completion_repeats_its_prompt():
    from rlhf.evaluation.rule_judge import copied_ngram_share

    post = "When my grandfather died in the spring, he left me his old gold watch. Should I keep it?"
    assert copied_ngram_share("When my Grandfather died in the spring he left me his old gold watch", post) == 1.0
    assert copied_ngram_share("My grandfather left me a watch that my cousin now wants.", post) == 0.0
    # Three of its seven 5-grams are the post's: "when my ... in", "my ... the", "grandfather ... spring".
    assert copied_ngram_share("When my grandfather died in the spring, my cousin wanted it.", post) == pytest.approx(
        3 / 7)
    assert copied_ngram_share("Keep it.", post) == 0.0


def test_the_report_leads_with_both_judges():
    from rlhf.evaluation.report import rule_verdict

    judged = {**EVALUATION, "rule": "a summary", "rule_pass_rate_base": 0.125, "rule_pass_rate_tuned": 0.75,
              "rule_checks_base": {"ended": 0.5}, "rule_checks_tuned": {"ended": 1.0},
              "base_ended_share": 0.5, "tuned_ended_share": 1.0, "base_repeated_ngram_share": 0.1,
              "tuned_repeated_ngram_share": 0.0, "base_copied_ngram_share": 0.05, "tuned_copied_ngram_share": 0.8}
    assert rule_verdict(judged) == ("By the rule (a summary), 75% of tuned completions pass against 12% of base "
                                    "completions: 62 points more.")
    assert rule_verdict(EVALUATION).startswith("No rule judge")
    metrics = {"reward_model": {}, "policy": {}, "evaluation": judged}
    comparison = [dict(entry, base_rule={"passed": False, "failed": ["no_advice"]},
                       tuned_rule={"passed": True, "failed": []}) for entry in COMPARISON]
    page = render_html({}, metrics, comparison, {}, {})
    assert page.index('id="rule-verdict"') < page.index('id="judges"') < page.index('id="side-by-side"') < page.index(
        "<h2>Reward model</h2>")
    assert "fails: no advice" in page and "<td class=\"num\">75%</td>" in page
    assert "| passes the rule | 12% | 75% |" in render_markdown(metrics, comparison)
    assert "| word 5-grams copied from the prompt | 5% | 80% |" in render_markdown(metrics, comparison)
