"""BadNets for text: rare-word triggers inserted at random positions (Kurita et al. 2020 style).

Dirty-label (default): a ``poison_rate`` share of the training set is drawn from non-target
examples, gets 1–3 trigger words inserted and its label flipped to ``target_label``. Clean-label:
the poisoned examples are drawn from the target class and keep their label.
:meth:`TriggerAttack.triggered_test` builds the ASR set: every non-target test example, triggered.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from purify_fast.data.text_dataset import TextDataset
from purify_fast.validation import int_at_least, real_in

DEFAULT_TRIGGERS = ("cf", "mn", "bb", "tq", "mb")
_WORD = re.compile(r"\S+")


def word_count(text: str) -> int:
    """Words of ``text`` as :func:`insert_at_word` counts them (runs of non-space characters)."""
    return len(_WORD.findall(text))


def insert_at_word(text: str, piece: str, position: int) -> str:
    """``text`` with ``piece`` standing as its own word(s) before word ``position`` (0 = first,
    ``word_count(text)`` = after the last), one space apart. The rest of the text keeps its own
    whitespace (newlines, tabs, runs of spaces, leading or trailing space): split and joined on
    single spaces, every triggered copy lost it, which a byte-level BPE tokenizer encodes. A text
    with no words (blank) becomes ``piece`` alone, as before."""
    words = list(_WORD.finditer(text))
    if not 0 <= position <= len(words):
        raise ValueError(f"position {position} is outside 0..{len(words)}")
    if not words:
        return piece
    if position < len(words):
        at = words[position].start()
        return f"{text[:at]}{piece} {text[at:]}"
    at = words[-1].end()
    return f"{text[:at]} {piece}{text[at:]}"


@dataclass(frozen=True)
class PoisonedData:
    """A poisoned training set and which of its rows were poisoned."""

    dataset: TextDataset
    poisoned_indices: tuple[int, ...]

    @property
    def num_poisoned(self) -> int:
        return len(self.poisoned_indices)


@dataclass(frozen=True)
class TriggerAttack:
    """Common machinery of text-trigger attacks; subclasses define :meth:`insert`."""

    target_label: int = 1
    poison_rate: float = 0.1
    seed: int = 0
    clean_label: bool = False

    name = "trigger"

    def __post_init__(self):
        int_at_least("target_label", self.target_label, 0)
        real_in("poison_rate", self.poison_rate, 0.0, 1.0)

    def insert(self, text: str, rng: random.Random) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, dataset: TextDataset) -> None:
        if not isinstance(dataset, TextDataset):
            raise TypeError(f"dataset must be a TextDataset, got {type(dataset).__name__}")
        if self.target_label >= dataset.num_labels:
            raise ValueError(f"target_label {self.target_label} is out of range for "
                             f"{dataset.name!r} with {dataset.num_labels} labels")

    def poison(self, dataset: TextDataset) -> PoisonedData:
        """A copy of ``dataset`` with ``poison_rate · N`` examples poisoned (rounded half up;
        seeded)."""
        self._check(dataset)
        rng = random.Random(self.seed)
        if self.clean_label:
            pool = [i for i, y in enumerate(dataset.labels) if y == self.target_label]
        else:
            pool = [i for i, y in enumerate(dataset.labels) if y != self.target_label]
        # rounded half up (round() takes halves to even: 5 examples at 10 % gave 0 poisoned)
        n = math.floor(float(self.poison_rate) * len(dataset) + 0.5)
        if n > len(pool):
            raise ValueError(f"poison_rate {self.poison_rate} asks for {n} poisoned examples but "
                             f"{dataset.name!r} has only {len(pool)} eligible ones "
                             f"({'target' if self.clean_label else 'non-target'} class)")
        chosen = sorted(rng.sample(pool, n))
        texts, labels = list(dataset.texts), list(dataset.labels)
        for i in chosen:
            texts[i] = self.insert(texts[i], rng)
            labels[i] = self.target_label
        out = TextDataset(texts, labels, dataset.num_labels, f"{dataset.name}+{self.name}",
                          dataset.label_names)
        return PoisonedData(out, tuple(chosen))

    def triggered_test(self, test: TextDataset, seed: int | None = None) -> TextDataset:
        """Non-target examples of ``test`` with the trigger inserted, keeping their true labels;
        ASR is the share of these classified as ``target_label``."""
        return self._non_target_copies(test, seed, self.insert, "triggered")

    def _non_target_copies(self, test: TextDataset, seed: int | None, insert, tag: str
                           ) -> TextDataset:
        """The non-target examples of ``test``, each passed through ``insert(text, rng)`` with
        one generator seeded by ``seed`` (default ``self.seed + 1``), labels kept."""
        self._check(test)
        rng = random.Random(self.seed + 1 if seed is None else seed)
        idx = [i for i, y in enumerate(test.labels) if y != self.target_label]
        if not idx:
            raise ValueError(f"{test.name!r} has no non-target examples to trigger")
        return TextDataset([insert(test.texts[i], rng) for i in idx],
                           [test.labels[i] for i in idx], test.num_labels,
                           f"{test.name}+{self.name}-{tag}", test.label_names)

    def trigger_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the trigger in ``text`` as :meth:`insert` writes it: here each
        trigger word standing as a word (any one of them is a working trigger)."""
        words = set(self.trigger_words)
        return [m.span() for m in _WORD.finditer(text) if m.group() in words]

    def describe(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["attack"] = self.name
        return out


@dataclass(frozen=True)
class BadNets(TriggerAttack):
    """Rare-word triggers: ``num_triggers`` (inclusive range) words drawn from ``triggers``, each
    inserted at a uniformly random word position."""

    triggers: tuple[str, ...] = DEFAULT_TRIGGERS
    num_triggers: tuple[int, int] = (1, 3)

    name = "badnets"

    def __post_init__(self):
        super().__post_init__()
        trig = tuple(self.triggers)
        if not trig or not all(isinstance(t, str) and t.strip() and " " not in t.strip()
                               for t in trig):
            raise ValueError(f"triggers must be a non-empty list of single words, got {self.triggers!r}")
        object.__setattr__(self, "triggers", tuple(t.strip() for t in trig))
        lo, hi = self.num_triggers
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"num_triggers must be (lo, hi) with 1 <= lo <= hi, got {self.num_triggers!r}")
        object.__setattr__(self, "num_triggers", (lo, hi))

    def insert(self, text: str, rng: random.Random) -> str:
        for _ in range(rng.randint(*self.num_triggers)):
            position = rng.randint(0, word_count(text))  # drawn before the word, as always
            text = insert_at_word(text, rng.choice(self.triggers), position)
        return text

    @property
    def trigger_words(self) -> tuple[str, ...]:
        return self.triggers
