"""The MuScleLoRA modules and their injection into Hugging Face sequence classifiers.

* :class:`MultiScaleLoRALinear` wraps a frozen ``nn.Linear`` ``(W0, b0)`` and adds the multi-scale
  low-rank update ``(α/r_in)·R·scale(L·x)`` through :func:`purify_fast.ops.multiscale_lora`
  (radial or FFT scaling). ``merge()`` folds the update into ``W0`` for zero-overhead inference;
  ``unmerge()`` restores the original weight bit for bit.
* :func:`inject_muscle_lora` puts one MSLR layer on the penultimate dense layer (BERT
  ``pooler.dense``, RoBERTa ``classifier.dense``, LLaMA-family: a new head
  ``dense(hidden→16) → dropout 0.1 → out_proj(16→labels)`` replacing ``score``), standard LoRA on
  the attention q and v projections (through ``peft``), and freezes everything else, the
  classifier head included.
* :func:`merge_muscle_lora` folds every adapter back into plain ``nn.Linear`` layers so the model
  has its original architecture again (``save_pretrained`` / ``from_pretrained`` round-trip).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from purify_fast import backend as _backend
from purify_fast.ops.multiscale_lora import MODES, multiscale_lora, normalize_scales
from purify_fast.reference.multiscale_lora import merged_weight
from purify_fast.validation import int_at_least, one_of, real_in

HALF_DTYPES = (torch.float16, torch.bfloat16)


class MultiScaleLoRALinear(nn.Module):
    """``y = W0·x + b0 + (α/r_in)·R·scale(L·x)`` over a frozen ``base`` linear layer.

    ``L [n·r_in, d_in]`` and ``R [d_out, n·r_in]`` are both Kaiming-uniform initialised (as in
    MuScleLoRA: neither starts at zero, so the update is active from the first step).
    ``scales``: the ``n`` radial scales ``k_i``; ``mode``: ``"radial"`` or ``"fft"``.
    """

    def __init__(self, base: nn.Linear, scales: Sequence[float] = (1, 2, 4, 8), r_in: int = 1,
                 alpha: float = 6.0, mode: str = "radial", backend: str | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        r_in = int_at_least("r_in", r_in, 1)
        # A NaN or infinite alpha would pass forward's checks only to be merged into the base
        # weight by merge() / to_linear().
        alpha = real_in("alpha", alpha, 0.0, lo_open=True)
        one_of("mode", mode, MODES)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.scales = normalize_scales(scales)
        self.r_in = r_in
        self.alpha = float(alpha)
        self.mode = mode
        self.backend = backend
        q = len(self.scales) * r_in
        w = base.weight
        # Over a bf16 / fp16 base the factors are fp32 master weights, cast to the base dtype in
        # forward: AdamW steps of ~lr (1e-5) are far below bf16's spacing and would round away
        # (measured: 69 % of the elements of bf16 factors never moved in 8 steps on a tiny LLaMA).
        # Inject into the model in the dtype it trains in: casting it afterwards (.half()) casts
        # the factors too.
        dtype = torch.float32 if w.dtype in HALF_DTYPES else w.dtype
        self.lora_l = nn.Parameter(torch.empty(q, base.in_features, dtype=dtype, device=w.device))
        self.lora_r = nn.Parameter(torch.empty(base.out_features, q, dtype=dtype, device=w.device))
        self.reset_parameters()
        # ``merged`` is read on every forward (a Python bool: no device sync); the buffer carries
        # it through state_dict / load_state_dict, so a merged state loaded into a fresh layer is
        # not updated a second time.
        self.merged = False
        self.register_buffer("merged_flag", torch.zeros((), dtype=torch.bool, device=w.device))
        self._unmerged_weight: torch.Tensor | None = None
        self._warned_merged_grad = False

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_l, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_r, a=math.sqrt(5))

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        # Code that reads `.weight` of the layer it replaced (dtype/device probes) keeps working.
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, scales={list(self.scales)}, "
                f"r_in={self.r_in}, alpha={self.alpha}, mode={self.mode!r}, merged={self.merged}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if (torch.is_grad_enabled() and not self._warned_merged_grad
                    and (self.lora_l.requires_grad or self.lora_r.requires_grad)):
                # Merged, the forward never touches L and R: an optimiser stepping them would
                # silently train nothing (and unmerge() would then drop what the base learnt).
                self._warned_merged_grad = True
                warnings.warn("MultiScaleLoRALinear is merged: its forward uses the merged base "
                              "weight and lora_l / lora_r get no gradient; call unmerge() before "
                              "training it (or run merged layers under torch.no_grad())",
                              RuntimeWarning, stacklevel=2)
            return self.base(x)
        dtype = self.base.weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            # A custom autograd op is not autocast-aware: cast like autocast casts a linear layer.
            dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            b = self.base.bias
            return multiscale_lora(x.to(dtype), self.base.weight.to(dtype),
                                   None if b is None else b.to(dtype), self.lora_l.to(dtype),
                                   self.lora_r.to(dtype), self.scales, self.alpha,
                                   mode=self.mode, backend=self.backend)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """L and R as forward uses them (rounded to the base dtype), so a merge equals forward."""
        dtype = self.base.weight.dtype
        return self.lora_l.detach().to(dtype), self.lora_r.detach().to(dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``(α/r_in)·R·S·L`` in fp32 (formed only here, for merging)."""
        w = self.base.weight
        zero = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        return merged_weight(zero, *self._factors(), self.scales, self.alpha, self.mode)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (computed in fp32, rounded once)."""
        if self.merged:
            return
        w = self.base.weight
        # Subtracting the update again in bf16 would not give W0 back exactly: keep W0 itself.
        self._unmerged_weight = w.detach().clone()
        w.copy_(merged_weight(w, *self._factors(), self.scales,
                              self.alpha, self.mode))
        self.merged = True
        self.merged_flag.fill_(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight saved by :meth:`merge`, bit for bit. After a merged state was
        loaded (no saved copy), ``W − ΔW`` is computed in fp32 and rounded once instead."""
        if not self.merged:
            return
        w = self.base.weight
        if self._unmerged_weight is not None:
            w.copy_(self._unmerged_weight)
        else:
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self._unmerged_weight = None
        self.merged = False
        self.merged_flag.fill_(False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A full state without the flag predates it (such layers were saved unmerged); a partial
        # one (adapters only, strict=False) leaves the flag, and the base weight, as they are.
        if prefix + "base.weight" in state_dict:
            state_dict.setdefault(prefix + "merged_flag", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "base.weight" in state_dict:
            self.merged = bool(self.merged_flag)
            # The base weight now comes from the loaded state: a W0 saved by an earlier merge()
            # is not its unmerged weight any more.
            self._unmerged_weight = None

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` equal to this layer (merged weight, original bias), in this
        layer's mode."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.train(self.training)  # a fresh module trains; it replaces this one
        w = base.weight if self.merged else merged_weight(
            base.weight, *self._factors(), self.scales, self.alpha, self.mode)
        out.weight.copy_(w)
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out


class MSLRClassificationHead(nn.Module):
    """The decoder-LM head of MuScleLoRA: ``dense(hidden→inner) → dropout → out_proj(inner→labels)``
    with ``dense`` a :class:`MultiScaleLoRALinear`. Both linears are bias-free so that, once
    merged, the head collapses exactly into one ``score`` matrix ``out_proj·dense`` (the original
    LLaMA classifier shape), and the saved model loads with the stock class."""

    def __init__(self, hidden: int, num_labels: int, inner: int = 16, dropout: float = 0.1, *,
                 scales=(1, 2, 3, 4), r_in: int = 1, alpha: float = 4.0, mode: str = "radial",
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        dense = nn.Linear(hidden, inner, bias=False, device=device, dtype=dtype)
        self.dense = MultiScaleLoRALinear(dense, scales, r_in, alpha, mode, backend)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(inner, num_labels, bias=False, device=device, dtype=dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(self.dense(hidden_states)))

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        dense = self.dense.to_linear() if isinstance(self.dense, MultiScaleLoRALinear) else self.dense
        w = self.out_proj.weight.to(torch.float32) @ dense.weight.to(torch.float32)
        out = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device,
                        dtype=self.out_proj.weight.dtype)
        out.train(self.training)
        out.weight.copy_(w)
        return out


# --------------------------------------------------------------------------- injection

_ENCODERS = {"bert": "pooler.dense", "roberta": "classifier.dense", "xlm-roberta": "classifier.dense"}
_ENCODER_QV = ["query", "value"]
_DECODER_QV = ["q_proj", "v_proj"]


@dataclass
class MuscleLoRAConfig:
    """What :func:`inject_muscle_lora` adds. ``None`` fields take the architecture's default
    (METHODS.md §4): scales BERT ``[1,4,...,28]``, RoBERTa ``[1,2,4,8,16]``, decoders
    ``[1,2,3,4]``; α 6 (encoders) / 4 (decoders); LoRA r=8 α=32 (encoders) / r=2 α=8 (decoders).

    α scales the MSLR update against the frozen base layer: for the offline MiniLM, whose pooler
    weights are tiny, α 6 saturates the pooler's ``tanh`` at init and training barely moves;
    α 1 trains (measured in benchmarks/results_muscle_lora.md).

    ``use_mslr=False`` (the "LoRA only" ablation) keeps a low-rank adapter of the same rank on the
    dense layer but with the single scale 1 (a standard LoRA there); ``use_lora=False`` drops the
    attention LoRA.
    """

    scales: Sequence[float] | None = None
    r_in: int = 1
    alpha: float | None = None
    mode: str = "radial"
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    use_lora: bool = True
    use_mslr: bool | None = None  # None: on (train_clean sets it from its ablation)
    head_inner: int = 16
    head_dropout: float = 0.1
    train_head: bool = False
    backend: str | None = None

    def __post_init__(self):
        if self.scales is not None:  # "124", [], [0] refused here, not after peft injected LoRA
            self.scales = list(normalize_scales(self.scales))
        for name in ("use_lora", "train_head"):
            if not isinstance(getattr(self, name), bool):  # "no" would be true
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.use_mslr is not None and not isinstance(self.use_mslr, bool):
            raise TypeError(f"use_mslr must be True, False or None, got {self.use_mslr!r}")
        _backend.check_name(self.backend)
        int_at_least("r_in", self.r_in, 1)
        real_in("alpha", self.alpha, 0.0, lo_open=True, optional=True)
        one_of("mode", self.mode, MODES)
        int_at_least("lora_r", self.lora_r, 1, optional=True)  # 0 would read as "the default"
        real_in("lora_alpha", self.lora_alpha, 0.0, lo_open=True, optional=True)
        real_in("lora_dropout", self.lora_dropout, 0.0, 1.0, hi_open=True)
        int_at_least("head_inner", self.head_inner, 1)
        real_in("head_dropout", self.head_dropout, 0.0, 1.0, hi_open=True)


def model_family(model) -> str:
    """``"bert"``, ``"roberta"`` or ``"decoder"`` (a ``*ForSequenceClassification`` with ``score``)."""
    mtype = getattr(getattr(model, "config", None), "model_type", "")
    if mtype in _ENCODERS:
        return "roberta" if "roberta" in mtype else "bert"
    if isinstance(getattr(model, "score", None), (nn.Linear, MSLRClassificationHead)):
        return "decoder"
    raise ValueError(f"MuScleLoRA injection supports BERT, RoBERTa and decoder LMs with a `score` "
                     f"head; got model_type={mtype!r} ({type(model).__name__})")


def _defaults(family: str, cfg: MuscleLoRAConfig) -> dict:
    if family == "bert":
        d = {"scales": [1] + list(range(4, 29, 4)), "alpha": 6.0, "lora_r": 8, "lora_alpha": 32,
                 "targets": _ENCODER_QV}
    elif family == "roberta":
        d = {"scales": [1, 2, 4, 8, 16], "alpha": 6.0, "lora_r": 8, "lora_alpha": 32, "targets": _ENCODER_QV}
    else:
        d = {"scales": [1, 2, 3, 4], "alpha": 4.0, "lora_r": 2, "lora_alpha": 8, "targets": _DECODER_QV}
    scales = list(cfg.scales) if cfg.scales is not None else d["scales"]
    r_in = cfg.r_in
    if cfg.use_mslr is False:
        # Same number of rank rows, one scale: a plain LoRA of rank n·r_in.
        r_in, scales = len(scales) * r_in, [1.0]
    return {"scales": scales, "r_in": r_in, "alpha": cfg.alpha if cfg.alpha is not None else d["alpha"],
                "lora_r": cfg.lora_r or d["lora_r"],
                "lora_alpha": cfg.lora_alpha if cfg.lora_alpha is not None else d["lora_alpha"],
                "targets": cfg.lora_targets or d["targets"]}


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def is_adapter_param(name: str) -> bool:
    """Trainable under MuScleLoRA: peft LoRA factors and the MSLR factors."""
    return "lora_A" in name or "lora_B" in name or name.endswith(("lora_l", "lora_r"))


def encoder_mslr_path(model: nn.Module, family: str) -> str:
    """Where an encoder classifier's MSLR layer goes (METHODS.md §4): the dense layer that feeds
    a tanh, BERT's ``pooler.dense`` or RoBERTa's ``classifier.dense``."""
    if family == "bert":
        return "bert.pooler.dense" if hasattr(model, "bert") else "pooler.dense"
    return "classifier.dense"


def inject_muscle_lora(model: nn.Module, config: MuscleLoRAConfig | None = None) -> nn.Module:
    """Add the MSLR layer and the attention LoRA to ``model`` in place (instances replaced, no
    class patching) and freeze every other parameter. Returns ``model``. Over a bf16 / fp16 model
    the trainable factors are fp32 (cast in forward): inject into the model in the dtype it
    trains in, since casting it afterwards casts them too. Each new module takes the mode
    (train / eval) of the layer it wraps, so an eval-mode model gets no active dropout."""
    cfg = config or MuscleLoRAConfig()
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    if any(isinstance(m, MultiScaleLoRALinear) for m in model.modules()):
        raise ValueError("model already has MuScleLoRA layers (inject once)")
    family = model_family(model)
    d = _defaults(family, cfg)
    if cfg.use_lora:
        from peft import LoraConfig, inject_adapter_in_model

        lcfg = LoraConfig(r=d["lora_r"], lora_alpha=d["lora_alpha"], lora_dropout=cfg.lora_dropout,
                          target_modules=list(d["targets"]), bias="none")
        model = inject_adapter_in_model(lcfg, model)
        from peft.tuners.lora import LoraLayer

        for module in model.modules():
            # peft's wrappers and factors (lora_dropout included) are built in training mode
            if isinstance(module, LoraLayer):
                module.train(module.get_base_layer().training)
        # fp32 master weights over a half-precision base, as for the MSLR factors (peft's own
        # forward casts its input to the adapter dtype and the result back).
        for name, p in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and p.dtype in HALF_DTYPES:
                p.data = p.data.float()
    ref = next(model.parameters())
    if family == "decoder":
        score = model.score
        head = MSLRClassificationHead(score.in_features, score.out_features, cfg.head_inner,
                                      cfg.head_dropout, scales=d["scales"], r_in=d["r_in"],
                                      alpha=d["alpha"], mode=cfg.mode, backend=cfg.backend,
                                      device=ref.device, dtype=ref.dtype)
        head.train(score.training)  # a fresh module is in training mode; follow the model's
        model.score = head
    else:
        path = encoder_mslr_path(model, family)
        dense = model.get_submodule(path)
        if not isinstance(dense, nn.Linear):
            raise ValueError(f"{path} is a {type(dense).__name__}, expected nn.Linear")
        mslr = MultiScaleLoRALinear(dense, d["scales"], d["r_in"], d["alpha"], cfg.mode,
                                    cfg.backend)
        _set_module(model, path, mslr.train(dense.training))
    for name, p in model.named_parameters():
        # The frozen base of an MSLR layer stays frozen even when the head trains.
        head = cfg.train_head and name.startswith(("classifier.", "score.")) and ".base." not in name
        p.requires_grad_(is_adapter_param(name) or head)
    model.muscle_lora_config = dict(family=family, **d, mode=cfg.mode)
    return model


# A merge that keeps less than this share of the LoRA update (its relative error, in the
# Frobenius norm) is reported: the merged model is then not the one that was trained.
MERGE_LOSS_WARN = 0.05


@torch.no_grad()
def merge_muscle_lora(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its base layer and put plain layers back (in place): the model has
    its original architecture and parameter names again, each plain layer in the mode of the
    layer it replaces, and every parameter trainable (``train_clean`` gives its caller's flags
    back instead). Returns ``model``.

    ``dtype`` (e.g. ``torch.float32``) casts the model first. Folded into bf16 / fp16 weights, an
    update much smaller than the weights' spacing is mostly rounded away (an audit measured
    64-71 % of a bf16 tiny LLaMA's LoRA q / v update lost, 12 % of a bf16 BERT's MSLR pooler
    update); when the merge loses more than :data:`MERGE_LOSS_WARN` of any LoRA or MSLR update, a
    warning says how much and suggests fp32."""
    import warnings

    from peft.tuners.lora import LoraLayer

    if dtype is not None:
        model.to(dtype)
    lost: list[tuple[float, str]] = []

    def measure(name, before, delta, after):
        norm = float(delta.norm())
        if norm > 0:
            lost.append((float((after.float() - before - delta).norm()) / norm, name))

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and name:
            base = module.get_base_layer()
            before = base.weight.detach().float().clone()
            delta = sum((module.get_delta_weight(a).detach().float()
                         for a in module.active_adapters if a in module.lora_A),
                        torch.zeros_like(before))
            module.merge()
            measure(name, before, delta, base.weight.detach())
            _set_module(model, name, base)

    def mslr_to_linear(name, layer):
        out = layer.to_linear()
        if not layer.merged:  # a layer merged earlier has no unmerged weight left to compare
            measure(name, layer.base.weight.detach().float(), layer.delta_weight(), out.weight)
        return out

    # Heads first (they own an MSLR layer), then a fresh walk for the remaining MSLR layers.
    for name, module in list(model.named_modules()):
        if isinstance(module, MSLRClassificationHead):
            if isinstance(module.dense, MultiScaleLoRALinear):
                module.dense = mslr_to_linear(f"{name}.dense", module.dense)
            _set_module(model, name, module.to_linear())
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiScaleLoRALinear):
            _set_module(model, name, mslr_to_linear(name, module))
    worst = max(lost, default=(0.0, None))
    if worst[0] > MERGE_LOSS_WARN:
        dt = next(model.parameters()).dtype
        warnings.warn(f"merging the adapters' updates into {dt} weights lost up to "
                      f"{100 * worst[0]:.0f} % of one ({worst[1]}): the merged model is not the "
                      f"one trained. Merge in fp32 (merge_muscle_lora(model, torch.float32), "
                      f"train-clean --merged-dtype fp32)", UserWarning, stacklevel=2)
    if hasattr(model, "muscle_lora_config"):
        del model.muscle_lora_config
    # Every peft LoRA layer was folded above, so peft's config describes adapters that are gone;
    # left in place it made a later injection warn of "multiple adapters".
    if hasattr(model, "peft_config") and not any(isinstance(m, LoraLayer) for m in model.modules()):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
