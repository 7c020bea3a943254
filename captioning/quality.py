"""Caption checks: what each source's caption is stored as, its flags, and a shard's caption stats.

Flags (in this order):

* ``empty`` — no word at all (None, blank, only punctuation): always dropped, no other flag;
* ``repetition`` — degenerate repetition: at least ``max_repeated_fraction`` of the words lie inside an
  n-gram (n = 1..4) that is immediately repeated ("a man a man a man", "smiling smiling smiling");
  words that recur apart ("a man in a hat") never count;
* ``multiple_people`` — the caption mentions more than one person (see :data:`MULTIPLE_PEOPLE`);
* ``truncated_t5`` — longer than ``t5_max_tokens``: the stored text is cut to that budget;
* ``over_clip`` — longer than ``clip_max_tokens``: kept (CLIP truncates at train time), flagged.

Flags named in ``drop`` store null instead of the caption. Token counts include each model's special
tokens (CLIP: start and end, T5: end), so the budgets mean FLUX's ``max_length`` values. With
``tokenizers`` set they are the real tokenizers' counts and the cut falls on a token boundary; without,
every word and every punctuation mark counts as one token (real tokenizers split long or rare words
further, so this undercounts) and the cut falls after a whole word or mark.
"""

from __future__ import annotations

import functools
import itertools
import re
from bisect import bisect_right
from collections import Counter
from typing import Any

from captioning.config import CaptionQuality

WORD = re.compile(r"\w+(?:['’]\w+)*")
"""A word: letters/digits, with inner apostrophes ("woman's")."""
APPROXIMATE_TOKEN = re.compile(r"\w+|[^\w\s]")
"""One token of the approximate count: a run of letters/digits, or one punctuation mark."""
REPEAT_MAX_N = 4

_PERSON = (
    r"(?:man|woman|boy|girl|person|child|kid|baby|lady|guy|gentleman|teenager|friend|wife|husband|son|"
    r"daughter|mother|father|mom|dad|brother|sister|partner|boyfriend|girlfriend)"
)
_PEOPLE = (
    r"(?:people|persons|men|women|boys|girls|children|kids|babies|ladies|guys|gentlemen|teenagers|teens|"
    r"friends|adults|individuals|siblings|brothers|sisters|twins|couples|families|parents)"
)
_RELATIVE = (
    r"(?:friend|wife|husband|son|daughter|child|kid|mother|father|mom|dad|brother|sister|partner|"
    r"boyfriend|girlfriend)"
)
_NOUN_END = r"\b(?!['’]s|-)"  # not "a man's hat", "a child-like smile"
MULTIPLE_PEOPLE = re.compile(
    "|".join(
        [
            rf"\b{_PEOPLE}\b",  # "two women", "a group of people"
            r"\b(?:crowds?|audience|family|group (?:photo|shot|portrait|picture)|they|them|each other)\b",
            r"\bcouple\b(?!\s+of\b)",  # "a young couple", not "a couple of flowers"
            rf"\b{_PERSON}\s+and\s+(?:(?:a|an|the|another|his|her|their)\s+)?(?:\w+\s+)?{_PERSON}"
            + _NOUN_END,  # "a man and a young woman"
            rf"\b(?:another|second|other|two|three)\s+(?:\w+\s+)?{_PERSON}{_NOUN_END}",
            rf"\bwith\s+(?:a|an|his|her|their)\s+(?:\w+\s+)?{_RELATIVE}{_NOUN_END}",  # "with her son"
            rf"\b(?:holding|carrying|hugging|kissing)\s+(?:a|an|the|his|her|their)\s+(?:\w+\s+)?{_PERSON}"
            + _NOUN_END,  # "holding a baby"
        ]
    ),
    re.IGNORECASE,
)
"""Phrases naming more than one person: plural person nouns, group words, two person nouns joined by
"and", "another/second/two <person>", "with a/his/her <relative>", "holding/hugging a <person>", and
"they"/"them". A word list misses what it does not name ("a man next to a woman", "the bride and
groom") and flags the singular "they" and plurals in other roles ("women's clothing"); "a person",
"a woman's face", "a baby face" and "a man with a child's toy" are not flagged."""

LENGTH_BIN_EDGES = (0, 5, 10, 20, 40, 80, 160)
"""Lower edges of the word-count bins of :func:`caption_stats`; the last bin is open-ended."""


def words(text: str) -> list[str]:
    """The lowercase words of ``text``."""
    return WORD.findall(text.lower())


def repeated_fraction(text: str) -> float:
    """Share of the words that lie inside an n-gram (n <= :data:`REPEAT_MAX_N`) repeated right after
    itself."""
    found = words(text)
    covered: set[int] = set()
    for n in range(1, REPEAT_MAX_N + 1):
        for start in range(len(found) - 2 * n + 1):
            if found[start : start + n] == found[start + n : start + 2 * n]:
                covered.update(range(start, start + 2 * n))
    return len(covered) / len(found) if found else 0.0


CLIP_SPECIAL_TOKENS = 2
T5_SPECIAL_TOKENS = 1


class TokenBudget:
    """Counts a model's tokens for a text and cuts a text to a budget of tokens (special ones included)."""

    def __init__(self, special_tokens: int, tokenizer: Any | None = None):
        """``tokenizer``: a fast transformers tokenizer, or None for the approximate count."""
        self.special_tokens = special_tokens
        self.tokenizer = tokenizer

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Character span of every token of ``text`` (special tokens excluded)."""
        if self.tokenizer is None:
            return [match.span() for match in APPROXIMATE_TOKEN.finditer(text)]
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [tuple(span) for span in encoded["offset_mapping"]]

    def count(self, text: str) -> int:
        return len(self.spans(text)) + self.special_tokens

    def cut(self, text: str, budget: int) -> str | None:
        """``text`` cut after the last token that fits in ``budget``; None when it fits whole."""
        spans = self.spans(text)
        keep = max(budget - self.special_tokens, 0)
        if len(spans) <= keep:
            return None
        return text[: spans[keep - 1][1] if keep else 0].rstrip()


class CaptionChecker:
    """Applies the :class:`CaptionQuality` checks to captions (tokenizers load on first use)."""

    def __init__(self, settings: CaptionQuality):
        self.settings = settings

    @functools.cached_property
    def _budgets(self) -> tuple[TokenBudget, TokenBudget]:
        """(CLIP, T5) token budgets."""
        folder = self.settings.tokenizers
        if folder is None:
            return TokenBudget(CLIP_SPECIAL_TOKENS), TokenBudget(T5_SPECIAL_TOKENS)
        from transformers import CLIPTokenizerFast, T5TokenizerFast

        clip = CLIPTokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True)
        t5 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        clip_budget = TokenBudget(clip.num_special_tokens_to_add(), clip)
        return clip_budget, TokenBudget(t5.num_special_tokens_to_add(), t5)

    def check(self, text: str | None) -> tuple[str | None, list[str]]:
        """The caption to store (None when dropped) and its flags, for a raw caption."""
        text = " ".join((text or "").split())
        if not WORD.search(text):
            return None, ["empty"]
        flags = []
        if repeated_fraction(text) >= self.settings.max_repeated_fraction:
            flags.append("repetition")
        if MULTIPLE_PEOPLE.search(text):
            flags.append("multiple_people")
        clip, t5 = self._budgets
        cut = t5.cut(text, self.settings.t5_max_tokens)
        if cut is not None:
            flags.append("truncated_t5")
            text = cut
        if clip.count(text) > self.settings.clip_max_tokens:
            flags.append("over_clip")
        # a cut to a budget of a token or two can leave no word: nothing worth storing
        dropped = not WORD.search(text) or any(flag in self.settings.drop for flag in flags)
        return (None if dropped else text), flags


def caption_stats(rows: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """Per source, over a shard's caption rows: captions ``count`` (stored), ``dropped`` (null with flags:
    the checks dropped it), ``missing`` (null without flags: the source gave nothing), ``flags`` (count
    per flag, stored or dropped), ``length_histogram`` (stored captions by word count, bins named by
    :data:`LENGTH_BIN_EDGES`), ``vocabulary`` (distinct lowercase words) and ``mean_words``."""
    bins = [f"{low}-{high - 1}" for low, high in itertools.pairwise(LENGTH_BIN_EDGES)]
    bins.append(f"{LENGTH_BIN_EDGES[-1]}+")
    stats = {}
    for source in sources:
        flag_counts: Counter[str] = Counter()
        histogram = [0] * len(bins)
        vocabulary: set[str] = set()
        stored = dropped = word_total = 0
        for row in rows:
            flags = (row.get("flags") or {}).get(source, [])
            flag_counts.update(flags)
            text = row.get(source)
            if text is None:
                dropped += bool(flags)
                continue
            found = words(text)
            stored += 1
            word_total += len(found)
            vocabulary.update(found)
            histogram[bisect_right(LENGTH_BIN_EDGES, len(found)) - 1] += 1
        stats[source] = {
            "count": stored,
            "dropped": dropped,
            "missing": len(rows) - stored - dropped,
            "flags": dict(sorted(flag_counts.items())),
            "length_histogram": {"bins": bins, "counts": histogram},
            "vocabulary": len(vocabulary),
            "mean_words": round(word_total / stored, 3) if stored else 0.0,
        }
    return stats
