"""Kept prompts: the frozen reference and reward model run a step's completions over each prompt's keys and
values from an earlier step, and give what a full pass of prompt and completion gives."""

import torch

from rlhf.models.loading import load_backbone, load_causal_lm, pick_placement
from rlhf.reward.model import RewardModel, RewardModelSpec, save_reward_model
from rlhf.rl.prefix_cache import PrefixCache, worth_keeping
from rlhf.rl.rewards import RewardModelReward
from tests.conftest import adapted_policy

EOS = 2
# Prompts of three lengths, one of them twice in a step, so rows are left-padded against each other.
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [5, 6, 7], [20, 21, 22, 23, 24]]


def test_the_reference_over_kept_prompts_gives_the_full_passes_log_probs(tiny_model_dir):
    policy = adapted_policy(tiny_model_dir, EOS)
    full = {}
    for step in range(2):
        torch.manual_seed(step)
        rollout, _, _ = policy.roll_out(PROMPTS, 6, 0.7, 1.0)
        with torch.no_grad():
            full[step], _, _ = policy.evaluate(rollout, 0.7, with_values=False, reference=True)
        full[step] = full[step] * rollout.completion_mask
        full[step, "rollout"] = rollout
    assert policy.keep_reference_prompts(PROMPTS, passes=2 * len(PROMPTS), longest=32)
    for step in range(2):  # the first pass computes and keeps the prompts, the second reads them
        kept, _, _ = policy.evaluate(full[step, "rollout"], 0.7, with_values=False, reference=True)
        torch.testing.assert_close(kept, full[step], atol=1e-5, rtol=1e-5)
        assert len(policy.reference_prefixes.entries) == 3
    # With the adapter on (the update's pass and the evaluation's tuned side) the kept prompts are not used:
    # they are the reference's.
    with torch.no_grad():
        on, _, _ = policy.evaluate(full[1, "rollout"], 0.7, with_values=False)
    assert float((on - full[1]).abs().max()) > 1e-2


def test_a_prompt_past_the_capacity_is_computed_for_the_pass_and_not_kept(tiny_model_dir):
    causal_lm = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    decoder = causal_lm.get_decoder()
    completions = torch.tensor([[30, 31, EOS], [32, EOS, EOS], [33, 34, 35], [36, 37, EOS]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    roomy, cramped = PrefixCache(decoder), PrefixCache(decoder, capacity_bytes=1)
    expected = roomy.hidden_states(PROMPTS, completions, mask)
    torch.testing.assert_close(cramped.hidden_states(PROMPTS, completions, mask), expected)
    assert not cramped.entries and cramped.used_bytes == 0
    assert len(roomy.entries) == 3 and roomy.used_bytes > 0
    # Each row as a full pass of its prompt and completion: the last hidden state at every real position.
    for row, (prompt, completion, keep) in enumerate(zip(PROMPTS, completions, mask)):
        ids = torch.tensor([prompt + completion[keep.bool()].tolist()])
        with torch.no_grad():
            alone = decoder(input_ids=ids).last_hidden_state[0, len(prompt) - 1:]
        torch.testing.assert_close(expected[row, :len(alone)], alone, atol=1e-5, rtol=1e-5)


def test_the_reward_model_over_kept_prompts_scores_as_its_packed_pass(tiny_model_dir, tmp_path):
    placement = pick_placement("cpu")
    model = RewardModel.with_new_head(load_backbone(str(tiny_model_dir), placement), seed=0)
    save_reward_model(model, RewardModelSpec(large_model_reference=str(tiny_model_dir), lora_dim=0,
                                             prompt_sequence_length=32, target_sequence_length=4), tmp_path)
    reward = RewardModelReward(tmp_path, placement, str(tiny_model_dir))
    rows = [{"input_text": "first post"}, {"input_text": "a second, longer post"}, {"input_text": "first post"}]
    packed = reward(rows, completions := [[10, 11, EOS], [12], [13, 14, 15, 16, 17, 18]])
    assert not reward.keep_prompts(rows[:2], passes=2)  # each prompt met once: nothing to gain
    assert reward.keep_prompts(rows[:2], passes=6)
    # The last completion is cut at the limit, 4 tokens, both ways.
    kept = [reward(rows, completions), reward(rows[::-1], completions[::-1]).flip(0)]
    assert len(reward.prefixes.entries) == 2
    for scores in kept:
        torch.testing.assert_close(scores, packed, atol=1e-5, rtol=1e-5)
    assert float(packed.std()) > 1e-3  # the rows differ, so a score read at the wrong token would show


def test_prompts_are_kept_only_when_the_run_comes_back_to_them_and_all_of_them_fit(tiny_model_dir):
    causal_lm = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    decoder = causal_lm.get_decoder()
    cache = PrefixCache(decoder)
    cache.hidden_states(PROMPTS, torch.tensor([[30]] * len(PROMPTS)), torch.ones(len(PROMPTS), 1))
    kept = list(cache.entries)
    keys_and_values = sum(k.nbytes + v.nbytes for layers, _ in cache.entries.values() for k, v in layers)
    config = causal_lm.config
    assert worth_keeping(config, torch.float32, kept, passes=2 * len(kept), capacity_bytes=keys_and_values)
    assert not worth_keeping(config, torch.float32, kept, passes=2 * len(kept), capacity_bytes=keys_and_values - 1)
    assert not worth_keeping(config, torch.float32, kept, passes=len(kept), capacity_bytes=keys_and_values)
