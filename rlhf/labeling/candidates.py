"""Candidate generation: two completions per prompt for people to choose from.

The two candidates of a prompt are sampled by separate generate calls with different seeds and
temperatures, so they differ in wording and in how adventurous they are. A pair whose candidates come out
identical or empty (after stripping whitespace) cannot be labelled, and the validator refuses it later, so
it is sampled again with fresh seeds, up to `max_attempts` times in all; prompts that still give no usable
pair are left out of the output and reported with their source line.

The same prompts, model and settings (batch size included: a generate call samples its rows together)
give the same pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from rlhf.data.pairs import pair_id, prompt_fields
from rlhf.data.prompts import PromptEncoder
from rlhf.evaluation.inference import load_generator
from rlhf.labeling.config import CandidateConfig
from rlhf.models.loading import load_tokenizer, pick_placement, stop_token_ids
from rlhf.rl.decoding import generate
from rlhf.training.progress import Progress


@dataclass
class CandidateResult:
    """What generation produced, and what it could not."""

    pairs: list[dict]  # rows of the pairs file, in the prompts' order
    unusable: list[str] = field(default_factory=list)  # source (or index) of each prompt left out
    resampled: int = 0  # pairs sampled again because they came out identical or empty


def _call_seed(seed: int, batch: int, candidate: int, attempt: int) -> int:
    """A seed per generate call, so re-running one call (or one attempt) does not shift the others."""
    digest = hashlib.sha256(f"{seed}/{batch}/{candidate}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _usable(first: str, second: str) -> bool:
    return bool(first.strip()) and bool(second.strip()) and first.strip() != second.strip()


def generate_candidates(rows: list[dict], model_path: str, config: CandidateConfig,
                        model_name: str | None = None) -> CandidateResult:
    """Pairs-file rows for the prompt rows: prompt, pair_id, candidate_0, candidate_1 and the settings."""
    config.validate()
    placement = pick_placement(config.device)
    tokenizer = load_tokenizer(model_path)
    model = load_generator(model_path, None, placement)
    stop_ids = stop_token_ids(model, tokenizer)
    encoder = PromptEncoder.for_settings(tokenizer, config)
    prompts = [encoder.encode_prompt(r) for r in rows]
    # Batches of similar length waste fewer pad tokens; results go back in the input order.
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    found: dict[int, tuple[dict, list[bool], list[int], int]] = {}
    taken: set[str] = set()
    result = CandidateResult(pairs=[])
    progress = Progress(len(rows), "candidate generation", unit="prompt")
    for batch_number, first in enumerate(range(0, len(order), config.batch_size)):
        pending = order[first:first + config.batch_size]
        for attempt in range(config.max_attempts):
            texts, ended, seeds = [], [], []
            for candidate, temperature in enumerate(config.temperatures):
                seed = _call_seed(config.seed, batch_number, candidate, attempt)
                torch.manual_seed(seed)
                rollout = generate(model, [prompts[i] for i in pending], config.target_sequence_length,
                                   stop_ids, tokenizer.pad_token_id, temperature, config.top_p)
                texts.append([tokenizer.decode(c, skip_special_tokens=True).strip() for c in rollout.completions()])
                ended.append(rollout.ended.tolist())
                seeds.append(seed)
            retry = []
            for position, index in enumerate(pending):
                pair = {**prompt_fields(rows[index]), "candidate_0": texts[0][position],
                        "candidate_1": texts[1][position]}
                # The same prompt twice in the input may give the very same pair, which the pairs file
                # cannot hold twice (labels would not know which row they belong to).
                if _usable(pair["candidate_0"], pair["candidate_1"]) and pair_id(pair) not in taken:
                    taken.add(pair_id(pair))
                    found[index] = (pair, [ended[0][position], ended[1][position]], seeds, attempt + 1)
                else:
                    retry.append(index)
            if retry and attempt + 1 < config.max_attempts:
                result.resampled += len(retry)
            pending = retry
            if not pending:
                break
        done = min(first + config.batch_size, len(order))
        progress.update(done - first, unusable=done - len(found))
    progress.close()

    settings = {"model": model_name or model_path, "top_p": config.top_p,
                "target_sequence_length": config.target_sequence_length, "instruction": config.instruction}
    for index, row in enumerate(rows):
        if index not in found:
            result.unusable.append(row.get("source", f"prompt {index + 1}"))
            continue
        pair, ended, seeds, attempts = found[index]
        generation = {**settings, "temperatures": list(config.temperatures), "seeds": seeds, "ended": ended,
                      "attempts": attempts}
        source = {"source": row["source"]} if "source" in row else {}
        result.pairs.append({"pair_id": pair_id(pair), **pair, **source, "generation": generation})
    return result
