"""The bundled sample encodes the rule judge's rule, and the rule judge reads completions as it says.

Fast: no model, only the sample files and `rlhf.evaluation.rule_judge`.
"""

from collections import Counter, defaultdict

import pytest

from rlhf.data.datasets import read_jsonl, sample_dataset
from rlhf.data.validation import chosen, rejected
from rlhf.evaluation.rule_judge import CHECKS, repeated_ngram_share, rule_for_instruction

INSTRUCTION = "Summarize in less than 50 words."
SUFFIX = " [summary]: "
RULE = rule_for_instruction(INSTRUCTION)


def rows(name: str) -> list[dict]:
    return read_jsonl(sample_dataset(name))


def post_of(row: dict) -> str:
    assert row["input_text"].endswith(SUFFIX), row["input_text"][-40:]
    return row["input_text"].removesuffix(SUFFIX)


def words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module")
def preference() -> list[dict]:
    return rows("preference.jsonl")


def test_sample_sizes(preference):
    posts = {r["input_text"] for r in preference}
    assert len(preference) == 144 and len(posts) == 24
    assert all(n == 6 for n in Counter(r["input_text"] for r in preference).values())
    # A post's rows are together, in one run.
    runs = [text for i, text in enumerate(r["input_text"] for r in preference)
            if i == 0 or text != preference[i - 1]["input_text"]]
    assert len(runs) == 24
    assert len(rows("prompts.jsonl")) == 40
    assert len(rows("eval.jsonl")) >= 16


def test_posts_are_reddit_style_requests_for_advice():
    texts = {r["input_text"] for name in ("preference.jsonl", "prompts.jsonl", "eval.jsonl") for r in rows(name)}
    for text in texts:
        post = post_of({"input_text": text})
        assert 70 <= words(post) <= 130, post[:60]
        assert post.endswith("?"), post[-40:]


def test_every_winner_passes_the_rule(preference):
    for row in preference:
        winner = chosen(row)
        verdict = RULE.judge(post_of(row), winner)
        assert verdict.passed, (verdict.failed(), winner)
        assert 15 <= words(winner) <= 45, winner


def test_every_loser_fails_exactly_one_check_and_a_posts_losers_fail_six_different_ones(preference):
    failed_by_post = defaultdict(list)
    for row in preference:
        loser = rejected(row)
        failed = RULE.judge(post_of(row), loser).failed()
        assert len(failed) == 1, (failed, loser)
        if failed == ["under_limit"]:
            assert 55 <= words(loser) <= 80, loser
        if failed == ["on_topic"]:  # vague: short, ended, not advice, but generic
            assert 8 <= words(loser) <= 25, loser
        if failed == ["own_words"]:  # copied: the post's opening whole sentences, verbatim
            assert post_of(row).startswith(loser) and loser.endswith((".", "!", "?")), loser
        if failed == ["no_repeats"]:  # a loop: one clause of a summary, said twice
            assert repeated_ngram_share(loser) >= 0.4 and 20 <= words(loser) <= 45, loser
        failed_by_post[row["input_text"]].append(failed[0])
    for post, failed in failed_by_post.items():
        assert sorted(failed) == sorted(CHECKS), (failed, post[:60])


def test_vague_losers_are_all_different(preference):
    vague = [rejected(r) for r in preference if RULE.judge(post_of(r), rejected(r)).failed() == ["on_topic"]]
    assert len(vague) == 24 and len(set(vague)) == 24


def test_each_post_has_at_least_two_distinct_winners(preference):
    winners = defaultdict(set)
    for row in preference:
        winners[row["input_text"]].add(chosen(row))
    assert all(len(w) >= 2 for w in winners.values())


def test_choices_are_balanced(preference):
    assert {r["choice"] for r in preference} == {0, 1}
    zeros = sum(r["choice"] == 0 for r in preference) / len(preference)
    assert 0.45 <= zeros <= 0.55, zeros


def test_length_alone_does_not_pick_the_winner(preference):
    longer_won = [len(chosen(r)) > len(rejected(r)) for r in preference]
    assert 0.4 <= sum(longer_won) / len(longer_won) <= 0.6


def test_eval_posts_are_never_trained_on_and_prompts_cover_the_preference_posts(preference):
    preference_posts = {r["input_text"] for r in preference}
    prompt_posts = [r["input_text"] for r in rows("prompts.jsonl")]
    eval_posts = [r["input_text"] for r in rows("eval.jsonl")]
    assert len(set(prompt_posts)) == len(prompt_posts) and len(set(eval_posts)) == len(eval_posts)
    assert len(eval_posts) >= 16
    assert not set(eval_posts) & (preference_posts | set(prompt_posts))
    assert preference_posts <= set(prompt_posts)
    # Not near-copies either: no eval post shares its opening with a training post.
    openings = {post_of({"input_text": p})[:60] for p in preference_posts | set(prompt_posts)}
    assert not {post_of({"input_text": p})[:60] for p in eval_posts} & openings


@pytest.mark.parametrize("instruction,limit", [
    ("Summarize in less than 50 words.", 50),
    ("Summarise in fewer than 30 words", 30),
    ("Translate to French.", None),
    ("", None),
])
def test_rule_for_instruction_reads_the_limit(instruction, limit):
    rule = rule_for_instruction(instruction)
    assert (rule.word_limit if rule else None) == limit


POST = ("My roommate leaves dirty dishes in the sink for days, and the kitchen smells. I asked her twice "
        "to wash them. Should I talk to her again?")
SUMMARY = "My roommate lets dirty dishes pile up in the sink for days despite two requests."


def test_a_good_summary_passes_every_check():
    verdict = RULE.judge(POST, SUMMARY)
    assert verdict.passed and set(verdict.checks) == set(CHECKS) and verdict.failed() == []


@pytest.mark.parametrize("completion", [
    "Your roommate lets dirty dishes pile up for days.",
    "The roommate leaves dirty dishes in the sink, so you should talk to her.",
    "You're tired of the dirty dishes your roommate leaves in the sink.",
])
def test_addressing_the_reader_fails_no_advice(completion):
    assert RULE.judge(POST, completion).failed() == ["no_advice"]


def test_fifty_words_fail_under_limit_and_forty_nine_pass():
    filler = ["roommate", "dirty", "dishes"] + [f"item{i}" for i in range(60)]  # no 4-gram said twice
    forty_nine = " ".join(filler[:48]) + " sink."
    fifty = " ".join(filler[:49]) + " sink."
    assert words(forty_nine) == 49 and words(fifty) == 50
    assert RULE.judge(POST, forty_nine).checks["under_limit"]
    assert RULE.judge(POST, fifty).failed() == ["under_limit"]


def test_ended_needs_final_punctuation_and_a_model_that_stopped():
    assert RULE.judge(POST, SUMMARY, stopped=False).failed() == ["ended"]
    assert RULE.judge(POST, SUMMARY.removesuffix(".")).failed() == ["ended"]
    assert RULE.judge(POST, '"My roommate lets dirty dishes pile up."').passed
    assert RULE.judge(POST, "My roommate lets dirty dishes pile up (for days!)").passed


def test_a_copy_of_the_post_fails_own_words_and_a_summary_that_quotes_a_little_passes():
    copy = "My roommate leaves dirty dishes in the sink for days, and the kitchen smells."
    assert RULE.judge(POST, copy).failed() == ["own_words"]
    # 4 of its 8 word 5-grams are in the post: half copied is still its own words; 6 of 9 are not.
    half = "My roommate leaves dirty dishes in the sink although I asked twice."
    more = "My roommate leaves dirty dishes in the sink for days although I asked."
    assert RULE.judge(POST, half).passed
    assert RULE.judge(POST, more).failed() == ["own_words"]


def test_an_off_topic_text_fails_on_topic():
    verdict = RULE.judge(POST, "The weather was lovely and the train arrived early today.")
    assert verdict.failed() == ["on_topic"]
    # Two shared long words are not enough; three are.
    assert RULE.judge(POST, "A roommate with dirty plates.").failed() == ["on_topic"]
    assert RULE.judge(POST, "A roommate with dirty dishes.").passed


def test_a_clause_said_twice_fails_no_repeats_and_one_shared_phrase_passes():
    loop = ("My roommate lets dirty dishes pile up in the sink, but my roommate lets dirty dishes pile up in "
            "the sink.")
    assert RULE.judge(POST, loop).failed() == ["no_repeats"]
    # Case and punctuation aside: "dirty DISHES pile up," repeats "Dirty dishes pile up".
    assert RULE.judge(POST, "My roommate: dirty dishes pile up, and dirty DISHES pile up in the sink.").failed() == [
        "no_repeats"]
    # A 3-word phrase said twice is not a loop.
    assert RULE.judge(POST, "My roommate leaves dishes in the sink; my roommate leaves the kitchen smelling.").passed
