"""The policy: the base causal LM with a LoRA adapter, a value head on its last hidden state, and the
reference model for free (the same weights with the adapter switched off).

Artifact layout (safetensors and JSON only):
    policy.json            base model reference, prompt format, sequence lengths, generation settings
    adapter/               the LoRA adapter, loadable with `peft.PeftModel.from_pretrained(base, adapter)`
    merged/                optional: base + adapter merged, a plain model directory for serving tools
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.artifacts import ModelSpec, read_spec_file, save_weights, write_spec

SPEC_FILE = "policy.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
FORMAT = "rlhf-policy/1"


@dataclass
class PolicySpec(ModelSpec):
    format: str = FORMAT


@dataclass
class Rollout:
    """Sequences laid out as [left-padded prompt | completion, right-padded]."""

    sequences: torch.Tensor  # [batch, prompt + completion]
    attention_mask: torch.Tensor  # [batch, prompt + completion]: 1 on real tokens
    completion_mask: torch.Tensor  # [batch, completion]: 1 up to and including the first EOS
    ended: torch.Tensor  # [batch]: the completion ended with EOS within the limit

    def to(self, device: torch.device) -> "Rollout":
        return Rollout(self.sequences.to(device), self.attention_mask.to(device), self.completion_mask.to(device),
                       self.ended.to(device))

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.completion_mask.shape[1]

    def completions(self) -> list[list[int]]:
        tokens = self.sequences[:, self.prompt_length:]
        return [row[mask.bool()].tolist() for row, mask in zip(tokens, self.completion_mask)]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on the first real token of a left-padded row, as generation counts them."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def completion_mask(completions: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first EOS, and whether each row has an EOS at all."""
    is_eos = completions == eos_id
    ended = is_eos.any(dim=1)
    # Tokens strictly after the first EOS are padding, whatever their id (pad and EOS may be the same id).
    after_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_first_eos).long(), ended


def make_rollout(prompts: list[list[int]], completions: list[list[int]], pad_id: int, ended: list[bool]) -> Rollout:
    """A rollout from given token ids, e.g. completions generated elsewhere, to score them."""
    ids, mask = left_pad(prompts, pad_id)
    length = max(len(c) for c in completions)
    tokens = torch.full((len(completions), length), pad_id, dtype=torch.long)
    keep = torch.zeros((len(completions), length), dtype=torch.long)
    for row, completion in enumerate(completions):
        tokens[row, :len(completion)] = torch.tensor(completion)
        keep[row, :len(completion)] = 1
    return Rollout(torch.cat([ids, tokens], dim=1), torch.cat([mask, keep], dim=1), keep, torch.tensor(ended))


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
             temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False) -> Rollout:
    """Sample (or greedily decode) completions with the KV cache; stops each row at its first EOS."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    # top_k=0 and a fresh config: sample from the policy's own distribution, not the checkpoint's defaults.
    sampling = {} if greedy else {"do_sample": True, "top_k": 0, "top_p": top_p, "temperature": temperature}
    settings = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                                use_cache=True, **sampling)
    was_training = model.training
    model.eval()
    sequences = model.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
    model.train(was_training)
    completions = sequences[:, ids.shape[1]:]
    if completions.shape[1] == 0:
        raise RuntimeError("generation produced no tokens")
    keep, ended = completion_mask(completions, eos_id)
    return Rollout(sequences, torch.cat([mask, keep], dim=1), keep, ended)


class Policy(torch.nn.Module):
    def __init__(self, model, value_head: torch.nn.Linear, eos_id: int, pad_id: int):
        super().__init__()
        self.model = model  # a peft.PeftModel around a causal LM
        self.value_head = value_head
        self.eos_id = eos_id
        self.pad_id = pad_id

    @classmethod
    def create(cls, causal_lm, lora_dim: int, eos_id: int, pad_id: int, seed: int) -> "Policy":
        from rlhf.modeling import add_lora, scalar_head

        head = scalar_head(causal_lm, seed)
        return cls(add_lora(causal_lm, lora_dim), head, eos_id, pad_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 greedy: bool = False, use_adapter: bool = True) -> Rollout:
        with nullcontext() if use_adapter else self.model.disable_adapter():
            return generate(self.model, prompts, max_new_tokens, self.eos_id, self.pad_id, temperature, top_p, greedy)

    def evaluate(self, rollout: Rollout, temperature: float, with_values: bool = True, use_adapter: bool = True):
        """Per-token log-probs [batch, completion] of the rollout's completion tokens, the entropy of each
        step's distribution, and the value of the state before each token (None without values)."""
        length = rollout.completion_mask.shape[1]
        context = nullcontext() if use_adapter else self.model.disable_adapter()
        with context:
            # Logits only where a completion token is predicted: the vocabulary projection is costly.
            output = self.model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                                position_ids=positions(rollout.attention_mask), logits_to_keep=length + 1,
                                output_hidden_states=with_values)
        logits = output.logits[:, :-1].float() / temperature
        log_probs = F.log_softmax(logits, dim=-1)
        targets = rollout.sequences[:, -length:]
        token_log_probs = log_probs.gather(-1, targets[..., None]).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        values = None
        if with_values:
            hidden = output.hidden_states[-1][:, -length - 1:-1]
            values = self.value_head(hidden.float()).squeeze(-1)
        return token_log_probs, entropy, values


def save_policy(policy: Policy, spec: PolicySpec, directory: Path, tokenizer, merged: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(policy.model, directory / ADAPTER_DIR)
    if merged:
        import copy

        plain = copy.deepcopy(policy.model).merge_and_unload()
        plain.save_pretrained(directory / MERGED_DIR, safe_serialization=True)
        tokenizer.save_pretrained(directory / MERGED_DIR)
    write_spec(directory / SPEC_FILE, spec)


def read_policy_spec(directory: Path) -> PolicySpec:
    return read_spec_file(directory, SPEC_FILE, PolicySpec, FORMAT, "tuned policy")
