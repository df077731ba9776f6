"""Our decoding loop against `transformers`' `generate`, and what it keeps for PPO against a full forward pass."""

import pytest
import torch

import rlhf.rl.cpu_decode_step as cpu_decode_step_module
from rlhf.models.loading import (
    add_lora,
    load_causal_lm,
    load_tokenizer,
    pick_placement,
    recompute_activations,
    stop_token_ids,
)
from rlhf.rl.cpu_decode_step import cpu_decode_step
from rlhf.rl.decoding import adapter_merged, decode, generate, preallocated_cache
from rlhf.rl.policy import Policy, entropy_of
from rlhf.rl.rollouts import left_pad, positions

TEXTS = ["dog", "a longer post about the cat and dog", "my roommate keeps leaving dishes"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(text)["input_ids"] for text in TEXTS]


def tuned_policy(tiny_model_dir, tokenizer, dtype=torch.float32) -> Policy:
    policy = Policy.create(load_causal_lm(str(tiny_model_dir), pick_placement("cpu", dtype)), 4,
                           [tokenizer.eos_token_id], tokenizer.pad_token_id)
    with torch.no_grad():
        for name, parameter in policy.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))  # make the adapter matter
        policy.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))  # and the values
    return policy


def reference_generate(model, prompts, eos_id, pad_id, max_new_tokens, **sampling):
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, pad_id)
    settings = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                                use_cache=True, **sampling)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)


def test_greedy_decoding_gives_the_tokens_of_transformers_generate(tiny_model_dir, tokenizer, prompts):
    model = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    # As EOS, the token row 0 emits second: row 0 stops there, the other rows elsewhere or not at all, and get padded.
    eos_id = int(reference_generate(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 2)[0, -1])
    expected = reference_generate(model, prompts, eos_id, tokenizer.pad_token_id, 12)
    rollout = generate(model, prompts, 12, [eos_id], tokenizer.pad_token_id, greedy=True)
    assert torch.equal(rollout.sequences, expected)
    assert rollout.ended[0]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampling_draws_tokens_as_often_as_their_probability(temperature):
    from rlhf.rl.decoding import pick_tokens

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -30.0]]).repeat(40000, 1)
    torch.manual_seed(0)
    drawn = pick_tokens(logits, temperature=temperature, top_p=1.0, greedy=False)
    frequencies = torch.bincount(drawn, minlength=6).double() / len(drawn)
    expected = (logits[0].double() / temperature).softmax(-1)
    assert (frequencies - expected).abs().max() < 0.01  # about 4 standard errors at 40000 draws
    assert frequencies[5] == 0


def test_sampling_is_reproducible_from_the_seed(tiny_model_dir, tokenizer, prompts):
    model = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(generate(model, prompts, 12, [tokenizer.eos_token_id], tokenizer.pad_token_id, 0.9, 0.95).sequences)
    assert torch.equal(runs[0], runs[1])


def test_nucleus_sampling_never_draws_outside_the_nucleus(tiny_model_dir, tokenizer, prompts):
    from rlhf.rl.decoding import pick_tokens

    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(2000, 1)
    torch.manual_seed(0)
    drawn = pick_tokens(logits, temperature=1.0, top_p=0.9, greedy=False)
    assert set(drawn.tolist()) == {0, 1}  # p = 0.70, 0.26: the first two reach 0.9, the rest never appear
    assert set(pick_tokens(logits, temperature=1.0, top_p=0.01, greedy=False).tolist()) == {0}


def test_sampled_log_probs_and_values_equal_a_full_forward_pass(tiny_model_dir, tokenizer, prompts):
    policy = tuned_policy(tiny_model_dir, tokenizer)
    torch.manual_seed(3)
    rollout, log_probs, values = policy.roll_out(prompts, max_new_tokens=10, temperature=0.7, top_p=1.0)
    with torch.no_grad():
        expected_log_probs, _, expected_values = policy.evaluate(rollout, temperature=0.7)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(log_probs[mask], expected_log_probs[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(values[mask], expected_values[mask], atol=1e-4, rtol=1e-4)


def test_rolling_out_samples_from_the_adapted_policy_not_the_base(tiny_model_dir, tokenizer, prompts):
    policy = tuned_policy(tiny_model_dir, tokenizer)
    tuned = policy.generate(prompts, 10, 1.0, 1.0, greedy=True)
    base = policy.generate(prompts, 10, 1.0, 1.0, greedy=True, use_adapter=False)
    with torch.no_grad():
        plain = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
        tuned_reference = reference_generate(policy.model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 10)
        base_reference = reference_generate(plain, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, 10)
    assert torch.equal(tuned.sequences, tuned_reference)
    assert torch.equal(base.sequences, base_reference)
    assert not torch.equal(tuned.sequences, base.sequences)


def test_merging_for_decoding_gives_back_the_exact_base_weights(tiny_model_dir, tokenizer):
    policy = tuned_policy(tiny_model_dir, tokenizer)
    before = {name: p.detach().clone() for name, p in policy.model.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        adapted = policy.model(input_ids=ids).logits
        with adapter_merged(policy.model):
            merged = policy.model(input_ids=ids).logits
        after = policy.model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, adapted)
    for name, parameter in policy.model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def first_greedy_tokens(model, tokenizer, prompts) -> list[int]:
    first = decode(model, prompts, 1, [tokenizer.eos_token_id], tokenizer.pad_token_id, greedy=True)
    return first.rollout.sequences[:, -1].tolist()


def test_a_row_stops_at_its_stop_token_and_is_padded_after_it(tiny_model_dir, tokenizer, prompts):
    model = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    stop_id = first_greedy_tokens(model, tokenizer, prompts)[0]  # row 0 ends at once
    decoded = decode(model, prompts, 30, [stop_id], tokenizer.pad_token_id, greedy=True)
    completions = decoded.rollout.sequences[:, decoded.rollout.prompt_length:]
    assert decoded.rollout.ended[0]
    assert decoded.rollout.completion_mask[0].tolist() == [1] + [0] * (completions.shape[1] - 1)
    assert (completions[0, 1:] == tokenizer.pad_token_id).all()


def test_decoding_stops_on_every_id_the_generation_config_lists_once_every_row_has_ended(tiny_model_dir, tokenizer,
                                                                                         prompts):
    model = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    firsts = first_greedy_tokens(model, tokenizer, prompts)
    # As gemma lists <end_of_turn> and llama-3 <|eot_id|> beside the tokenizer's EOS: here, each row's first token.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *dict.fromkeys(firsts)]
    stop_ids = stop_token_ids(model, tokenizer)
    assert stop_ids[0] == tokenizer.eos_token_id and set(firsts) <= set(stop_ids)
    decoded = decode(model, prompts, 30, stop_ids, tokenizer.pad_token_id, greedy=True)
    assert decoded.rollout.ended.all()
    assert decoded.rollout.completion_mask.tolist() == [[1]] * len(prompts)  # and no token was decoded after


def test_no_new_tokens_is_refused(tiny_model_dir, tokenizer, prompts):
    model = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    with pytest.raises(ValueError, match="at least one new token"):
        decode(model, prompts, 0, [tokenizer.eos_token_id], tokenizer.pad_token_id)


def test_entropy_row_by_row_equals_the_full_distributions_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 1000) * torch.tensor([0.1, 3.0, 30.0])[:, None, None]  # flat to nearly one-hot
    log_probs = torch.log_softmax(logits, dim=-1)
    expected = -(log_probs.exp() * log_probs).sum(-1)
    torch.testing.assert_close(entropy_of(logits, torch.logsumexp(logits, dim=-1)), expected, atol=1e-4, rtol=1e-5)


def test_recomputing_activations_gives_the_same_gradients_and_runs_each_layer_again(tiny_model_dir, tokenizer,
                                                                                      prompts):
    rollout = generate(load_causal_lm(str(tiny_model_dir), pick_placement("cpu")), prompts, 6,
                       [tokenizer.eos_token_id], tokenizer.pad_token_id, 1.0, 1.0)
    gradients, layer_calls = {}, {}
    for recompute in (False, True):
        torch.manual_seed(0)
        policy = Policy.create(load_causal_lm(str(tiny_model_dir), pick_placement("cpu")), 4,
                               [tokenizer.eos_token_id], tokenizer.pad_token_id)
        if recompute:
            recompute_activations(policy.model)
        policy.model.train()
        calls = []
        layer = policy.model.get_base_model().model.layers[0]
        layer.self_attn.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        log_probs, _, values = policy.evaluate(rollout, 1.0)
        (log_probs.sum() + values.sum()).backward()
        gradients[recompute] = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
        layer_calls[recompute] = len(calls)
    assert layer_calls == {False: 1, True: 2}  # checkpointed: the backward pass runs the layer again
    assert gradients[True].keys() == gradients[False].keys() and gradients[False]
    for name, gradient in gradients[False].items():
        torch.testing.assert_close(gradients[True][name], gradient, atol=1e-6, rtol=1e-5)


# In bfloat16 the two ways round differently (sums in another order, each rounded to 8 bits of mantissa):
# logits of the tiny model, spread over about +-3, then differ by up to a few hundredths.
WRITTEN_OUT_CASES = {"float32": (torch.float32, False, 1e-5), "float32, adapter beside the weights": (torch.float32, True, 1e-5),
                     "bfloat16, adapter beside the weights": (torch.bfloat16, True, 0.05)}


@pytest.mark.parametrize("case", list(WRITTEN_OUT_CASES))
def test_the_written_out_cpu_step_computes_the_models_own_decode_step(tiny_model_dir, tokenizer, prompts, case):
    """Both ways decode the same tokens over caches filled by the same prefill: left-padded rows, grouped
    key/value heads, the position growing token by token; with a LoRA adapter acting beside the weights
    (as a bfloat16 policy samples), its low-rank term too."""
    dtype, adapted, tolerance = WRITTEN_OUT_CASES[case]
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no oneDNN bfloat16 kernels (AVX2 only), so no bfloat16 step is written out here")
    if adapted:
        model = tuned_policy(tiny_model_dir, tokenizer, dtype).model.eval()
    else:
        model = load_causal_lm(str(tiny_model_dir), pick_placement("cpu", dtype)).eval()
    step = cpu_decode_step(model, len(prompts))
    assert step is not None
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    own, written = preallocated_cache(model, ids.shape[1] + 8), preallocated_cache(model, ids.shape[1] + 8)
    with torch.no_grad():
        for cache in (own, written):
            first = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), past_key_values=cache,
                          use_cache=True, logits_to_keep=1)
        if adapted:  # so that matching the forward pass takes the adapter's term: it moves the logits far more
            with model.disable_adapter():
                plain = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), logits_to_keep=1)
            assert (plain.logits - first.logits).abs().max() > 10 * tolerance
        tokens, position, attention = first.logits[:, -1].argmax(-1), positions(mask)[:, -1], mask
        for _ in range(8):
            position, attention = position + 1, torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            expected = model(input_ids=tokens[:, None], attention_mask=attention, position_ids=position[:, None],
                             past_key_values=own, use_cache=True, logits_to_keep=1, output_hidden_states=True)
            logits, hidden = step(tokens, position, attention, written)
            assert logits.dtype == torch.float32
            torch.testing.assert_close(logits, expected.logits[:, -1], atol=tolerance, rtol=tolerance)
            torch.testing.assert_close(hidden.float(), expected.hidden_states[-1][:, -1].float(), atol=tolerance,
                                       rtol=tolerance)
            tokens = expected.logits[:, -1].argmax(-1)


def test_the_written_out_step_is_used_only_where_it_computes_what_the_model_does(tiny_model_dir, tokenizer, prompts,
                                                                                monkeypatch):
    policy = tuned_policy(tiny_model_dir, tokenizer)
    assert cpu_decode_step(policy.model, 3) is not None  # the adapter beside the weights: its term written out
    with adapter_merged(policy.model):
        assert cpu_decode_step(policy.model, 3) is not None  # folded in
    with policy.model.disable_adapter():
        assert cpu_decode_step(policy.model, 3) is not None
    bfloat16_step = cpu_decode_step(tuned_policy(tiny_model_dir, tokenizer, torch.bfloat16).model, 3)
    assert (bfloat16_step is not None) == torch.ops.mkldnn._is_mkldnn_bf16_supported()  # none without its kernels
    float16 = load_causal_lm(str(tiny_model_dir), pick_placement("cpu", torch.float16))
    assert cpu_decode_step(float16, 3) is None
    dora = add_lora(load_causal_lm(str(tiny_model_dir), pick_placement("cpu")), 4)
    for layer in dora.modules():
        if isinstance(getattr(layer, "use_dora", None), dict):
            layer.use_dora = {name: True for name in layer.lora_A}
    assert cpu_decode_step(dora, 3) is None  # an adapter kind the step does not write out
    with policy.model.disable_adapter():
        monkeypatch.setattr(cpu_decode_step_module, "memory_available", lambda: 10_000)
        assert cpu_decode_step(policy.model, 3) is None  # its copy of the weights would not fit
        monkeypatch.setattr(cpu_decode_step_module, "memory_available", lambda: 10 ** 12)
        assert cpu_decode_step(policy.model, 3) is not None
    # The adapter beside the weights (its term written out) decodes the tokens it does folded in.
    unfolded = decode(policy.model, prompts, 10, [tokenizer.eos_token_id], tokenizer.pad_token_id, greedy=True)
    with adapter_merged(policy.model):
        folded = decode(policy.model, prompts, 10, [tokenizer.eos_token_id], tokenizer.pad_token_id, greedy=True)
    assert torch.equal(unfolded.rollout.sequences, folded.rollout.sequences)
