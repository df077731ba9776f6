"""Prompt formatting and tokenisation with counted truncation.

A prompt row (`input_text` or chat `messages`) becomes the text the model sees: the instruction goes
before the input (the last user turn), then the tokenizer's chat template renders the conversation with
the generation prompt, or, when there is no template or plain text is forced, the text is used as is.

Too-long prompts are cut inside the input, never at the ends, so the instruction, the template's framing
and the generation prompt always survive; completions are cut at the end. Both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf.errors import UserError
from rlhf.settings import PromptSettings


@dataclass(frozen=True)
class PromptFormat:
    instruction: str = ""  # put before every input, e.g. "Summarize in less than 50 words."
    use_chat_template: bool | None = None  # None: the tokenizer's chat template when it has one


@dataclass
class TruncationCounts:
    prompts: int = 0
    prompts_truncated: int = 0
    prompt_tokens_dropped: int = 0
    completions: int = 0
    completions_truncated: int = 0
    completion_tokens_dropped: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class PromptEncoder:
    """Encodes prompts and completions for one tokenizer, counting what truncation removed."""

    tokenizer: object
    prompt_format: PromptFormat = PromptFormat()
    prompt_sequence_length: int = PromptSettings.prompt_sequence_length
    target_sequence_length: int = PromptSettings.target_sequence_length
    counts: TruncationCounts = field(default_factory=TruncationCounts)

    def __post_init__(self):
        for name in ("prompt_sequence_length", "target_sequence_length"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def for_settings(cls, tokenizer, settings) -> PromptEncoder:
        """The encoder a stage's settings describe: their instruction, chat-template choice and lengths."""
        return cls(tokenizer, PromptFormat(settings.instruction, settings.use_chat_template),
                   settings.prompt_sequence_length, settings.target_sequence_length)

    @property
    def uses_chat_template(self) -> bool:
        wanted = self.prompt_format.use_chat_template
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if wanted and not has_template:
            raise UserError("use_chat_template is on but the tokenizer has no chat template")
        return has_template if wanted is None else wanted

    def messages(self, row: dict, user_input: str | None = None) -> list[dict]:
        """The conversation for a row, with the instruction before the input (the last user turn)."""
        if "messages" in row:
            conversation = [dict(m) for m in row["messages"]]
        else:
            conversation = [{"role": "user", "content": row["input_text"]}]
        if user_input is not None:
            conversation[-1]["content"] = user_input
        if self.prompt_format.instruction:
            conversation[-1]["content"] = f"{self.prompt_format.instruction}\n{conversation[-1]['content']}"
        return conversation

    def render(self, row: dict, user_input: str | None = None) -> str:
        conversation = self.messages(row, user_input)
        if self.uses_chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        if len(conversation) == 1:
            return conversation[0]["content"]
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in conversation]
        return "\n\n".join(turns) + "\n\nAssistant:"

    def _ids(self, text: str) -> list[int]:
        # A chat template writes its own special tokens; plain text gets the tokenizer's (e.g. BOS).
        return self.tokenizer(text, add_special_tokens=not self.uses_chat_template)["input_ids"]

    def encode_prompt(self, row: dict) -> list[int]:
        """Token ids of the rendered prompt, at most `prompt_sequence_length` long."""
        limit = self.prompt_sequence_length
        ids = self._ids(self.render(row))
        self.counts.prompts += 1
        if len(ids) <= limit:
            return ids
        user_input = row["messages"][-1]["content"] if "messages" in row else row["input_text"]
        input_ids = self.tokenizer(user_input, add_special_tokens=False)["input_ids"]
        overflow = len(ids) - limit
        while True:
            keep = len(input_ids) - overflow
            if keep < 1:
                raise UserError(f"prompt_sequence_length={limit} leaves no room for the input: the template "
                                 f"and instruction alone take {len(ids) - len(input_ids)} tokens")
            shortened = self._ids(self.render(row, self.tokenizer.decode(input_ids[:keep])))
            if len(shortened) <= limit:
                break
            # Re-tokenising the cut text can merge differently; cut a little more and try again.
            overflow += len(shortened) - limit
        self.counts.prompts_truncated += 1
        self.counts.prompt_tokens_dropped += len(ids) - len(shortened)
        return shortened

    def encode_completion(self, text: str) -> list[int]:
        """Completion ids ending with EOS, or cut to `target_sequence_length` with no EOS when too long."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.counts.completions += 1
        limit = self.target_sequence_length
        if len(ids) + 1 <= limit:
            return ids + [self.tokenizer.eos_token_id]
        self.counts.completions_truncated += 1
        self.counts.completion_tokens_dropped += len(ids) + 1 - limit
        return ids[:limit]
