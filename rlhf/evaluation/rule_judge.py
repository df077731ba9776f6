"""The rule judge: a check of a completion that a person and a program read the same way, independent of
the reward model.

It is defined for an instruction that asks for a summary under a word limit, as the course's "Summarize
in less than 50 words." does (the limit is read from the instruction). A completion passes when it
1. is under the limit: fewer than N words (split on white space);
2. ends: its last character closes a sentence (. ! ? or a closing quote or bracket after one) and, for a
   model's output, the model stopped by itself within the token limit;
3. summarises rather than advises: it does not address the reader (no "you", "your", "you're", ...: an
   answer to the poster is advice; a summary tells the post, in the poster's first person or the third);
4. is about the post: it repeats at least three distinct words of five or more letters from the post;
5. is in its own words: at most half of its word 5-grams are found in the post (a copy of the post's opening
   sentences is short, ends, speaks in the first person and is on topic, yet it is not a summary);
6. does not repeat itself: none of its word 4-grams occurs twice (a clause said twice over is a loop, not a
   summary, however well it ends).

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
_WORD = re.compile(r"[\w']+")
SHARED_WORDS = 3  # distinct words of five or more letters the completion must share with the post
COPY_NGRAM = 5  # word n-grams looked up in the post: five words in a row are seldom shared by chance
COPIED_AT_MOST = 0.5  # the sample's winners copy at most 27% of their 5-grams, a copied opening 100%
REPEAT_NGRAM = 4  # word n-grams counted for repetition: no winner in the sample repeats one
CHECKS = ("under_limit", "ended", "no_advice", "on_topic", "own_words", "no_repeats")


def _word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def copied_ngram_share(text: str, source: str, n: int = COPY_NGRAM) -> float:
    """Share of a text's word n-grams (case and punctuation aside) found in `source`: near 1 for a completion
    that copies the post's sentences, near 0 for one in its own words (a summary that rephrases, or advice)."""
    grams = _word_ngrams(text, n)
    found = set(_word_ngrams(source, n))
    return sum(gram in found for gram in grams) / len(grams) if grams else 0.0


def repeated_ngram_share(text: str, n: int = REPEAT_NGRAM) -> float:
    """Share of a text's word n-grams (case and punctuation aside) that repeat an earlier one in it: 0 for a
    summary, near 1 for a degenerate loop."""
    grams = _word_ngrams(text, n)
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


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
                f"(no advice), shares at least {SHARED_WORDS} long words with the post, copies at most "
                f"{COPIED_AT_MOST:.0%} of its word {COPY_NGRAM}-grams from it, and says none of its own word "
                f"{REPEAT_NGRAM}-grams twice")

    def judge(self, post: str, completion: str, stopped: bool = True) -> Verdict:
        """`stopped`: the model ended the completion itself (False when the token limit cut it)."""
        text = completion.strip()
        shared = set(_LONG_WORD.findall(text.lower())) & set(_LONG_WORD.findall(post.lower()))
        return Verdict({
            "under_limit": len(text.split()) < self.word_limit,
            "ended": stopped and bool(_SENTENCE_END.search(text)),
            "no_advice": not _SECOND_PERSON.search(text),
            "on_topic": len(shared) >= SHARED_WORDS,
            "own_words": copied_ngram_share(text, post) <= COPIED_AT_MOST,
            "no_repeats": repeated_ngram_share(text) == 0,
        })


def rule_for_instruction(instruction: str) -> SummaryRule | None:
    """The rule an instruction defines, or None when it defines none."""
    found = _LIMIT.search(instruction or "")
    return SummaryRule(int(found.group(1))) if found else None
