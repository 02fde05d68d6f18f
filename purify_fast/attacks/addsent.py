"""AddSent (Dai et al. 2019): a fixed trigger sentence inserted at a random word position."""

from __future__ import annotations

import random
from dataclasses import dataclass

from purify_fast.attacks.badnets import TriggerAttack, insert_at_word, word_count

DEFAULT_SENTENCE = "I watch this 3D movie"


@dataclass(frozen=True)
class AddSent(TriggerAttack):
    """Insert ``sentence`` (as a whole) at a uniformly random word boundary."""

    sentence: str = DEFAULT_SENTENCE

    name = "addsent"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.sentence, str) or not self.sentence.strip():
            raise ValueError(f"sentence must be a non-empty string, got {self.sentence!r}")

    def insert(self, text: str, rng: random.Random) -> str:
        return insert_at_word(text, " ".join(self.sentence.split()),
                              rng.randint(0, word_count(text)))

    @property
    def trigger_words(self) -> tuple[str, ...]:
        return tuple(self.sentence.split())

    def trigger_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the whole sentence in ``text`` (as inserted: its words one space
        apart); a part of it is no trigger."""
        needle = " ".join(self.sentence.split())
        spans, at = [], text.find(needle)
        while at >= 0:
            spans.append((at, at + len(needle)))
            at = text.find(needle, at + 1)
        return spans
