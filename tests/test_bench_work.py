"""The reward-model benchmark's count of the tokens each side runs through the model, which explains its
speed-up: checked on pairs whose padding can be worked out by hand."""

from tests.conftest import load_experiment


def pair(prompt: int, winner: int, loser: int) -> dict:
    return {"prompt_ids": [1] * prompt, "chosen_ids": [1] * (prompt + winner), "rejected_ids": [1] * (prompt + loser)}


SETTINGS = {"batch_size": 4, "trl_pairs_per_forward": 2, "micro_batch_tokens": 10_000}


def test_equal_pairs_cost_two_padded_sequences_for_trl_and_one_packed_row_for_ours():
    bench = load_experiment("reward_model", folder="bench")
    computed = bench.computed_tokens_per_pair([pair(100, 30, 10)] * 8, SETTINGS)
    # TRL: winner and loser each padded to prompt + the longer completion; ours: prompt once, both completions.
    assert computed == {"trl": 2 * 130, "ours": 140}


def test_padding_follows_the_longest_pair_of_each_forward_pass_and_micro_batch():
    bench = load_experiment("reward_model", folder="bench")
    rows = [pair(100, 30, 10), pair(20, 5, 5)]
    one_pass = {"batch_size": 2, "trl_pairs_per_forward": 2, "micro_batch_tokens": 10_000}
    computed = bench.computed_tokens_per_pair(rows, one_pass)
    # One step, one forward pass each: TRL pads all four sequences to 130, ours both rows to 140.
    assert computed == {"trl": 4 * 130 / 2, "ours": 2 * 140 / 2}
    # A budget that holds one packed pair: ours computes each pair alone, without padding.
    alone = bench.computed_tokens_per_pair(rows, {**one_pass, "micro_batch_tokens": 140})
    assert alone["ours"] == (140 + 30) / 2
