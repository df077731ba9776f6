"""What the training stages' config dataclasses share: checks that list every bad setting, named the way the
user set it (the CLI's or the pipeline's names)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import ClassVar

from rlhf.errors import UserError

Say = Callable[[str], str]


class StageSettings:
    """Base of a stage's config dataclass: `stage` names it in messages, `stage_problems` checks its own fields;
    the learning-rate multiplier and warm-up are checked here for every stage."""

    stage: ClassVar[str]

    def stage_problems(self, say: Say) -> list[str]:
        raise NotImplementedError

    def problems(self, names: Mapping[str, str] = MappingProxyType({})) -> list[str]:
        """Every bad setting, one line each (empty when the settings are fine); `names` gives the name a field
        goes by where the user set it."""
        def say(setting: str) -> str:
            return f"{names.get(setting, setting)} {getattr(self, setting)}"

        found = self.stage_problems(say)
        if self.learning_rate_multiplier <= 0:
            found.append(f"{say('learning_rate_multiplier')} must be above 0")
        if not 0 <= self.warmup_fraction < 1:
            found.append(f"{say('warmup_fraction')} must be at least 0 and below 1")
        return [f"{self.stage}: {problem}" for problem in found]

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems))

    def below_one(self, fields: tuple[str, ...], say: Say) -> list[str]:
        return [f"{say(name)} must be at least 1" for name in fields if getattr(self, name) < 1]
