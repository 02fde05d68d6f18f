"""Fine-mixing (Zhang et al., Findings of EMNLP 2022, arXiv 2210.09545).

1. Mix, per parameter tensor keyed by its name::

       θ_mix = θ_pre + m ⊙ (θ_ft − θ_pre)

   ``select="random"``: ``m ~ Bernoulli(rho)`` from the counter-based Philox stream keyed by
   ``(seed, name, index)`` (same mask on every backend); ``select="magnitude"`` keeps the
   ``rho`` share of largest ``|δ|`` inside each tensor. Tensors with no pre-trained counterpart
   (a new classifier head) are kept from the suspect. All via ``ops.mix_weights``.
2. Fine-tune ``θ_mix`` on the clean set, keeping the epoch best on clean dev accuracy.
3. Optional sweep over ``rho_sweep`` (ascending): keep the smallest rho whose clean dev accuracy
   after step 2 is at least the suspect's minus ``sweep_tolerance`` (the original suspect's, also
   when E-PUR ran first).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from purify_fast import ops
from purify_fast.data.text_dataset import TextDataset
from purify_fast.defenses._common import (
    FinetuneOptions,
    check_model,
    clean_finetune,
    dev_accuracy,
    matched_tensors,
)
from purify_fast.validation import one_of, real_in


@dataclass
class FineMixing:
    """Fine-mixing options.

    rho: reserve ratio, share of fine-tuned coordinates kept (default 0.5).
    select: ``"random"`` (Bernoulli mask, default) or ``"magnitude"`` (largest ``|δ|`` per tensor).
    seed: mask seed (the tensor name is the second key).
    rho_sweep: candidate rhos (e.g. 0.1..0.9); None = no sweep, use ``rho``.
    sweep_tolerance: accuracy points (as a fraction) the fine-tuned dev accuracy may fall below the
        suspect's for a rho to qualify (default 0.01).
    finetune: the clean fine-tune stage.
    backend: kernel backend for ``ops.mix_weights``.
    """

    rho: float = 0.5
    select: str = "random"
    seed: int = 0
    rho_sweep: tuple[float, ...] | None = None
    sweep_tolerance: float = 0.01
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    backend: str | None = None

    def __post_init__(self):
        self.rho = real_in("rho", self.rho, 0.0, 1.0)
        one_of("select", self.select, ("random", "magnitude"))
        if self.rho_sweep is not None:
            given = self.rho_sweep
            try:
                sweep = () if isinstance(given, (str, bytes)) else tuple(given)
            except TypeError:  # a lone number: the sweep needs a list
                sweep = ()
            if not sweep:
                raise ValueError(f"rho_sweep must be a non-empty list of values in [0, 1], got "
                                 f"{given!r}")
            self.rho_sweep = tuple(sorted(real_in("rho_sweep value", r, 0.0, 1.0) for r in sweep))
        self.sweep_tolerance = real_in("sweep_tolerance", self.sweep_tolerance, 0.0)

    def mix(self, suspect, matched: dict[str, torch.Tensor], rho: float) -> torch.nn.Module:
        """A mixed copy of ``suspect`` (step 1 only)."""
        model = copy.deepcopy(suspect)
        with torch.no_grad():
            for name, p in model.named_parameters():
                pre = matched.get(name)
                if pre is None:
                    continue
                p.copy_(ops.mix_weights(pre, p.detach(), rho, seed=self.seed, key=name,
                                        select=self.select, backend=self.backend))
        return model

    def apply(self, suspect, pretrained_state: dict, tokenizer, clean: TextDataset,
              dev: TextDataset | None, *, suspect_dev_acc: float | None = None):
        """``(purified copy, report)``; ``suspect`` is not modified.

        ``suspect_dev_acc``: the sweep's baseline, the original suspect's clean dev accuracy,
        when ``suspect`` here is already another stage's output (E-PUR's: comparing with that
        would move the bar); None measures ``suspect`` itself."""
        check_model(suspect, "suspect")
        matched = matched_tensors(suspect, pretrained_state)
        max_len = self.finetune.max_length
        report = {"method": "fine-mixing",
                  "options": {"rho": self.rho, "select": self.select, "seed": self.seed,
                              "rho_sweep": self.rho_sweep, "sweep_tolerance": self.sweep_tolerance,
                              "finetune": self.finetune.to_dict()},
                  "matched_tensors": len(matched),
                  "matched_params": sum(t.numel() for t in matched.values()),
                  "kept_from_suspect": [n for n, _ in suspect.named_parameters() if n not in matched],
                  "seconds": {}}
        candidates = self.rho_sweep or (self.rho,)
        if self.rho_sweep is not None:
            if dev is None:
                raise ValueError("rho_sweep needs a clean dev set (dev_data or dev_fraction > 0)")
            report["suspect_dev_acc"] = (dev_accuracy(suspect, tokenizer, dev, max_len)
                                         if suspect_dev_acc is None
                                         else real_in("suspect_dev_acc", suspect_dev_acc, 0.0, 1.0))
        sweep, chosen = [], None
        for rho in candidates:
            t0 = time.perf_counter()
            model = self.mix(suspect, matched, rho)
            t_mix = time.perf_counter() - t0
            t0 = time.perf_counter()
            ft = clean_finetune(model, tokenizer, clean, dev, self.finetune)
            t_ft = time.perf_counter() - t0
            acc = ft.get("best_dev_acc")
            if acc is None and dev is not None:
                acc = dev_accuracy(model, tokenizer, dev, max_len)
            sweep.append({"rho": rho, "dev_acc": acc, "mix_seconds": t_mix, "finetune_seconds": t_ft,
                          "finetune": ft})
            report["seconds"]["mix"] = report["seconds"].get("mix", 0.0) + t_mix
            report["seconds"]["finetune"] = report["seconds"].get("finetune", 0.0) + t_ft
            chosen = (rho, model)
            if self.rho_sweep is not None and acc >= report["suspect_dev_acc"] - self.sweep_tolerance:
                break
        else:
            if self.rho_sweep is not None:
                # No rho kept dev accuracy within tolerance: the largest (closest to the suspect)
                # is the least damaging choice; the report says so.
                report["sweep_note"] = "no rho met the tolerance; kept the largest"
        report["rho"] = chosen[0]
        report["sweep"] = sweep
        report["dev_acc"] = sweep[-1]["dev_acc"]
        return chosen[1], report
