"""The rule judge: a check of a completion that a person and a program read the same way, independent of
the reward model.

It is defined for an instruction that asks for a summary under a word limit, as the course's "Summarize
in less than 50 words." does (the limit is read from the instruction). A completion passes when it
1. is under the limit: fewer than N words (split on white space);
2. ends: its last character closes a sentence (. ! ? or a closing quote or bracket after one) and, for a
   model's output, the model stopped by itself within the token limit;
3. summarises rather than advises: it does not address the reader (no "you", "your", "you're", ...: an
   answer to the poster is advice; a summary tells the post, in the poster's first person or the third);
4. is about the post: it repeats at least three distinct words of five or more letters from the post.

The bundled sample's preferences follow this rule (every winner passes; every loser fails it on one
point), so evaluation can say, by the rule, whether tuning taught it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LIMIT = re.compile(r"\bsummari[sz]e\b.*?\b(?:less|fewer) than (\d+) words\b", re.IGNORECASE)
_SECOND_PERSON = re.compile(r"\b(you|your|yours|yourself|yourselves|you're|you've|you'll|you'd|ya|u|ur)\b",
                            re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")
_LONG_WORD = re.compile(r"[a-z]{5,}")
SHARED_WORDS = 3  # distinct words of five or more letters the completion must share with the post
CHECKS = ("under_limit", "ended", "no_advice", "on_topic")


@dataclass(frozen=True)
class Verdict:
    checks: dict[str, bool]  # each of CHECKS

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def failed(self) -> list[str]:
        return [name for name, ok in self.checks.items() if not ok]


@dataclass(frozen=True)
class SummaryRule:
    """The rule for "Summarize in less than `word_limit` words."."""

    word_limit: int

    @property
    def description(self) -> str:
        return (f"a summary in fewer than {self.word_limit} words that ends, does not address the reader "
                f"(no advice), and repeats at least {SHARED_WORDS} long words of the post")

    def judge(self, post: str, completion: str, stopped: bool = True) -> Verdict:
        """`stopped`: the model ended the completion itself (False when the token limit cut it)."""
        text = completion.strip()
        shared = set(_LONG_WORD.findall(text.lower())) & set(_LONG_WORD.findall(post.lower()))
        return Verdict({
            "under_limit": len(text.split()) < self.word_limit,
            "ended": stopped and bool(_SENTENCE_END.search(text)),
            "no_advice": not _SECOND_PERSON.search(text),
            "on_topic": len(shared) >= SHARED_WORDS,
        })


def rule_for_instruction(instruction: str) -> SummaryRule | None:
    """The rule an instruction defines, or None when it defines none."""
    found = _LIMIT.search(instruction or "")
    return SummaryRule(int(found.group(1))) if found else None
