"""Bulk inference's settings: one dataclass, the one definition of each (no torch, so the pipeline compiles
without it)."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.settings import SHARED_PARAMETERS, PromptSettings

SAMPLING_STRATEGIES = ("greedy", "temperature_sampling")


@dataclass
class InferenceConfig(PromptSettings):
    """Settings of bulk inference."""

    stage = "inference"
    parameter_names = {"batch_size": "inference_batch_size", "shard_weights": "inference_shard_weights",
                       **SHARED_PARAMETERS}

    batch_size: int = 8  # prompts per generate call
    sampling_strategy: str = "greedy"  # greedy, as Vertex's bulk inferrer, or temperature_sampling (GCPC's names)
    temperature: float = 1.0  # sampling temperature, when sampling
    top_p: float = 1.0  # nucleus sampling, when sampling
    seed: int = 0  # seed of the sampling
    shard_weights: bool = False  # split the weights over the stage's processes (FSDP), the evaluation's too: a model no GPU holds alone

    def stage_problems(self, say) -> list[str]:
        strategy = ([] if self.sampling_strategy in SAMPLING_STRATEGIES else
                    [f"{say('sampling_strategy')} must be one of {', '.join(SAMPLING_STRATEGIES)}"])
        return (self.below_one(("target_sequence_length", "prompt_sequence_length", "batch_size"), say)
                + self.sampling_problems(say) + strategy)

    @property
    def greedy(self) -> bool:
        return self.sampling_strategy == "greedy"
