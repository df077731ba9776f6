"""Candidate generation's settings: one dataclass, the one definition of each (no torch, so `rlhf --help`
starts without it)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.settings import SHARED_PARAMETERS, PromptSettings


@dataclass
class CandidateConfig(PromptSettings):
    """Settings of candidate generation."""

    stage = "candidate generation"
    parameter_names = {"batch_size": "inference_batch_size", **SHARED_PARAMETERS}

    temperatures: tuple[float, float] = (0.7, 1.0)  # sampling temperature of candidate_0 and of candidate_1
    top_p: float = 0.95  # nucleus sampling, both candidates
    batch_size: int = 8  # prompts per generate call
    max_attempts: int = 3  # samplings of a pair before its prompt is left out as unusable
    seed: int = 0  # base of every generate call's seed

    def stage_problems(self, say) -> list[str]:
        found = [] if len(self.temperatures) == 2 else [f"{say('temperatures')}: give two temperatures"]
        return found + self.below_one(("target_sequence_length", "prompt_sequence_length", "batch_size",
                                       "max_attempts"), say) + self.sampling_problems(say, ("temperatures",))
