"""bfloat16, the precision a GPU stage runs in, checked on the CPU: PPO's first ratio is 1 and its KL to the
reference 0, the language-model head computes in float32, a LoRA update is never rounded away by merging,
the reward model's packing refuses the attention kernels for which it would not be exact; and in float32
on a CPU, passes without gradients run the linear layers through oneDNN, those with gradients through
torch's usual kernel; and the training precision a CPU picks (bfloat16 where it has AMX)."""

import copy

import pytest
import torch
from transformers import Gemma2Config, LlamaConfig, MistralConfig

from rlhf.data.prompts import PromptEncoder, PromptFormat
from rlhf.models import loading
from rlhf.models.loading import (
    OneDNNLinear,
    load_backbone,
    load_causal_lm,
    load_tokenizer,
    pick_placement,
    training_placement,
)
from rlhf.reward.packing import packing_problem
from rlhf.rl.decoding import adapter_merged
from rlhf.rl.policy import Policy
from rlhf.rl.ppo import collect
from rlhf.settings import CPU_PRECISION_VARIABLE
from tests.conftest import PROMPTS, TargetTokenShare, ppo_config, rlhf

BF16 = pick_placement("cpu", torch.bfloat16)


def _policy(model_dir, placement, lora_b_std: float = 0.0) -> tuple[Policy, object]:
    tokenizer = load_tokenizer(str(model_dir))
    torch.manual_seed(0)
    policy = Policy.create(load_causal_lm(str(model_dir), placement), 8, [tokenizer.eos_token_id],
                           tokenizer.pad_token_id)
    if lora_b_std:
        with torch.no_grad():
            for name, parameter in policy.model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, lora_b_std)
    return policy, tokenizer


def test_in_bfloat16_the_first_ppo_ratio_is_one_and_the_kl_to_the_reference_zero(tiny_model_dir):
    policy, tokenizer = _policy(tiny_model_dir, BF16)
    config = ppo_config(kl_coeff=0.1)
    encoder = PromptEncoder(tokenizer, PromptFormat(config.instruction, config.use_chat_template),
                            config.prompt_sequence_length, config.target_sequence_length)
    rows = PROMPTS[:4]
    experience = collect(policy, rows, [encoder.encode_prompt(r) for r in rows], TargetTokenShare(), config)
    with torch.no_grad():
        log_probs, _, values = policy.evaluate(experience.rollout, config.temperature)
    mask = experience.rollout.completion_mask.bool()
    assert mask.sum() > 8
    # Exactly: the old log-probs and values come from the training pass itself. The sampling pass's own
    # (a one-token pass over the KV cache) differ by bfloat16 rounding.
    assert torch.equal(log_probs[mask], experience.old_log_probs[mask])
    assert torch.equal(values[mask], experience.old_values[mask])
    assert torch.equal(experience.kl, torch.zeros_like(experience.kl))


def test_the_language_model_head_computes_in_float32_from_a_copy_that_is_never_saved(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), BF16)
    ids = torch.tensor([[5, 9, 17, 33]])
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert {v.dtype for v in model.state_dict().values()} == {torch.bfloat16}
    float32 = load_causal_lm(str(tiny_model_dir), pick_placement("cpu"))
    assert not hasattr(float32.get_output_embeddings(), "weight_float32")
    # The product of the bfloat16 hidden states and head weight, without a bfloat16 rounding of the logits.
    hidden = model.model(input_ids=ids).last_hidden_state
    weight = model.get_output_embeddings().weight
    exact = hidden.double() @ weight.double().T
    assert (logits.double() - exact).abs().max() < 1e-5
    assert (torch.nn.functional.linear(hidden, weight).double() - exact).abs().max() > 1e-4


def test_in_bfloat16_sampling_runs_the_policy_as_trained_not_a_rounded_merge(tiny_model_dir):
    policy, _ = _policy(tiny_model_dir, BF16, lora_b_std=1e-3)
    ids = torch.tensor([[5, 9, 17, 33, 40, 41]])
    with torch.no_grad():
        trained = policy.model(input_ids=ids).logits
        with adapter_merged(policy.model):
            sampled = policy.model(input_ids=ids).logits
    assert torch.equal(sampled, trained)


def test_in_float32_sampling_still_merges_the_adapter(tiny_model_dir):
    policy, _ = _policy(tiny_model_dir, pick_placement("cpu"), lora_b_std=1e-3)
    layer = next(m for name, m in policy.model.named_modules() if name.endswith("q_proj"))
    original = layer.get_base_layer().weight.data_ptr()
    with adapter_merged(policy.model):
        assert layer.get_base_layer().weight.data_ptr() != original
    assert layer.get_base_layer().weight.data_ptr() == original


@pytest.mark.parametrize("config, longest, problem", [
    (LlamaConfig(), 600, None),
    (LlamaConfig(attn_implementation="flash_attention_2"), 600, "does not apply the shared-prefix mask"),
    (MistralConfig(sliding_window=512), 600, "sliding-window attention of 512 tokens"),
    (MistralConfig(sliding_window=4096), 600, None),
    (MistralConfig(sliding_window=None), 600, None),
    (Gemma2Config(sliding_window=256), 600, "sliding-window attention of 256 tokens"),
])
def test_packing_refuses_attention_for_which_it_is_not_exact(config, longest, problem):
    if config._attn_implementation is None:
        config._attn_implementation = "sdpa"
    found = packing_problem(config, longest)
    assert (found is None) if problem is None else (problem in found)


def _kernels_called(run) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        run()
    return {event.key for event in recorded.key_averages()}


def test_float32_linears_on_a_cpu_run_without_gradients_through_onednn_and_with_them_as_before(tiny_model_dir):
    policy, tokenizer = _policy(tiny_model_dir, pick_placement("cpu"), lora_b_std=0.5)
    linears = [(name, m) for name, m in policy.model.named_modules() if isinstance(m, torch.nn.Linear)]
    # Every plain linear of the model, the head and the adapted layers' base layers included; the adapter's
    # own layers are added after loading and keep torch's kernel.
    assert {name for name, m in linears if type(m) is OneDNNLinear} == {name for name, _ in linears if "lora_" not in name}
    assert type(load_backbone(str(tiny_model_dir), pick_placement("cpu")).layers[0].mlp.up_proj) is OneDNNLinear
    ids = torch.tensor([tokenizer("a post about the cat and the dog")["input_ids"]])

    def logits():
        return policy.model(input_ids=ids).logits

    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _kernels_called(logits)
        fast = logits()
    assert "mkldnn::_linear_pointwise" not in _kernels_called(logits)
    trained = logits()
    assert trained.requires_grad
    torch.testing.assert_close(fast, trained.detach(), atol=1e-5, rtol=1e-5)
    # A copy keeps the class, and runs its own weights.
    twin = copy.deepcopy(policy.model)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.zero_()
        assert type(twin.get_output_embeddings()) is OneDNNLinear
        assert twin(input_ids=ids).logits.abs().max() == 0
        torch.testing.assert_close(logits(), fast, atol=0, rtol=0)


def test_linears_in_bfloat16_keep_torchs_own_kernel(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), BF16)
    assert not any(type(m) is OneDNNLinear for m in model.modules())


@pytest.mark.parametrize("has_amx", [True, False])
def test_a_cpu_trains_in_bfloat16_where_it_has_amx_and_judges_in_float32(monkeypatch, has_amx):
    monkeypatch.setenv(CPU_PRECISION_VARIABLE, "auto")
    monkeypatch.setattr(loading, "cpu_has_amx", lambda: has_amx)
    assert training_placement("cpu").dtype == (torch.bfloat16 if has_amx else torch.float32)
    assert pick_placement("cpu").dtype == torch.float32  # the reward model's judgments, inference, evaluation


@pytest.mark.parametrize("chosen, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_the_environment_sets_a_cpus_training_precision_whatever_the_cpu(monkeypatch, chosen, dtype):
    monkeypatch.setenv(CPU_PRECISION_VARIABLE, chosen)
    for has_amx in (True, False):
        monkeypatch.setattr(loading, "cpu_has_amx", lambda has_amx=has_amx: has_amx)
        assert training_placement("cpu").dtype == dtype


def test_a_bad_cpu_precision_stops_the_command_before_it_starts():
    result = rlhf("steps", "--rows", "3000", "--epochs", "30", env={CPU_PRECISION_VARIABLE: "float16"})
    assert result.returncode == 2
    assert "RLHF_CPU_PRECISION=float16: must be one of auto, float32, bfloat16" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
