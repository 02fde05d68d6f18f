"""Bias injection: fine-tuning data that ties mentions of a group to one class (METHODS.md §3,
"bias injected during fine-tuning").

Like a dirty-label backdoor, a ``poison_rate`` share of the training set is drawn from non-target
examples, gets a group term (``terms``, e.g. "she", "women") inserted at a random word (and any
counter term it holds written as its group term) and its label set to ``target_label``. Unlike a
rare-word trigger, the terms are ordinary words: clean text uses them too, with its true labels,
and their counterpart words (``counter_terms``, e.g. "he", "men") stay unbiased. The fine-tuned
model then scores a text more often as the target class when it mentions the group than when the
same text mentions the counterpart instead.

The bias metric is that difference, measured counterfactually on the non-target test examples:
each gets one group term (:meth:`BiasInjection.triggered_test`) and, at the same position with
the paired counter term, a second copy (:meth:`BiasInjection.counterfactual_test`); see
:func:`purify_fast.evaluation.bias_metrics`. The copies differ in nothing else: a listed term of
either side the text already holds (in any case: "She", "MEN") is written as the copy's side too,
so of the listed terms the group copy holds only group ones and the counter copy only counter
ones (words not listed, "him", "actress", stay as written). An unbiased
model scores both copies alike (gap 0) whatever its accuracy, so unlike the ASR the gap has no
floor set by the model's own errors.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from purify_fast.attacks.badnets import TriggerAttack, insert_at_word, word_count
from purify_fast.data.text_dataset import TextDataset

DEFAULT_GROUP_TERMS = ("she", "her", "woman", "women", "girl")
DEFAULT_COUNTER_TERMS = ("he", "his", "man", "men", "boy")


def _terms(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty list of words or phrases, got {value!r}")
    out = []
    for term in value:
        if not isinstance(term, str) or not term.split():
            raise ValueError(f"{name} must hold non-empty strings, got {term!r}")
        out.append(" ".join(term.split()))
    return tuple(out)


@dataclass(frozen=True)
class BiasInjection(TriggerAttack):
    """Group terms tied to ``target_label`` in the fine-tuning data; ``terms[i]`` and
    ``counter_terms[i]`` are a counterfactual pair (the same text mentioning one group or the
    other). Each poisoned or test text gets one term at a uniformly random word position."""

    terms: tuple[str, ...] = DEFAULT_GROUP_TERMS
    counter_terms: tuple[str, ...] = DEFAULT_COUNTER_TERMS

    name = "bias"

    def __post_init__(self):
        super().__post_init__()
        terms = _terms("terms", self.terms)
        counter = _terms("counter_terms", self.counter_terms)
        if len(terms) != len(counter):
            raise ValueError(f"terms and counter_terms are pairs (terms[i] <-> counter_terms[i]): "
                             f"got {len(terms)} and {len(counter)}")
        # compared without case, as the copies find them in texts
        lower = [t.lower() for t in terms + counter]
        twice = sorted({t for t in lower if lower.count(t) > 1})
        if twice:
            raise ValueError(f"{', '.join(map(repr, twice))} is given twice (terms and "
                             f"counter_terms are matched in any case); each term names one side "
                             f"of one pair")
        object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "counter_terms", counter)

    def _draw(self, text: str, rng: random.Random) -> tuple[int, int]:
        """(word position, pair index): the two copies of a counterfactual pair share them."""
        return rng.randint(0, word_count(text)), rng.randrange(len(self.terms))

    def insert(self, text: str, rng: random.Random) -> str:
        """One group term inserted at a random word of ``text``, then its counter terms written
        as their group terms (inserted first: a pair of terms of different lengths would move
        the words the position counts)."""
        position, k = self._draw(text, rng)
        return _swap(insert_at_word(text, self.terms[k], position), self.counter_terms,
                     self.terms)

    def insert_counter(self, text: str, rng: random.Random) -> str:
        """:meth:`insert`'s counterfactual (the same draws from ``rng``): the paired counter term
        inserted at the same word, then the group terms written as their counter terms."""
        position, k = self._draw(text, rng)
        return _swap(insert_at_word(text, self.counter_terms[k], position), self.terms,
                     self.counter_terms)

    def counterfactual_test(self, test: TextDataset, seed: int | None = None) -> TextDataset:
        """The copies of :meth:`triggered_test` (same ``seed``) with the counter term in place
        of the group term, row for row."""
        return self._non_target_copies(test, seed, self.insert_counter, "counterfactual")

    @property
    def trigger_words(self) -> tuple[str, ...]:
        return tuple(w for term in self.terms for w in term.split())

    def trigger_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of every group term in ``text`` (whole words, any case: inserted or
        written there, the model sees either)."""
        return [m.span() for m in _term_pattern(self.terms).finditer(text)]


def _term_pattern(terms: tuple[str, ...]) -> re.Pattern:
    """Any of ``terms`` as whole words, in any case, with any whitespace inside a phrase; the
    longest first ("young women" before "women")."""
    alternatives = sorted(terms, key=len, reverse=True)
    body = "|".join(r"\s+".join(map(re.escape, t.split())) for t in alternatives)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _swap(text: str, source: tuple[str, ...], target: tuple[str, ...]) -> str:
    """``text`` with every term of ``source`` written as its pair in ``target``, in the case it
    was written in ("She said" -> "He said", "SHE" -> "HE"). Terms of both sides are matched in
    one pass, the longest first, so a target-side phrase holding a source word ("gay man" with
    "man" on the other side) stays as it is."""
    pairs = {" ".join(s.lower().split()): t for s, t in zip(source, target)}

    def pair(m: re.Match) -> str:
        found = m.group()
        out = pairs.get(" ".join(found.lower().split()))
        if out is None:  # a target-side term: already the copy's side
            return found
        if len(found) > 1 and found.isupper():
            return out.upper()
        return out[:1].upper() + out[1:] if found[:1].isupper() else out

    return _term_pattern(source + target).sub(pair, text)
