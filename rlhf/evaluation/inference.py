"""Bulk inference: completions for every prompt of a dataset, in the input's order.

Prompts are batched by length (fewer pad tokens), generated with the KV cache, greedily by default as
Vertex's bulk inferrer does, and written back in the input order. Each output row carries the
Vertex shape too (`inputs.inputs_pretokenized`, `prediction`) so tools written for Vertex read it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.data.prompts import PromptEncoder, PromptFormat
from rlhf.data.storage import download_directory, is_gcs
from rlhf.data.validation import user_input
from rlhf.errors import UserError
from rlhf.evaluation.config import InferenceConfig
from rlhf.models.artifacts import refuse_pickles
from rlhf.models.loading import Placement, in_float32, load_causal_lm, load_tokenizer, pick_placement, stop_token_ids
from rlhf.rl.decoding import generate
from rlhf.rl.policy import ADAPTER_DIR, SPEC_FILE, PolicySpec, read_policy_spec
from rlhf.settings import chat_template_choice
from rlhf.training.distributed import ALONE, Ranks, join, local_device, seed_of
from rlhf.training.progress import Progress
from rlhf.training.sharding import loading_placement, loading_turn, lockstep, shard_frozen_weights


@dataclass
class ModelToInfer:
    """What bulk inference runs: a base model, with a tuned adapter or without."""

    large_model_reference: str  # the base model
    adapter: Path | None = None  # a peft LoRA adapter over it
    policy: PolicySpec | None = None  # where the checkpoint is a tuned policy: its settings

    def prompt_format(self, instruction: str | None, plain_text: bool) -> dict:
        """The instruction and chat-template choice to infer with: the ones given (an empty instruction is none
        given), else a tuned policy's own (as it was tuned), else none and the tokenizer's template."""
        tuned = self.policy is not None
        return {"instruction": instruction or (self.policy.instruction if tuned else ""),
                "use_chat_template": (self.policy.use_chat_template if tuned and not plain_text
                                      else chat_template_choice(plain_text))}


def model_to_infer(large_model_reference: str, checkpoint: str, scratch: Path,
                   name: str = "model_checkpoint") -> ModelToInfer:
    """The base model alone (no `checkpoint`), or with a checkpoint: a tuned policy (`rlhf train-policy`'s
    output, or the pipeline's policy artifact), whose base model it names, or any peft adapter directory over
    `large_model_reference`. A gs:// checkpoint is copied into `scratch` first. `name`: the setting's, in errors."""
    if not checkpoint:
        return ModelToInfer(large_model_reference)
    directory = Path(checkpoint)
    if is_gcs(checkpoint):
        directory = scratch / "checkpoint"
        download_directory(checkpoint, directory)
    if not directory.is_dir():
        raise UserError(f"{name} {checkpoint}: no such directory")
    if (directory / SPEC_FILE).is_file():
        spec = read_policy_spec(directory)
        if large_model_reference and large_model_reference != spec.large_model_reference:
            raise UserError(f"{name} {checkpoint}: a policy tuned from {spec.large_model_reference!r}, not "
                            f"{large_model_reference!r}; give the base model it was tuned from")
        return ModelToInfer(spec.large_model_reference, directory / ADAPTER_DIR, spec)
    if (directory / "adapter_config.json").is_file():
        if not large_model_reference:
            raise UserError(f"{name} {checkpoint}: a LoRA adapter; give the base model it adapts as "
                            "large_model_reference")
        return ModelToInfer(large_model_reference, directory)
    raise UserError(f"{name} {checkpoint}: neither a tuned policy (no {SPEC_FILE}) nor a peft adapter "
                    "(no adapter_config.json)")


def load_generator(model_path: str, adapter_dir: Path | None, placement: Placement, merge: bool = False,
                   in_step: Ranks = ALONE):
    """The base model, with the adapter in `adapter_dir` beside its weights, or with `merge`, folded into them once
    (in float32 only: a lower precision would round most of the update away), so decoding runs a plain model
    without the adapter's extra products in every layer. `in_step`: the ranks to shard its weights over
    (`rlhf.training.sharding`), which then run every pass together; loaded on the host first, each keeps its
    share."""
    if adapter_dir is not None:
        refuse_pickles(adapter_dir)  # before the base model loads: a refused artifact should cost nothing
    with loading_turn(in_step, in_step.parallel, model_path, placement.dtype):
        model = load_causal_lm(model_path, loading_placement(placement, in_step.parallel))
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
            if merge and in_float32(model):
                model = model.merge_and_unload()
        model.requires_grad_(False)
        shard_frozen_weights(model, in_step, placement.device)
        model.to(placement.device)
    model.eval()
    return model


def _pretokenized(row: dict, instruction: str) -> str:
    text = user_input(row)
    return f"{instruction}\n{text}" if instruction else text


class Generator:
    """A loaded model with its prompt format: completions for prompt rows, returned in their order."""

    def __init__(self, model_path: str, config: InferenceConfig, adapter_dir: Path | None = None):
        self.config = config
        self.tokenizer = load_tokenizer(model_path)
        # The ranks its weights are sharded over (`config.shard_weights`), which run every batch together.
        self.in_step = join() if config.shard_weights else ALONE
        self.model = load_generator(model_path, adapter_dir, pick_placement(local_device(config.device)), merge=True,
                                    in_step=self.in_step)
        if self.in_step.parallel and self.in_step.main:
            print(f"inference: each of {self.in_step.world_size} processes holds 1/{self.in_step.world_size} of the "
                  "model's decoder layers", file=sys.stderr)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.encoder = PromptEncoder(self.tokenizer, PromptFormat(config.instruction, config.use_chat_template),
                                     config.prompt_sequence_length, config.target_sequence_length)

    def complete(self, rows: list[dict], config: InferenceConfig | None = None, on_batch=None,
                 ranks: Ranks = ALONE, seeded: bool = False) -> list[dict]:
        """One output row per input row: input, prediction, Vertex-shaped inputs. `config` overrides the
        decoding settings (not the prompt format) for this call; `on_batch(n)` reports progress. With several
        `ranks`, each generates its share of the batches and every rank returns all the rows. `seeded`: each
        batch samples from its own seed (from `config.seed`), so the rows do not depend on who generates them."""
        config = config or self.config
        prompts = [self.encoder.encode_prompt(r) for r in rows]
        order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
        batches = [order[first:first + config.batch_size] for first in range(0, len(order), config.batch_size)]
        outputs: list[dict | None] = [None] * len(rows)
        # Sharded, a rank with a batch fewer than another generates the first batch again as an idle pass.
        for numbered in lockstep(ranks.share(list(enumerate(batches))), self.in_step):
            number, batch = numbered or (0, batches[0])
            if seeded:
                torch.manual_seed(seed_of(config.seed, number))
            rollout = generate(self.model, [prompts[i] for i in batch], config.target_sequence_length,
                               self.stop_ids, self.tokenizer.pad_token_id, config.temperature,
                               config.top_p, greedy=config.greedy, in_step=self.in_step)
            if numbered is None:
                continue
            for index, completion, ended in zip(batch, rollout.completions(), rollout.ended.tolist()):
                row = rows[index]
                output = {key: row[key] for key in ("input_text", "messages") if key in row}
                output.update({"prediction": self.tokenizer.decode(completion, skip_special_tokens=True).strip(),
                               "inputs": {"inputs_pretokenized": _pretokenized(row, self.config.instruction)},
                               "prediction_tokens": len(completion), "ended": bool(ended)})
                if "source" in row:
                    output["source"] = row["source"]
                outputs[index] = output
            if on_batch:
                on_batch(len(batch) * ranks.world_size)
        if ranks.parallel:
            merged = {}
            for share in ranks.gather({index: output for index, output in enumerate(outputs) if output is not None}):
                merged.update(share)
            outputs = [merged[index] for index in range(len(rows))]
        return outputs


def bulk_infer(rows: list[dict], model_path: str, config: InferenceConfig, adapter_dir: Path | None = None) -> list[dict]:
    """One output row per input row, same order: input, prediction, Vertex-shaped inputs. Started by
    `torch.distributed.run`, each process generates its share of the batches, and each returns every row."""
    config.validate()
    ranks = join()
    generator = Generator(model_path, config, adapter_dir)
    progress = Progress(len(rows), "bulk inference", unit="prompt") if ranks.main else None
    outputs = generator.complete(rows, on_batch=progress.update if progress else None, ranks=ranks, seeded=True)
    if progress:
        progress.close()
    return outputs
