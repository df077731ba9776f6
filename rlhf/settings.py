"""What the stages' config dataclasses share (training, inference, candidate generation): the name each setting
goes by, its one-line doc, and checks that list every bad setting, named the way the user set it.

A config dataclass is the one definition of its stage's settings. Each field's trailing comment is its doc;
`parameter_names` gives the name users set it by: the pipeline parameter (GCPC's name where GCPC has one),
which is also the CLI flag (`--reward-model-batch-size`). The fields it leaves out go by their own names:
run options (`RUN_OPTIONS`: where a run goes and how it is watched) and a command's own options (how
`rlhf infer` samples), which only the CLI sets; the chat-template choice both set as `plain_text`.
"""

from __future__ import annotations

import inspect
import io
import os
import re
import tokenize
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import ClassVar

from rlhf.errors import UserError

Say = Callable[[str], str]

# Fields that change how a run is watched or where it runs, not its result: CLI flags only, left out of a
# run's fingerprint (a run resumes across them).
RUN_OPTIONS = ("checkpoint_every", "sample_every", "log_every", "device")
# Shared by every stage's prompts: the pipeline parameter and CLI flag `plain_text` sets `use_chat_template`.
PLAIN_TEXT = "plain_text"
SHARED_PARAMETERS = {"prompt_sequence_length": "prompt_sequence_length",
                     "target_sequence_length": "target_sequence_length", "instruction": "instruction", "seed": "seed"}

# A CPU's training precision: auto (bfloat16 where the CPU has AMX, else float32), float32 or bfloat16. An
# environment variable, not a parameter: it belongs to the machine, and the KFP local runner hands the
# environment to every stage.
CPU_PRECISION_VARIABLE = "RLHF_CPU_PRECISION"
CPU_PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_precision() -> str:
    chosen = os.environ.get(CPU_PRECISION_VARIABLE, "auto")
    if chosen not in CPU_PRECISIONS:
        raise UserError(f"{CPU_PRECISION_VARIABLE}={chosen}: must be one of {', '.join(CPU_PRECISIONS)}")
    return chosen


def chat_template_choice(plain_text: bool) -> bool | None:
    """`use_chat_template` for `plain_text`: never the chat template, or the tokenizer's when it has one."""
    return False if plain_text else None


class Settings:
    """Base of a stage's config dataclass: `stage` names it in messages, `stage_problems` checks its own fields."""

    stage: ClassVar[str]
    parameter_names: ClassVar[dict[str, str]]  # field -> pipeline parameter and CLI flag

    @classmethod
    def field_docs(cls) -> dict[str, str]:
        """Each field's one-line doc: the comment after it in the body of the class that declares it."""
        names = {f.name for f in fields(cls)}
        docs = {}
        for declaring in reversed([c for c in cls.__mro__ if "__dataclass_fields__" in vars(c)]):
            source = inspect.getsource(declaring)
            lines = source.splitlines()
            comments = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
                        if t.type == tokenize.COMMENT]
            for comment in comments:
                declared = re.match(r"\s+(\w+):", lines[comment.start[0] - 1])
                if declared and declared[1] in names:
                    docs[declared[1]] = comment.string.lstrip("#").strip()
        return docs

    @classmethod
    def from_values(cls, values: Mapping[str, object], plain_text: bool = False):
        """The config with these field values; `plain_text` makes the chat-template choice where the stage has
        one (unless `values` sets `use_chat_template` itself)."""
        chat = ({"use_chat_template": chat_template_choice(plain_text)}
                if "use_chat_template" in {f.name for f in fields(cls)} else {})
        return cls(**{**chat, **values})

    @classmethod
    def user_names(cls) -> dict[str, str]:
        """The name each field goes by where the user sets it: its parameter name, or its own for a CLI option."""
        return {f.name: cls.parameter_names.get(f.name, f.name) for f in fields(cls)}

    def stage_problems(self, say: Say) -> list[str]:
        raise NotImplementedError

    def problems(self, names: Mapping[str, str] = MappingProxyType({})) -> list[str]:
        """Every bad setting, one line each (empty when the settings are fine); `names` gives the name a field
        goes by where the user set it."""
        def say(setting: str) -> str:
            return f"{names.get(setting, setting)} {getattr(self, setting)}"

        return [f"{self.stage}: {problem}" for problem in self.stage_problems(say) + self.shared_problems(say)]

    def shared_problems(self, say: Say) -> list[str]:
        return []

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems))

    def below_one(self, fields: tuple[str, ...], say: Say) -> list[str]:
        return [f"{say(name)} must be at least 1" for name in fields if getattr(self, name) < 1]

    def sampling_problems(self, say: Say, temperatures: tuple[str, ...] = ("temperature",)) -> list[str]:
        found = [f"{say(name)} must be above 0" for name in temperatures if not _all_positive(getattr(self, name))]
        if not 0 < self.top_p <= 1:
            found.append(f"{say('top_p')} must be above 0 and at most 1")
        return found


def _all_positive(value: float | tuple[float, ...]) -> bool:
    return all(v > 0 for v in (value if isinstance(value, tuple) else (value,)))


@dataclass
class PromptSettings(Settings):
    """The settings of every stage that turns rows into prompts for the model, defined once (a stage's config
    dataclass takes them from here; their fields come first)."""

    prompt_sequence_length: int = 512  # prompt tokens kept (cut inside the input)
    target_sequence_length: int = 64  # completion tokens: generated at most, or kept of a given completion
    instruction: str = ""  # put before every input
    use_chat_template: bool | None = None  # None: the tokenizer's chat template when it has one
    device: str = "auto"  # auto (CUDA when present), cpu, cuda, cuda:N


class StageSettings(Settings):
    """A training stage's settings: the learning-rate multiplier and warm-up are checked here for both."""

    def shared_problems(self, say: Say) -> list[str]:
        found = []
        if self.learning_rate_multiplier <= 0:
            found.append(f"{say('learning_rate_multiplier')} must be above 0")
        if not 0 <= self.warmup_fraction < 1:
            found.append(f"{say('warmup_fraction')} must be at least 0 and below 1")
        return found
