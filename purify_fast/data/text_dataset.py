"""A small labelled text dataset and the tokenise-and-batch helpers every defense shares.

``TextDataset(texts, labels, num_labels)`` holds parallel lists; it is immutable in spirit (every
method returns a new dataset) so attacks and defenses can never modify the caller's data.
``make_loader(dataset, tokenizer, batch_size, max_length, shuffle, seed)`` yields dicts of
``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the tokenizer makes them) plus
``labels``, padded per batch (dynamic padding keeps CPU runs short).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class TextDataset:
    """Parallel ``texts`` / integer ``labels`` in ``[0, num_labels)``; ``name`` is for reports."""

    texts: list[str]
    labels: list[int]
    num_labels: int
    name: str = "data"
    label_names: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self):
        texts, labels = list(self.texts), [int(x) for x in self.labels]
        if len(texts) != len(labels):
            raise ValueError(f"{self.name}: {len(texts)} texts but {len(labels)} labels")
        if not isinstance(self.num_labels, int) or self.num_labels < 2:
            raise ValueError(f"{self.name}: num_labels must be an int >= 2, got {self.num_labels!r}")
        for i, (t, y) in enumerate(zip(texts, labels)):
            if not isinstance(t, str):
                raise TypeError(f"{self.name}: text {i} is {type(t).__name__}, expected str")
            if not 0 <= y < self.num_labels:
                raise ValueError(f"{self.name}: label {y} of example {i} is outside "
                                 f"[0, {self.num_labels})")
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], self.labels[i]

    def subset(self, indices: Sequence[int], name: str | None = None) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                           self.num_labels, name or self.name, self.label_names)

    def shuffled(self, seed: int) -> TextDataset:
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        return self.subset(order)

    def take(self, n: int, seed: int | None = None) -> TextDataset:
        """The first ``n`` examples (after a seeded shuffle when ``seed`` is given)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        src = self.shuffled(seed) if seed is not None else self
        return src.subset(range(min(n, len(src))))

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
              names: Sequence[str] | None = None, stratify: bool = True) -> list[TextDataset]:
        """Deterministic split by ``seed`` into parts of the given ``fractions`` (summing to 1).

        Stratified by label by default so tiny splits keep every class.
        """
        fractions = [float(f) for f in fractions]
        if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
        names = list(names) if names else [f"{self.name}[{i}]" for i in range(len(fractions))]
        if len(names) != len(fractions):
            raise ValueError(f"{len(names)} names for {len(fractions)} fractions")
        rng = random.Random(seed)
        groups = ([[i for i, y in enumerate(self.labels) if y == c] for c in range(self.num_labels)]
                  if stratify else [list(range(len(self)))])
        parts: list[list[int]] = [[] for _ in fractions]
        for idx in groups:
            rng.shuffle(idx)
            bounds, acc = [0], 0.0
            for f in fractions:
                acc += f
                bounds.append(int(round(acc * len(idx))))
            for k in range(len(fractions)):
                parts[k].extend(idx[bounds[k]:bounds[k + 1]])
        out = []
        for k, idx in enumerate(parts):
            rng.shuffle(idx)  # interleave classes so loaders without shuffling see mixed batches
            out.append(self.subset(idx, names[k]))
        return out

    def without_repeats(self) -> tuple[TextDataset, int, int]:
        """``(dataset, dropped, conflicting)``: each text kept once, at its first occurrence (texts
        that differ only in whitespace are the same text, as the named corpora compare them), so
        that no text can land in two splits. ``dropped`` counts the repeats removed,
        ``conflicting`` those of them labelled otherwise than the copy kept."""
        first: dict[str, int] = {}
        keep, conflicting = [], 0
        for i, (text, label) in enumerate(zip(self.texts, self.labels)):
            key = " ".join(text.split())
            if key in first:
                conflicting += label != self.labels[first[key]]
                continue
            first[key] = i
            keep.append(i)
        dropped = len(self) - len(keep)
        return (self if not dropped else self.subset(keep)), dropped, conflicting

    def label_counts(self) -> list[int]:
        counts = [0] * self.num_labels
        for y in self.labels:
            counts[y] += 1
        return counts

    def concat(self, other: TextDataset, name: str | None = None) -> TextDataset:
        if other.num_labels != self.num_labels:
            raise ValueError(f"cannot concatenate {self.name} ({self.num_labels} labels) with "
                             f"{other.name} ({other.num_labels} labels)")
        return TextDataset(self.texts + other.texts, self.labels + other.labels, self.num_labels,
                           name or self.name, self.label_names)


@dataclass(frozen=True)
class DataSplits:
    """train / dev / test parts of one corpus."""

    train: TextDataset
    dev: TextDataset
    test: TextDataset

    @property
    def num_labels(self) -> int:
        return self.train.num_labels


class _Collate:
    def __init__(self, dataset: TextDataset, tokenizer, max_length: int):
        self.dataset, self.tokenizer, self.max_length = dataset, tokenizer, max_length

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        texts = [self.dataset.texts[i] for i in indices]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        batch = dict(enc)
        batch["labels"] = torch.tensor([self.dataset.labels[i] for i in indices], dtype=torch.long)
        return batch


def make_loader(dataset: TextDataset, tokenizer, batch_size: int = 32, max_length: int = 64,
                shuffle: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    """Batches of tokenised examples: ``input_ids``, ``attention_mask`` [, ``token_type_ids``],
    ``labels`` (all ``[B, T]`` / ``[B]`` tensors on CPU; the caller moves them).

    Shuffling uses its own generator seeded by ``seed``, so the order is reproducible and the
    global RNG is left alone. Tokenisers without a pad token (LLaMA) get ``eos`` as pad.
    """
    if not isinstance(dataset, TextDataset):
        raise TypeError(f"dataset must be a TextDataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    ensure_pad_token(tokenizer)
    gen = torch.Generator().manual_seed(int(seed))
    sampler = (torch.utils.data.RandomSampler(range(len(dataset)), generator=gen) if shuffle
               else torch.utils.data.SequentialSampler(range(len(dataset))))
    batches = torch.utils.data.BatchSampler(sampler, batch_size=batch_size, drop_last=False)
    return torch.utils.data.DataLoader(list(range(len(dataset))), batch_sampler=batches,
                                       collate_fn=_Collate(dataset, tokenizer, max_length))


def ensure_pad_token(tokenizer) -> None:
    """Decoder tokenisers (LLaMA, GPT) ship no pad token; pad with eos so batching works."""
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token


def token_frequencies(dataset: TextDataset, tokenizer, vocab_size: int,
                      max_length: int | None = None) -> torch.Tensor:
    """How often each vocabulary id occurs in ``dataset`` under ``tokenizer`` (float32 ``[V]``),
    special tokens excluded (they are in every example and say nothing about the corpus)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    chunk = 256
    for start in range(0, len(dataset), chunk):
        enc = tokenizer(dataset.texts[start:start + chunk], add_special_tokens=False,
                        truncation=max_length is not None, max_length=max_length)
        for ids in enc["input_ids"]:
            t = torch.tensor([i for i in ids if i not in special and 0 <= i < vocab_size],
                             dtype=torch.long)
            if t.numel():
                counts += torch.bincount(t, minlength=vocab_size).to(torch.float64)
    return counts.to(torch.float32)
