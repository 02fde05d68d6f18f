"""``purify(suspect, pretrained, clean_data, method=..., **options) -> (model, report)``.

Methods:

* ``"fine-mixing"``    :class:`~purify_fast.defenses.fine_mixing.FineMixing`
* ``"fine-purifying"`` :class:`~purify_fast.defenses.fine_purifying.FinePurifying`
* ``"e-pur"``          :class:`~purify_fast.defenses.e_pur.EPur` alone (no fine-tune)
* ``"fine-tune"``      plain clean fine-tuning on the same clean set, no mixing or reset: the
  baseline the weight-space defenses are compared with.

``e_pur=True`` (or a method name ending in ``+e-pur``) runs E-PUR first and hands its output to
the chosen method, the drift still measured against the pre-trained weights. The inputs are never
modified: every stage works on copies.
"""

from __future__ import annotations

import copy
import os
import time

import torch

from purify_fast.data.text_dataset import TextDataset
from purify_fast.defenses._common import (
    FinetuneOptions,
    check_classifier,
    clean_dev_split,
    dev_accuracy,
)
from purify_fast.defenses.e_pur import EPur
from purify_fast.defenses.fine_mixing import FineMixing
from purify_fast.defenses.fine_purifying import FinePurifying
from purify_fast.training import rng_preserved, seed_everything
from purify_fast.validation import real_in, seed_value

METHODS = ("fine-mixing", "fine-purifying", "e-pur", "fine-tune")
DEFAULT_RHO = {"fine-mixing": 0.5, "fine-purifying": 0.3}


def _pretrained_state(pretrained, suspect) -> dict:
    from purify_fast.models.loading import load_classifier, pretrained_state

    if isinstance(pretrained, dict):
        return pretrained
    if isinstance(pretrained, torch.nn.Module):
        return pretrained_state(pretrained)
    if isinstance(pretrained, (str, os.PathLike)):
        model, _ = load_classifier(pretrained, suspect.config.num_labels, tokenizer=False)
        return pretrained_state(model)
    raise TypeError(f"pretrained must be a model, a state dict or a checkpoint path, got "
                    f"{type(pretrained).__name__}")


def purify(suspect, pretrained, clean_data: TextDataset, method: str = "fine-mixing", *,
           tokenizer=None, dev_data: TextDataset | None = None, dev_fraction: float = 0.2,
           # Fine-mixing
           rho: float | None = None, select: str = "random", rho_sweep=None,
           sweep_tolerance: float = 0.01,
           # E-PUR
           e_pur: bool = False, top_n: int = 200, score_threshold: float | None = None,
           c: float = 20.0, corpus: TextDataset | None = None,
           # Fine-purifying
           indicator: str = "drift_over_hessian", eps: float = 1e-8, fisher_at: str = "finetuned",
           per_example: bool = False, fisher_batch_size: int = 16, scope: str = "global",
           # clean fine-tune
           epochs: int = 3, lr: float = 2e-5, batch_size: int = 16, max_length: int = 64,
           weight_decay: float = 0.01, precision: str = "fp32",
           seed: int = 0, backend: str | None = None, progress: bool = False):
    """Purify ``suspect`` and return ``(model, report)``; nothing passed in is modified.

    Parameters
    ----------
    suspect: the possibly backdoored fine-tuned model (``nn.Module``) or a checkpoint directory.
    pretrained: the clean pre-trained model it came from: a model (keys its checkpoint lacked are
        ignored), a state dict, or a checkpoint directory (``"minilm"`` for the offline MiniLM).
    clean_data: the small clean labelled set ``D_c`` (a :class:`TextDataset`).
    method: ``"fine-mixing"``, ``"fine-purifying"``, ``"e-pur"``, ``"fine-tune"``; a ``+e-pur``
        suffix is the same as ``e_pur=True``.
    tokenizer: the suspect's tokenizer (required when ``suspect`` is a model).
    dev_data: clean dev set for keeping the best epoch / the rho sweep; if None, ``dev_fraction``
        (default 0.2) of ``clean_data`` is held out.
    rho: Fine-mixing reserve ratio (default 0.5) or Fine-purifying reset share (default 0.3; an
        upper bound: coordinates that score 0 are never reset, see ``changed_share``).
    select: Fine-mixing mask, ``"random"`` (default) or ``"magnitude"``.
    rho_sweep, sweep_tolerance: Fine-mixing rho sweep (off by default; tolerance 0.01).
    e_pur: run E-PUR first. top_n (200), score_threshold (None), c (20.0), corpus (None: the
        clean data; an empty corpus is refused) are E-PUR's options.
    indicator ("drift_over_hessian"), eps (1e-8), fisher_at ("finetuned"), per_example (False),
        fisher_batch_size (16), scope ("global"): Fine-purifying options.
    epochs (3), lr (2e-5), batch_size (16), max_length (64), weight_decay (0.01),
        precision ("fp32" | "bf16"): the clean fine-tune (AdamW, linear decay, clip 1.0). It
        trains every parameter of purify's copy, whatever the suspect's ``requires_grad`` flags
        (a suspect frozen for inference is fine-tuned as a whole, as METHODS fine-tunes θ_mix);
        the suspect's flags are left as they were and the returned model carries them too. A
        training loss that turns non-finite stops the call with a FloatingPointError.
    seed: seeds the masks, the split and the fine-tune. The global RNGs (random, numpy, torch)
        are seeded inside and restored on return, so the caller's own streams are untouched.
    backend: kernel backend for the ops.

    The report holds the options used (``report["options"]``: the clean fine-tune's, seed,
    dev_fraction and the method's own), per-stage wall times, dev accuracies and what was reset.
    """
    with rng_preserved():
        return _purify(suspect, pretrained, clean_data, method, tokenizer=tokenizer,
                       dev_data=dev_data, dev_fraction=dev_fraction, rho=rho, select=select,
                       rho_sweep=rho_sweep, sweep_tolerance=sweep_tolerance, e_pur=e_pur,
                       top_n=top_n, score_threshold=score_threshold, c=c, corpus=corpus,
                       indicator=indicator, eps=eps, fisher_at=fisher_at,
                       per_example=per_example, fisher_batch_size=fisher_batch_size, scope=scope,
                       epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
                       weight_decay=weight_decay, precision=precision, seed=seed,
                       backend=backend, progress=progress)


def _purify(suspect, pretrained, clean_data, method, *, tokenizer, dev_data, dev_fraction, rho,
            select, rho_sweep, sweep_tolerance, e_pur, top_n, score_threshold, c, corpus,
            indicator, eps, fisher_at, per_example, fisher_batch_size, scope, epochs, lr,
            batch_size, max_length, weight_decay, precision, seed, backend, progress):
    method = str(method).lower()
    if method.endswith("+e-pur"):
        method, e_pur = method[: -len("+e-pur")], True
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} (optionally with '+e-pur'); "
                         f"got {method!r}")
    seed = seed_value(seed)  # before any model work, not where the first mask is drawn
    dev_fraction = real_in("dev_fraction", dev_fraction, 0.0, 1.0, hi_open=True)
    if isinstance(suspect, (str, os.PathLike)):
        from purify_fast.models.loading import load_classifier

        suspect, loaded_tok = load_classifier(suspect)
        tokenizer = tokenizer or loaded_tok
    if not isinstance(e_pur, bool):  # e_pur="no" would be true
        raise TypeError(f"e_pur must be True or False, got {e_pur!r}")
    if method == "fine-tune" and rho is not None:
        raise ValueError("rho is not used by method 'fine-tune' (plain clean fine-tuning, nothing "
                         "mixed or reset)")
    if rho_sweep is not None and rho is not None:
        raise ValueError("rho and rho_sweep: the sweep chooses rho among its values; give one of "
                         "them")
    if rho_sweep is not None and method != "fine-mixing":
        raise ValueError(f"rho_sweep is a Fine-mixing option (the smallest reserve ratio that "
                         f"keeps clean dev accuracy); method {method!r} does not sweep")
    if method == "e-pur" and rho is not None:
        raise ValueError("rho is not used by method 'e-pur' (it resets embedding rows: top_n / "
                         "score_threshold); drop rho, or use fine-mixing / fine-purifying with "
                         "e_pur=True")
    if not isinstance(clean_data, TextDataset):
        raise TypeError(f"clean_data must be a TextDataset, got {type(clean_data).__name__}")
    check_classifier(suspect, tokenizer, "suspect", clean_data.num_labels, "clean_data")
    if getattr(tokenizer, "pad_token", None) is None:
        # Batching sets a pad token (eos) on a decoder's tokenizer; do it on a copy, since
        # nothing passed in is modified.
        tokenizer = copy.deepcopy(tokenizer)
    # Every stage's options are checked (and normalised) before any model work.
    ft_opts = FinetuneOptions(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
                              weight_decay=weight_decay, precision=precision, seed=seed,
                              progress=progress)
    # what the run used: E-PUR alone has no fine-tune (max_length is the dev evaluation's)
    options = {"seed": seed, "max_length": ft_opts.max_length,
               "dev_fraction": None if dev_data is not None else dev_fraction,
               "dev_data": getattr(dev_data, "name", None), "e_pur": e_pur, "backend": backend}
    if method != "e-pur":
        options.update(ft_opts.to_dict())
    epur = fm = fp = None
    if e_pur or method == "e-pur":
        epur = EPur(top_n=top_n, score_threshold=score_threshold, c=c, max_length=None,
                    backend=backend)
        corpus = clean_data if corpus is None else corpus  # an empty corpus is refused, not swapped
        EPur.check_corpus(corpus)
        options.update(top_n=epur.top_n, score_threshold=epur.score_threshold, c=epur.c,
                       corpus=corpus.name)
    if method == "fine-mixing":
        fm = FineMixing(rho=DEFAULT_RHO[method] if rho is None else rho, select=select, seed=seed,
                        rho_sweep=rho_sweep, sweep_tolerance=sweep_tolerance, finetune=ft_opts,
                        backend=backend)
        options.update(rho=None if fm.rho_sweep is not None else fm.rho, select=fm.select,
                       rho_sweep=fm.rho_sweep, sweep_tolerance=fm.sweep_tolerance)
    elif method == "fine-purifying":
        fp = FinePurifying(rho=DEFAULT_RHO[method] if rho is None else rho, indicator=indicator,
                           eps=eps, fisher_at=fisher_at, per_example=per_example,
                           fisher_batch_size=fisher_batch_size, scope=scope, finetune=ft_opts,
                           backend=backend)
        options.update(rho=fp.rho, indicator=fp.indicator, eps=fp.eps, fisher_at=fp.fisher_at,
                       per_example=fp.per_example, fisher_batch_size=fp.fisher_batch_size,
                       scope=fp.scope)
    seed_everything(seed)  # restored on return (purify's rng_preserved)
    t_start = time.perf_counter()
    pre_state = _pretrained_state(pretrained, suspect)
    train_part, dev_part = clean_dev_split(clean_data, dev_data, dev_fraction, seed)
    report: dict = {"method": method + ("+e-pur" if e_pur else ""), "options": options,
                    "clean_train": len(train_part), "clean_dev": len(dev_part) if dev_part else 0,
                    "seconds": {}}
    if dev_part is not None:
        report["suspect_dev_acc"] = dev_accuracy(suspect, tokenizer, dev_part, max_length)
    model = suspect
    if epur is not None:
        model, report["e_pur"] = epur.apply(model, pre_state, tokenizer, corpus)
        report["seconds"]["e_pur"] = report["e_pur"]["seconds"]
    if fm is not None:
        # The sweep's bar is the suspect's dev accuracy (METHODS §1.3), not E-PUR's output's.
        model, report["fine_mixing"] = fm.apply(model, pre_state, tokenizer, train_part, dev_part,
                                                suspect_dev_acc=report.get("suspect_dev_acc"))
        report["seconds"].update(report["fine_mixing"]["seconds"])
    elif fp is not None:
        model, report["fine_purifying"] = fp.apply(model, pre_state, tokenizer, train_part, dev_part)
        report["seconds"].update(report["fine_purifying"]["seconds"])
    elif method == "fine-tune":
        from purify_fast.defenses._common import clean_finetune

        t0 = time.perf_counter()
        model = copy.deepcopy(model)
        report["fine_tune"] = clean_finetune(model, tokenizer, train_part, dev_part, ft_opts)
        report["seconds"]["finetune"] = time.perf_counter() - t0
    if model is suspect:  # "e-pur" with nothing reset still returns a copy
        model = copy.deepcopy(suspect)
    model.eval()
    if dev_part is not None:
        report["dev_acc"] = dev_accuracy(model, tokenizer, dev_part, max_length)
    report["seconds"]["total"] = time.perf_counter() - t_start
    return model, report
