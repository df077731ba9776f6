"""How the datasets are read and split: one dataclass, the one definition of each setting."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.data.validation import OnInvalid
from rlhf.settings import Settings


@dataclass
class DataConfig(Settings):
    """How the datasets are read and what is held out of them."""

    stage = "data"
    parameter_names = {"on_invalid": "on_invalid", "eval_fraction": "eval_fraction", "seed": "seed"}

    on_invalid: OnInvalid = "fail"  # fail on an invalid row, or skip it (either way each is named by file and line)
    eval_fraction: float = 0.1  # share of prompts held out when the eval dataset has no pairs
    seed: int = 0  # seed of the held-out split

    def stage_problems(self, say) -> list[str]:
        found = [] if self.on_invalid in ("fail", "skip") else [f"{say('on_invalid')} must be fail or skip"]
        if not 0 < self.eval_fraction < 1:
            found.append(f"{say('eval_fraction')} must be above 0 and below 1")
        return found
