"""Fine-purifying (Zhang et al., Findings of ACL 2023, arXiv 2305.04547).

1. Diagonal Hessian on the clean set, estimated as the diagonal Fisher::

       H_i = mean over clean batches b of g_{b,i}²      (g = ∂ loss / ∂θ, model in eval mode)

   at ``θ_ft`` (default) or ``θ_pre``, from per-batch (default) or per-example gradients, summed
   with ``ops.fisher_accumulate_`` into fp32 accumulators.
2. Indicator per coordinate, ``δ = θ_ft − θ_pre``: ``"drift_over_hessian"`` ``δ²/(H+ε)``
   (default), ``"drift"`` ``|δ|``, ``"inv_hessian"`` ``1/(H+ε)``, ``"product"`` ``δ²·H``.
3. Reset the top ``rho`` share of coordinates by indicator to ``θ_pre``: one global threshold over
   every matched tensor (``ops.global_score_threshold``, a two-pass radix select that never holds
   the scores) or one threshold per tensor (``scope="per_tensor"``); ``ops.reset_by_score``.
   A coordinate whose score is 0 (no drift; or ``H = 0`` under ``"product"``) is never reset:
   ``rho`` is an upper bound, and the report's ``changed_share`` is what was reset.
4. Fine-tune on the clean set as Fine-mixing does.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from purify_fast import ops
from purify_fast.data.text_dataset import TextDataset, make_loader
from purify_fast.defenses._common import (
    FinetuneOptions,
    check_model,
    clean_finetune,
    dev_accuracy,
    matched_tensors,
)
from purify_fast.training import autocast, flag, model_device
from purify_fast.validation import int_at_least, one_of, real_in

INDICATORS = ("drift_over_hessian", "drift", "inv_hessian", "product")


def diagonal_fisher(model, tokenizer, data: TextDataset, names, *, per_example: bool = False,
                    batch_size: int = 16, max_length: int = 64, precision: str = "fp32",
                    backend: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 ``{name: H}`` with ``H = mean over batches (or examples) of grad²`` for each parameter
    in ``names``. ``model`` is used in eval mode (no dropout) and left with no gradients."""
    names = set(names)
    params = {n: p for n, p in model.named_parameters() if n in names}
    missing = names - set(params)
    if missing:
        raise ValueError(f"parameters not in the model: {sorted(missing)[:5]}")
    acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    device = model_device(model)
    was_training = model.training
    model.eval()
    loader = make_loader(data, tokenizer, 1 if per_example else batch_size, max_length)
    scale = 1.0 / len(loader)
    try:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            model.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = model(**batch).loss
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    ops.fisher_accumulate_(acc[n], p.grad, scale=scale, backend=backend)
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return acc


@dataclass
class FinePurifying:
    """Fine-purifying options.

    rho: share of matched coordinates reset to θ_pre (default 0.3), at most: coordinates that
        score 0 (no drift, or a zero Hessian under ``"product"``) are never reset, so fewer move
        when rho reaches into them (the report's ``changed_share``, with a ``share_note``).
    indicator: ``drift_over_hessian`` (default), ``drift``, ``inv_hessian``, ``product``.
    eps: ε in the indicators (default 1e-8).
    fisher_at: ``"finetuned"`` (θ_ft, default) or ``"pretrained"`` (θ_pre with the suspect's head).
    per_example: per-example gradients for the Fisher instead of per-batch (slower).
    fisher_batch_size: batch size of the per-batch Fisher (default 16).
    scope: ``"global"`` threshold over the whole model (default) or ``"per_tensor"``.
    finetune: the clean fine-tune stage.
    backend: kernel backend for the ops.
    """

    rho: float = 0.3
    indicator: str = "drift_over_hessian"
    eps: float = 1e-8
    fisher_at: str = "finetuned"
    per_example: bool = False
    fisher_batch_size: int = 16
    scope: str = "global"
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    backend: str | None = None

    def __post_init__(self):
        # The checked values are stored (eps="1e-8" is 1e-8, np.int64(4) is 4, used and reported
        # as such): per_example="no" would otherwise be truthy and a numpy batch size refused by
        # make_loader after the model work began.
        self.rho = real_in("rho", self.rho, 0.0, 1.0)
        self.indicator = one_of("indicator", self.indicator, INDICATORS)
        self.eps = real_in("eps", self.eps, 0.0, lo_open=True)
        self.fisher_at = one_of("fisher_at", self.fisher_at, ("finetuned", "pretrained"))
        self.per_example = flag("per_example", self.per_example)
        self.scope = one_of("scope", self.scope, ("global", "per_tensor"))
        self.fisher_batch_size = int_at_least("fisher_batch_size", self.fisher_batch_size, 1)

    def apply(self, suspect, pretrained_state: dict, tokenizer, clean: TextDataset,
              dev: TextDataset | None):
        """``(purified copy, report)``; ``suspect`` is not modified."""
        check_model(suspect, "suspect")
        matched = matched_tensors(suspect, pretrained_state)
        report = {"method": "fine-purifying",
                  "options": {"rho": self.rho, "indicator": self.indicator, "eps": self.eps,
                              "fisher_at": self.fisher_at, "per_example": self.per_example,
                              "fisher_batch_size": self.fisher_batch_size, "scope": self.scope,
                              "finetune": self.finetune.to_dict()},
                  "matched_tensors": len(matched),
                  "matched_params": sum(t.numel() for t in matched.values()),
                  "seconds": {}}
        model = copy.deepcopy(suspect)
        params = dict(model.named_parameters())
        needs_h = self.indicator != "drift"
        hessian: dict[str, torch.Tensor | None] = {n: None for n in matched}
        if needs_h:
            t0 = time.perf_counter()
            probe = model
            if self.fisher_at == "pretrained":
                probe = copy.deepcopy(model)
                with torch.no_grad():
                    for n, pre in matched.items():
                        dict(probe.named_parameters())[n].copy_(pre)
            hessian = diagonal_fisher(probe, tokenizer, clean, matched.keys(),
                                      per_example=self.per_example,
                                      batch_size=self.fisher_batch_size,
                                      max_length=self.finetune.max_length,
                                      precision=self.finetune.precision, backend=self.backend)
            del probe
            report["seconds"]["fisher"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        kw = dict(indicator=self.indicator, eps=self.eps, backend=self.backend)
        reset_counts = {}
        with torch.no_grad():
            if self.scope == "global":
                def tensors():
                    for n, pre in matched.items():
                        yield pre, params[n].detach(), hessian[n]

                thr = ops.global_score_threshold(tensors, self.rho, **kw)
                report["threshold"] = thr.value
                report["threshold_selected"] = thr.selected
                thresholds = {n: thr for n in matched}
            else:
                thresholds = {}
                for n, pre in matched.items():
                    thresholds[n] = ops.global_score_threshold(
                        lambda n=n, pre=pre: [(pre, params[n].detach(), hessian[n])], self.rho, **kw)
            for n, pre in matched.items():
                ft = params[n].detach()
                # A threshold of 0 resets only positive scores (Threshold.reset_value).
                new = ops.reset_by_score(pre, ft, hessian[n], thresholds[n], backend=self.backend)
                # Count what actually moved back (coordinates with δ = 0 "reset" to themselves).
                reset_counts[n] = int((new != ft).sum())
                params[n].copy_(new)
        report["seconds"]["reset"] = time.perf_counter() - t0
        total = sum(t.numel() for t in matched.values())
        # threshold_selected counts every score at or above the threshold, zero scores included
        # (which are never reset): what moved back is coordinates_changed / changed_share.
        report["coordinates_changed"] = sum(reset_counts.values())
        report["changed_share"] = report["coordinates_changed"] / total
        report["requested_share"] = self.rho
        if report["coordinates_changed"] < round(self.rho * total):
            zero = (" (a zero Hessian gives 0 under 'product')" if self.indicator == "product"
                    else "")
            report["share_note"] = (f"{report['changed_share']:.2%} of the matched coordinates "
                                    f"changed for rho {self.rho:g}: rho is an upper bound; "
                                    f"coordinates that score 0{zero} are never reset and those "
                                    f"without drift reset to themselves")
        top = sorted(reset_counts.items(), key=lambda kv: -kv[1] / max(params[kv[0]].numel(), 1))
        report["most_reset_tensors"] = [{"name": n, "share": c / params[n].numel()}
                                        for n, c in top[:10]]
        t0 = time.perf_counter()
        report["finetune"] = clean_finetune(model, tokenizer, clean, dev, self.finetune)
        report["seconds"]["finetune"] = time.perf_counter() - t0
        report["dev_acc"] = report["finetune"].get("best_dev_acc")
        if report["dev_acc"] is None and dev is not None:  # epochs=0: as Fine-mixing measures it
            report["dev_acc"] = dev_accuracy(model, tokenizer, dev, self.finetune.max_length)
        model.eval()
        return model, report
