"""The policy: the base causal LM with a LoRA adapter, a value head on its last hidden state, and the
reference model for free: the same weights with the adapter switched off, or, after a warm-up, with the
adapter the warm-up left (kept beside the checkpoints, so a resumed run has it).

When several consecutive rollouts share one prompt (rloo and grpo sample each prompt k times), the passes
without values pack each group as the reward model packs a pair: the prompt once, then its k completions,
each seeing the prompt and itself only (rlhf/reward/packing.py), so the prompt, most of the tokens, runs
once instead of k times, with and without gradients.

Artifact layout (safetensors and JSON only):
    policy.json            base model reference, prompt format, sequence lengths, generation settings
    adapter/               the LoRA adapter, loadable with `peft.PeftModel.from_pretrained(base, adapter)`
    merged/                optional: base + adapter merged, a plain model directory for serving tools
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf.errors import UserError
from rlhf.models.artifacts import ModelSpec, read_spec_file, save_weights, write_spec
from rlhf.models.loading import in_float32
from rlhf.reward.packing import PROMPT_SEGMENT, PackedBatch, pack, packing_problem
from rlhf.rl.decoding import adapter_merged, decode
from rlhf.rl.prefix_cache import PrefixCache, worth_keeping
from rlhf.rl.rollouts import Rollout, positions
from rlhf.training.checkpoints import copy_weights, trainable_state
from rlhf.training.distributed import ALONE, Ranks
from rlhf.training.sharding import shard_frozen_weights

SPEC_FILE = "policy.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
FORMAT = "rlhf-policy/1"
WARMED_UP_ADAPTER = "warmed_up_adapter.safetensors"  # in the checkpoint directory: the reference after a warm-up


@dataclass
class PolicySpec(ModelSpec):
    temperature: float = 1.0  # the rollouts' sampling temperature: evaluation measures the KL to base at it
    top_p: float = 1.0  # the rollouts' nucleus
    format: str = FORMAT

    @classmethod
    def of(cls, config, large_model_reference: str) -> PolicySpec:
        """What the policy stage's settings (`PPOConfig`) tell a later stage about the policy they trained."""
        return cls(large_model_reference=large_model_reference, lora_dim=config.lora_dim,
                   prompt_sequence_length=config.prompt_sequence_length,
                   target_sequence_length=config.target_sequence_length, instruction=config.instruction,
                   use_chat_template=config.use_chat_template, temperature=config.temperature, top_p=config.top_p)


class Policy(torch.nn.Module):
    def __init__(self, model, value_head: torch.nn.Linear | None, stop_ids: Sequence[int], pad_id: int):
        super().__init__()
        self.model = model  # a peft.PeftModel around a causal LM
        self.value_head = value_head
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.prompt_group = 1  # consecutive rollouts that share a prompt, packed together when above 1
        self.reference_prefixes: PrefixCache | None = None  # the reference's kept prompts, once asked for
        self.reference_adapter: dict[str, torch.Tensor] | None = None  # the reference's adapter; None: the base
        self.in_step = ALONE  # the ranks its frozen weights are sharded over, which run every pass together

    @contextmanager
    def reference_weights(self) -> Iterator[None]:
        """Within the block, `self.model` is the reference: the base model (the adapter switched off), or the
        policy with `reference_adapter`'s weights (the warmed-up policy)."""
        if self.reference_adapter is None:
            with self.model.disable_adapter():
                yield
            return
        parameters = dict(self.model.named_parameters())
        trained = {name: parameters[name].detach().clone() for name in self.reference_adapter}
        copy_weights(self.model, self.reference_adapter)
        try:
            yield
        finally:
            copy_weights(self.model, trained)

    def keep_warmed_up_reference(self, step: int, warmup_steps: int, checkpoint_dir: Path, ranks: Ranks) -> None:
        """From the step a warm-up ends on, the reference is the policy as the warm-up left it: at that step its
        adapter as it is (rank 0 also writes it beside the checkpoints); in a run resumed after that step, the
        adapter written then."""
        path = checkpoint_dir / WARMED_UP_ADAPTER
        if step > warmup_steps:
            if not path.exists():
                raise UserError(f"{checkpoint_dir}: the checkpoints are past the warm-up, but {WARMED_UP_ADAPTER}, the "
                                "reference the policy is compared with, is missing; write to a new output directory")
            self.reference_adapter = load_file(path, device=str(self.device))
            return
        # A copy: the policy's own weights move on from here.
        self.reference_adapter = {name: p.detach().clone() for name, p in self.model.named_parameters()
                                  if p.requires_grad}
        if ranks.main:
            staged = path.with_name(f".{WARMED_UP_ADAPTER}.partial")
            save_file(trainable_state(self.model), staged)
            os.replace(staged, path)

    def pack_prompt_groups(self, group: int, longest_completion: int, longest_prompt: int) -> bool:
        """Pack groups of `group` consecutive rollouts from now on, if packing is exact for this backbone;
        returns whether it is."""
        longest = longest_prompt + group * longest_completion
        self.prompt_group = group if group > 1 and packing_problem(self.model.config, longest) is None else 1
        return self.prompt_group > 1

    def keep_reference_prompts(self, prompts: list[list[int]], passes: int, longest: int) -> bool:
        """From now on the reference pass (no values) keeps each prompt's keys and values and runs only the
        completion over them (rlhf/rl/prefix_cache.py), if `passes` rollouts of `prompts` gain by it and it is
        exact for this backbone at sequences of up to `longest` tokens; returns whether it does. The reference
        must not change after its first pass (a warm-up's ends before it)."""
        causal_lm = self.model.get_base_model()
        config, dtype = causal_lm.config, next(causal_lm.parameters()).dtype
        # Sharded, the ranks would run the prompts' passes on different cache misses, out of step.
        if (not self.in_step.parallel and worth_keeping(config, dtype, prompts, passes)
                and packing_problem(config, longest) is None):
            self.reference_prefixes = PrefixCache(causal_lm.get_decoder())
        return self.reference_prefixes is not None

    @classmethod
    def create(cls, causal_lm, lora_dim: int, stop_ids: Sequence[int], pad_id: int) -> Policy:
        from rlhf.models.loading import add_lora, value_head

        head = value_head(causal_lm)
        return cls(add_lora(causal_lm, lora_dim), head, stop_ids, pad_id)

    def place(self, device: torch.device, ranks: Ranks, shard: bool) -> None:
        """Onto `device`; with `shard`, its frozen weights split over `ranks` first (`rlhf.training.sharding`),
        which then run every pass together."""
        if shard and shard_frozen_weights(self.model, ranks, device):
            self.in_step = ranks
        self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 greedy: bool = False, use_adapter: bool = True) -> Rollout:
        with adapter_merged(self.model) if use_adapter else self.model.disable_adapter():
            return decode(self.model, prompts, max_new_tokens, self.stop_ids, self.pad_id, temperature, top_p,
                          greedy).rollout

    def roll_out(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 top_p: float) -> tuple[Rollout, torch.Tensor, torch.Tensor]:
        """Sampled completions with each token's log-prob [batch, completion] as `evaluate` gives it, and the
        value of the state before it [batch, completion] (None for a policy without a value head).

        In float32 both come from the sampling pass itself (equal to a full pass within 1e-5). In a lower
        precision a one-token pass over the KV cache rounds differently from the training pass, so PPO's
        first ratio would not be 1 nor the KL to the reference 0; there they come from a second pass, the
        training pass without gradients, as OpenRLHF and verl recompute them after vLLM samples."""
        exact = in_float32(self.model)
        with_values = self.value_head is not None
        # Sharded weights are a rank's share: the adapter stays beside them.
        with adapter_merged(self.model) if not self.in_step.parallel else nullcontext():
            decoded = decode(self.model, prompts, max_new_tokens, self.stop_ids, self.pad_id, temperature, top_p,
                             keep_hidden=exact and with_values, in_step=self.in_step)
        if not exact:
            log_probs, _, values = self.evaluate(decoded.rollout, temperature, with_values=with_values)
            return decoded.rollout, log_probs, values
        values = self.value_head(decoded.hidden.float()).squeeze(-1) if with_values else None
        return decoded.rollout, decoded.log_probs, values

    def evaluate(self, rollout: Rollout, temperature: float, with_values: bool = True, reference: bool = False,
                 with_entropy: bool = False):
        """Per-token log-probs [batch, completion] of the rollout's completion tokens under the policy (or with
        `reference`, the reference model), the entropy of each step's distribution (None unless asked; a
        statistic, without gradient), and the value of the state before each token (None without values). Zero
        where the completion mask is."""
        if reference and not with_values and not with_entropy and self.reference_prefixes is not None:
            return self._reference_from_prefixes(rollout, temperature), None, None
        if self.prompt_group > 1 and not with_values:
            with self.reference_weights() if reference else nullcontext():
                return self._evaluate_packed(rollout, temperature, with_entropy)
        length = rollout.completion_mask.shape[1]
        context = self.reference_weights() if reference else nullcontext()
        with context:
            # Logits only where a completion token is predicted: the vocabulary projection is costly.
            output = self.model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
                                position_ids=positions(rollout.attention_mask), logits_to_keep=length + 1,
                                output_hidden_states=with_values, use_cache=False)
        logits = output.logits[:, :-1].float()
        if temperature != 1.0:
            logits = logits / temperature
        targets = rollout.sequences[:, -length:]
        # log p(token) = its logit - logsumexp(logits): no full-vocabulary log-prob tensor is made, or kept
        # for the backward pass.
        normaliser = torch.logsumexp(logits, dim=-1)
        token_log_probs = logits.gather(-1, targets[..., None]).squeeze(-1) - normaliser
        entropy = entropy_of(logits.detach(), normaliser.detach()) if with_entropy else None
        values = None
        if with_values:
            # Detached: the value loss trains the head, never the policy's adapter (see ppo.ppo_update).
            hidden = output.hidden_states[-1][:, -length - 1:-1].detach()
            values = self.value_head(hidden.float()).squeeze(-1)
        return token_log_probs, entropy, values

    @torch.no_grad()
    def _reference_from_prefixes(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        """The reference's log-probs of the rollout's completion tokens [batch, completion], zero past each
        completion's end, from its kept prompts and one pass over the completions."""
        prompt_columns = rollout.prompt_length
        prompts = [row[mask.bool()].tolist() for row, mask in
                   zip(rollout.sequences[:, :prompt_columns], rollout.attention_mask[:, :prompt_columns])]
        completions = rollout.sequences[:, prompt_columns:]
        with self.reference_weights():
            hidden = self.reference_prefixes.hidden_states(prompts, completions, rollout.completion_mask)
            # The prompt's last state predicts the first completion token, each completion token the next.
            logits = head_logits(self.model.get_base_model(), hidden[:, :-1])
        if temperature != 1.0:
            logits = logits / temperature
        token_log_probs = logits.gather(-1, completions[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return token_log_probs * rollout.completion_mask

    def _evaluate_packed(self, rollout: Rollout, temperature: float, with_entropy: bool):
        """`evaluate` without values, each group of `prompt_group` rollouts packed as one sequence."""
        group, rows = self.prompt_group, rollout.sequences.shape[0]
        prompt_columns = rollout.prompt_length
        prompts, masks = rollout.sequences[:, :prompt_columns], rollout.attention_mask[:, :prompt_columns]
        leaders = torch.arange(0, rows, group, device=prompts.device).repeat_interleave(group)
        if rows % group or not (torch.equal(prompts, prompts[leaders]) and torch.equal(masks, masks[leaders])):
            raise RuntimeError(f"rollouts are not in groups of {group} sharing one prompt")
        completions = rollout.completions()
        batch = pack([row[mask.bool()].tolist() for row, mask in zip(prompts[::group], masks[::group])],
                     [completions[start:start + group] for start in range(0, rows, group)],
                     self.pad_id).to(self.device)
        logits, packed_rows, columns = packed_completion_logits(self.model, batch)
        if temperature != 1.0:
            logits = logits / temperature
        normaliser = torch.logsumexp(logits, dim=-1)
        token_log_probs = logits.gather(-1, batch.input_ids[packed_rows, columns][:, None]).squeeze(-1) - normaliser
        # Back to the rollout's layout: completion k of packed row g is rollout row g * group + k, and a token's
        # place in its completion is its position id minus the prompt's length.
        prompt_lengths = (batch.segments == PROMPT_SEGMENT).sum(dim=1)
        target = (packed_rows * group + batch.segments[packed_rows, columns] - 1,
                  batch.position_ids[packed_rows, columns] - prompt_lengths[packed_rows])
        shape = rollout.completion_mask.shape
        log_probs = torch.zeros(shape, dtype=token_log_probs.dtype, device=self.device).index_put(
            target, token_log_probs)
        entropy = None
        if with_entropy:
            flat = torch.cat([entropy_of(part[None], norm[None])[0] for part, norm in
                              zip(logits.detach().split(ENTROPY_CHUNK), normaliser.detach().split(ENTROPY_CHUNK))])
            entropy = torch.zeros(shape, dtype=flat.dtype, device=self.device).index_put(target, flat)
        return log_probs, entropy, None


ENTROPY_CHUNK = 64  # packed tokens whose full distributions are in memory at once for the entropy


def packed_completion_logits(model, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits [tokens, vocabulary] that predict each packed completion token, with its (row, column) in
    the batch, under `model` (a causal LM, peft-wrapped or not).

    A completion's first token is predicted from the prompt's last position, every later one from the token
    before it in the same completion; the vocabulary projection runs at those positions only."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder()
    dtype = next(decoder.parameters()).dtype
    hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids,
                     attention_mask=batch.attention_mask(dtype), use_cache=False).last_hidden_state
    segments = batch.segments
    in_completion = segments > PROMPT_SEGMENT
    first_token = in_completion & (segments != segments.roll(1, dims=1))
    prompt_end = (segments == PROMPT_SEGMENT).sum(1, keepdim=True) - 1
    positions_in_row = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    predicted_from = torch.where(first_token, prompt_end, positions_in_row - 1)
    rows, columns = in_completion.nonzero(as_tuple=True)
    return head_logits(causal_lm, hidden[rows, predicted_from[rows, columns]]), rows, columns


def head_logits(causal_lm, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of a causal LM's head (with its final soft cap, where it has one) on hidden states."""
    logits = causal_lm.get_output_embeddings()(hidden).float()
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def completion_log_probs(model, batch: PackedBatch) -> torch.Tensor:
    """Summed log-probs [rows, completions] of each packed completion's tokens given its prompt, under `model`
    (a causal LM, peft-wrapped or not), in float32."""
    logits, rows, columns = packed_completion_logits(model, batch)
    targets = batch.input_ids[rows, columns]
    token_log_probs = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(batch.last_token.shape, dtype=torch.float32, device=logits.device)
    return sums.index_put((rows, batch.segments[rows, columns] - 1), token_log_probs, accumulate=True)


@torch.no_grad()
def entropy_of(logits: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """The entropy of each position's distribution [batch, positions], one row at a time: at most one row's
    probabilities are in memory, never the whole batch's."""
    entropies = []
    for row, norm in zip(logits.split(1), normaliser.split(1)):
        log_probs = row - norm[..., None]  # as log_softmax: no cancellation between two large sums
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
    return torch.cat(entropies)


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
