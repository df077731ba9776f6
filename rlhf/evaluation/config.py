"""Bulk inference's settings: one dataclass, the one definition of each (no torch, so the pipeline compiles
without it)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.settings import SHARED_PARAMETERS, PromptSettings


@dataclass
class InferenceConfig(PromptSettings):
    """Settings of bulk inference."""

    stage = "inference"
    parameter_names = {"batch_size": "inference_batch_size", **SHARED_PARAMETERS}

    batch_size: int = 8  # prompts per generate call
    sample: bool = False  # sample instead of decoding greedily (Vertex's bulk inferrer is greedy)
    temperature: float = 1.0  # sampling temperature, when sampling
    top_p: float = 1.0  # nucleus sampling, when sampling
    seed: int = 0  # seed of the sampling

    def stage_problems(self, say) -> list[str]:
        return (self.below_one(("target_sequence_length", "prompt_sequence_length", "batch_size"), say)
                + self.sampling_problems(say))
