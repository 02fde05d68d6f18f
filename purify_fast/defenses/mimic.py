"""MIMIC (Han et al., arXiv 2406.03508): purify a possibly backdoored pre-trained encoder by
distilling it into a freshly initialised student, guided by per-layer mutual information.

* Teacher: the suspect encoder, frozen (eval mode, no gradient; it may stay bf16 / fp16). Student:
  the same architecture or a smaller config (fewer layers), **randomly initialised** and built in
  fp32 whatever the teacher's dtype (half-precision weights would round most updates away): no
  teacher weight is ever copied, so no backdoor is inherited; only clean unlabelled inputs are
  seen.
* MI guidance (:mod:`purify_fast.defenses.mine`): for each chosen layer l, MINE estimates
  ``I(pool(h_l); z)`` (z = the final feature) on the teacher (default, as in the paper) or on the
  student (``mi_source="student"``, as in the official code; re-estimated every ``mi_every``
  epochs). Weights ``w_l = a + b · MI_l / Σ_j MI_j``.
* Loss per step::

      L = −cos(f̂_S(x), f̂_T(x))                                       (clone, L2-normalised)
          + λ_attn · Σ_l w_l · MSE(A(F_S,l), A(F_T,l))                  (fused attention kernel)
          + λ_ssl · NT-Xent(f_S(view1), f_S(view2); τ)                   (self-supervised)

  Text views are two dropout passes (SimCSE, τ = 0.05 by default); images pass an ``augment``
  callable for two augmented views (SimCLR, τ = 0.5). A batch of one input has no negatives: its
  NT-Xent term is exactly 0 (a warning says so once per fit).
* Features: text is mean-pooled over its tokens (those of the attention mask; every token of a
  batch without one, as the model itself attends to them all), like :func:`linear_probe`'s
  features; models without token sequences take a CNN's spatial mean or ViT's [CLS] token.
* Layers: Hugging Face encoders use ``output_hidden_states`` (student layer j ↔ teacher layer
  ⌊j·L_T/L_S + ½⌋, halves rounded up); any ``nn.Module`` works given
  ``teacher_layers``/``student_layers`` module names (forward hooks) and a ``feature_fn``.
* Evaluation: :func:`linear_probe` trains a logistic-regression probe on frozen features and
  reports CACC and ASR.
* Multi-process: under ``accelerate launch`` the student trains data-parallel
  (:func:`purify_fast.distributed.prepare_stage`; tested with DDP over gloo, FSDP not yet run):
  each rank distils its share of every epoch's batches against its own frozen copy of the
  teacher and the student's gradients are averaged. MI weights are computed by rank 0 and
  broadcast, so every rank weighs the layers alike. A ``TextDataset`` is split across ranks
  for you; with ``batches=`` each rank must be handed its own shard, of the same length on every
  rank.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from purify_fast.attacks.encoder_backdoor import mean_pool
from purify_fast.backend import check_name as check_backend_name
from purify_fast.data.text_dataset import TextDataset, make_loader
from purify_fast.defenses._common import check_tokenizer
from purify_fast.defenses.mine import MIN_SAMPLES, MINE, estimate_layer_mi, layer_weights
from purify_fast.ops.attention_maps import attention_map_loss
from purify_fast.training import (
    distributed_launch,
    handing_back,
    rank_dropout_seed,
    rng_preserved,
    scheduler_steps,
)
from purify_fast.validation import int_at_least, one_of, real_in

MI_SOURCES = ("teacher", "student")


@dataclass
class MIMICConfig:
    """MIMIC hyper-parameters (defaults: METHODS.md §5 and the official code where known)."""

    # student_layers / student_overrides shape the student fit() builds; they are refused with
    # a student= of the caller's, which is used as given.
    student_layers: int | None = None      # None: same depth as the teacher
    # Other config fields of a Hugging Face student (e.g. intermediate_size); its hidden_size must
    # stay the teacher's, since the clone loss compares the two features directly.
    student_overrides: dict = field(default_factory=dict)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_length: int = 64
    attn_weight: float = 1.0
    ssl_weight: float = 0.1                # its term is 0 on batches of 1 (no negatives)
    # NT-Xent τ; None: 0.5 when fit() gets an image ``augment`` (SimCLR, as METHODS.md §5 gives
    # it), 0.05 for text dropout views (METHODS names no τ for text: SimCSE's usual value).
    ssl_temperature: float | None = None
    mi_source: str = "teacher"
    mi_every: int = 1                      # epochs between student MI re-estimates
    mi_a: float = 1000.0
    mi_b: float = 10000.0
    mine_steps: int = 300
    mine_hidden: int = 128
    mine_samples: int = 1024               # clean inputs whose features MINE sees (>= 8)
    backend: str | None = None             # attention-kernel backend
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        one_of("mi_source", self.mi_source, MI_SOURCES)
        int_at_least("student_layers", self.student_layers, 1, optional=True)
        # 0 epochs would hand back the freshly initialised student as if it were purified.
        int_at_least("epochs", self.epochs, 1)
        for name in ("batch_size", "mine_steps", "mi_every", "mine_hidden"):
            int_at_least(name, getattr(self, name), 1)
        # Checked here, by name: MINE itself refused fewer samples only after the model ran.
        int_at_least("mine_samples", self.mine_samples, MIN_SAMPLES)
        int_at_least("max_length", self.max_length, 2)  # [CLS] plus one token at least
        if not isinstance(self.student_overrides, dict):
            raise TypeError(f"student_overrides must be a dict of config fields, got "
                            f"{self.student_overrides!r}")
        # a typo costs nothing here; at the first attention-loss call it came after MINE
        check_backend_name(self.backend)
        real_in("lr", self.lr, 0.0, lo_open=True)
        real_in("ssl_temperature", self.ssl_temperature, 0.0, lo_open=True, optional=True)
        for name in ("attn_weight", "ssl_weight", "weight_decay"):
            real_in(name, getattr(self, name), 0.0)
        real_in("warmup_ratio", self.warmup_ratio, 0.0, 1.0, hi_open=True)
        # Layer weights are a + b·MI: a negative one would push the student away from the
        # teacher's attention maps.
        real_in("mi_a", self.mi_a, 0.0)
        real_in("mi_b", self.mi_b, 0.0)


@dataclass
class MIMICResult:
    student: nn.Module
    teacher_layers: list[int]
    student_layers: list[int]
    mi: list[float]
    weights: list[float]
    history: list[dict] = field(default_factory=list)
    mi_history: list[dict] = field(default_factory=list)
    mi_curves: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    clean_examples: int = 0
    mi_source: str = "teacher"             # whose layers mi / mi_curves were estimated on

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("student", "history", "mi_curves")}
        out["final_loss"] = self.history[-1] if self.history else None
        return out


# --------------------------------------------------------------------------- losses

def clone_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``−cos(f̂_S, f̂_T)`` averaged over the batch (features L2-normalised first); the two
    features must have the same width."""
    if f_s.shape != f_t.shape:
        raise ValueError(f"the student's feature {tuple(f_s.shape)} and the teacher's "
                         f"{tuple(f_t.shape)} differ; the clone loss needs features of the same "
                         f"width: give the student the teacher's feature width")
    return -(F.normalize(f_s.float(), dim=-1) * F.normalize(f_t.float(), dim=-1)).sum(-1).mean()


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR; SimCSE with dropout views): each view's positive is the other view of
    the same input, negatives are every other input of both views. With one input there are no
    negatives and the loss is exactly 0 (no gradient)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


# --------------------------------------------------------------------------- models

def _hf_depth(model: nn.Module) -> int | None:
    """How many blocks a Hugging Face encoder's ``hidden_states`` holds after the embedding
    output: a transformer's layers (``num_hidden_layers``) or a CNN's stages (ResNet
    ``depths``); None for anything else."""
    cfg = getattr(model, "config", None)
    if hasattr(cfg, "num_hidden_layers"):
        return int(cfg.num_hidden_layers)
    depths = getattr(cfg, "depths", None)
    return len(depths) if isinstance(depths, (list, tuple)) else None


def _is_hf(model: nn.Module) -> bool:
    return _hf_depth(model) is not None


def _hf_width(model: nn.Module) -> int | None:
    """The width of the final features: ``hidden_size``, or a CNN's last stage's channels."""
    cfg = model.config
    sizes = getattr(cfg, "hidden_sizes", None)
    return getattr(cfg, "hidden_size", None) or (sizes[-1] if sizes else None)


def make_student(teacher: nn.Module, num_layers: int | None = None, overrides: dict | None = None,
                 seed: int = 0) -> nn.Module:
    """A freshly initialised encoder of the teacher's architecture (optionally fewer layers or
    other config fields). Built from the config alone: the teacher's weights are never read.
    Always fp32 (the project's rule: a bf16 / fp16 model is fine-tuned in fp32): a teacher
    loaded in bf16 carries that dtype in its config, and a student built in it lost about half
    its updates to rounding."""
    if not _is_hf(teacher):
        raise TypeError("make_student builds Hugging Face encoders; for another nn.Module pass "
                        "your own freshly initialised student to MIMIC.fit(student=...)")
    from transformers import AutoModel

    cfg = copy.deepcopy(teacher.config)
    if num_layers is not None:
        # A config that describes its depth by ``depths`` (blocks per stage: ResNet, ConvNext,
        # Swin ...) either has no num_hidden_layers (ResNet) or maps it onto its number of
        # stages (ConvNext's num_stages, Swin's num_layers): setting that built a student whose
        # stages no longer matched ``depths``/``hidden_sizes`` and which failed at its first
        # forward with a shape error. Its depth is changed through ``depths``.
        depths = getattr(cfg, "depths", None)
        if isinstance(depths, (list, tuple)) or not hasattr(cfg, "num_hidden_layers"):
            example = [1] * len(depths) if isinstance(depths, (list, tuple)) and depths else \
                [1, 1, 1, 1]
            raise ValueError(f"student_layers sets num_hidden_layers, which a "
                             f"{type(cfg).__name__} does not have as a depth (it gives blocks "
                             f"per stage in depths): make the student smaller with "
                             f"student_overrides (e.g. {{'depths': {example}}}, fewer blocks "
                             f"per stage)")
        cfg.num_hidden_layers = int(num_layers)
    for k, v in (overrides or {}).items():
        if not hasattr(cfg, k):
            raise ValueError(f"student_overrides: the teacher config has no field {k!r}")
        setattr(cfg, k, v)
    # from_config builds in the config's dtype (set by from_pretrained(dtype=...)); the field is
    # `dtype` from transformers 4.56 on, `torch_dtype` before.
    if "dtype" in vars(cfg):
        cfg.dtype = torch.float32
    else:
        cfg.torch_dtype = torch.float32
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = AutoModel.from_config(cfg)
    if any(p.dtype != torch.float32 for p in student.parameters() if p.is_floating_point()):
        student.float()  # a transformers version that ignored the field
    return student


def layer_pairs(teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """``(teacher hidden-state index, student index)``: student block j (1-based) is matched to
    teacher block ⌊j · L_T / L_S + ½⌋, so a shallow student mimics evenly spaced depths (halves
    round up: Python's round() takes them to even, which spaces 12 → 8 as 2,3,4,6,8,9,10,12)."""
    return [(max(1, math.floor(j * teacher_layers / student_layers + 0.5)), j)
            for j in range(1, student_layers + 1)]


class _Taps:
    """Intermediate maps + final feature of one encoder for a batch (HF or hooked nn.Module)."""

    def __init__(self, model: nn.Module, layer_ids: Sequence, feature_fn: Callable | None):
        self.model, self.layer_ids, self.feature_fn = model, list(layer_ids), feature_fn
        self.hf = _is_hf(model) and all(isinstance(i, int) for i in self.layer_ids)
        self._store: dict = {}
        self._hooks = []
        if not self.hf:
            mods = dict(model.named_modules())
            for name in self.layer_ids:
                if name not in mods:
                    raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}")
                self._hooks.append(mods[name].register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(_mod, _inp, out):
            self._store[name] = out[0] if isinstance(out, tuple) else out
        return hook

    def __call__(self, batch):
        batch = _as_inputs(self.model, batch)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if self.hf:
            ids = batch.get("input_ids")
            if mask is None and torch.is_tensor(ids) and ids.dim() == 2:
                # Text without a mask: the model attends to every token, so the feature pools
                # them all (it switched to [CLS], while the probe mean-pools).
                mask = torch.ones_like(ids)
            out = self.model(**batch, output_hidden_states=True)
            maps = [out.hidden_states[i] for i in self.layer_ids]
            last = out.last_hidden_state
            if self.feature_fn is not None:
                feat = self.feature_fn(out, batch)
            elif mask is not None:
                feat = mean_pool(last, mask)
            elif last.dim() == 4:  # a CNN (ResNet): average over the last stage's H x W
                feat = last.mean((2, 3))
            else:  # ViT and friends (no token ids): the [CLS] token
                feat = last[:, 0]
            return maps, feat, mask
        self._store.clear()
        out = self.model(**batch) if isinstance(batch, dict) else self.model(batch)
        if self.feature_fn is not None:
            feat = self.feature_fn(out, batch)
        elif isinstance(out, torch.Tensor):
            feat = out
        elif getattr(out, "last_hidden_state", None) is not None:  # a Hugging Face output
            feat = out.last_hidden_state
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            feat = out[0]
        else:
            raise ValueError(f"{type(self.model).__name__} returns {type(out).__name__}, not a "
                             f"feature tensor: pass feature_fn(output, batch) -> features")
        if feat.dim() == 3:
            feat = mean_pool(feat, mask) if mask is not None else feat.mean(1)
        elif feat.dim() == 4:
            feat = feat.mean((2, 3))
        maps = [self._store[n] for n in self.layer_ids]
        for name, h in zip(self.layer_ids, maps):
            if not isinstance(h, torch.Tensor) or h.dim() not in (3, 4):
                # The attention maps sum F² over channels per position: [B, T, C] or [B, C, H, W]
                shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                raise ValueError(f"layer {name!r} of {type(self.model).__name__} gives {shape}; "
                                 f"MIMIC taps maps with positions, [batch, tokens, channels] or "
                                 f"[batch, channels, height, width]")
        return maps, feat, mask

    def close(self):
        for h in self._hooks:
            h.remove()


def _as_inputs(model: nn.Module, batch):
    """A tensor batch for a Hugging Face model, passed by the name of its main input
    (``input_ids``, ``pixel_values`` ...): its forward takes keywords. A plain ``nn.Module``
    gets the tensor positionally. Float inputs go to a Hugging Face model in its own dtype: a
    bf16 teacher and the fp32 student read the same pixel_values."""
    name = getattr(model, "main_input_name", None)
    if not (isinstance(name, str) and hasattr(model, "config")):
        return batch
    if torch.is_tensor(batch):
        batch = {name: batch}
    dtype = getattr(model, "dtype", None)
    if isinstance(batch, dict) and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                 for k, v in batch.items()}
    return batch


def _pool(h: torch.Tensor, mask) -> torch.Tensor:
    if h.dim() == 4:
        return h.float().mean((2, 3))
    return mean_pool(h.float(), mask) if mask is not None else h.float().mean(1)


class _StudentStep(nn.Module):
    """One step's student forwards (the view, and the second view for the self-supervised term)
    as a single module call, so a DDP wrapper sees exactly one forward per backward."""

    def __init__(self, student: nn.Module, taps: "_Taps", augment: Callable | None,
                 second_view: bool):
        super().__init__()
        self.student = student          # registered, so DDP finds (and syncs) its parameters
        self._taps, self._augment, self._second_view = taps, augment, second_view
        # accelerate's FSDP auto-wrap reads the block classes to shard from the top module
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def forward(self, batch):
        view1 = self._augment(batch) if self._augment is not None else batch
        maps, feat, _ = self._taps(view1)
        feat2 = None
        if self._second_view:
            view2 = self._augment(batch) if self._augment is not None else batch
            _, feat2, _ = self._taps(view2)  # a second dropout pass for text
        return maps, feat, feat2


# --------------------------------------------------------------------------- the defense

class MIMIC:
    """``MIMIC(config).fit(teacher, tokenizer, clean)`` → :class:`MIMICResult` with the student.

    ``clean``: clean unlabelled text (a :class:`TextDataset`; labels are ignored) or, for any
    ``nn.Module``, an iterable of input batches (dicts or tensors) via ``batches=``; a tensor is
    a Hugging Face model's main input (``model.main_input_name``), a plain module's positional
    argument. At least 8 clean inputs in all (MINE's minimum).

    ``fit`` seeds the global torch RNG with ``config.seed`` for the dropout views (the student's
    init and MINE use their own seeded streams) and restores the caller's global RNG states
    afterwards, also when it fails.
    """

    def __init__(self, config: MIMICConfig | None = None, **overrides):
        self.config = config or MIMICConfig(**overrides)
        if config is not None and overrides:
            self.config = MIMICConfig(**{**asdict(config), **overrides})

    # ..................................................................... data
    def _batches(self, tokenizer, clean, epoch: int):
        """One epoch's input batches: a seeded shuffled loader over a TextDataset (its ``labels``
        are dropped in the loop: MIMIC uses no labels), or the caller's iterable as given."""
        cfg = self.config
        if isinstance(clean, TextDataset):
            return make_loader(clean, tokenizer, cfg.batch_size, cfg.max_length, shuffle=True,
                               seed=cfg.seed * 1000 + epoch)
        return clean

    @torch.no_grad()
    def _pooled(self, taps: _Taps, tokenizer, clean, device) -> tuple[list[torch.Tensor], torch.Tensor]:
        cfg = self.config
        was = taps.model.training
        taps.model.eval()
        pooled, finals, seen = None, [], 0
        try:
            data = clean.take(cfg.mine_samples, seed=cfg.seed) if isinstance(clean, TextDataset) else clean
            it = (make_loader(data, tokenizer, 128, cfg.max_length) if isinstance(data, TextDataset)
                  else data)
            for b in it:
                b = _to(b, device)
                if isinstance(b, dict):
                    b.pop("labels", None)
                maps, feat, mask = taps(b)
                if pooled is None:
                    pooled = [[] for _ in maps]
                for acc, h in zip(pooled, maps):
                    acc.append(_pool(h, mask).cpu())
                finals.append(feat.float().cpu())
                seen += feat.shape[0]
                if seen >= cfg.mine_samples:
                    break
        finally:
            taps.model.train(was)
        return [torch.cat(p) for p in pooled], torch.cat(finals)

    def _estimate_mi(self, taps, tokenizer, clean, device, tag, result: MIMICResult):
        cfg = self.config
        pooled, final = self._pooled(taps, tokenizer, clean, device)
        if final.shape[0] < MIN_SAMPLES:  # a TextDataset was refused up front; batches= here
            raise ValueError(f"batches hold {final.shape[0]} inputs in all; MIMIC needs at least "
                             f"{MIN_SAMPLES} (MINE estimates the layer weights from their "
                             f"features)")
        mine = MINE(steps=cfg.mine_steps, hidden=cfg.mine_hidden, batch_size=256, lr=1e-3,
                    seed=cfg.seed)
        ests = estimate_layer_mi(pooled, final, mine)
        mi = [e.mi for e in ests]
        result.mi_curves = [e.curve for e in ests]
        result.mi_history.append({"when": tag, "mi": mi})
        return mi

    # ..................................................................... fit
    def fit(self, teacher: nn.Module, tokenizer=None, clean: TextDataset | None = None, *,
            student: nn.Module | None = None, teacher_layers: Sequence | None = None,
            student_layers: Sequence | None = None, feature_fn: Callable | None = None,
            augment: Callable | None = None, batches=None) -> MIMICResult:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        data = clean if clean is not None else batches
        if data is None:
            raise ValueError("pass clean (a TextDataset of clean unlabelled text) or batches=")
        if not isinstance(data, TextDataset) and iter(data) is data:
            # A generator is spent by the MI pass and each epoch re-reads the data: hold the
            # batches (a one-shot iterator trained 0 steps and returned a random student).
            data = list(data)
            if not data:
                raise ValueError("batches is empty")
        if _is_hf(teacher) and getattr(teacher, "base_model", teacher) is not teacher:
            kind = type(teacher).__name__
            raise TypeError(f"teacher must be an encoder (AutoModel), got the task model {kind}; "
                            f"pass its encoder, teacher.base_model")
        if isinstance(data, TextDataset):
            if tokenizer is None:
                raise ValueError("a tokenizer is needed to tokenise the clean TextDataset")
            if len(data) == 0:
                raise ValueError("clean is empty")
            if len(data) < MIN_SAMPLES:
                raise ValueError(f"clean has {len(data)} examples; MIMIC needs at least "
                                 f"{MIN_SAMPLES} (MINE estimates the layer weights from their "
                                 f"features)")
            check_tokenizer(teacher, tokenizer, "teacher")
        t0 = time.perf_counter()
        device = next(teacher.parameters()).device
        # The teacher is frozen and in eval mode while it teaches; both are given back at the end.
        teacher_state = (teacher.training, [p.requires_grad for p in teacher.parameters()])
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        try:
            # the seeding in _distil, and the draws of the MI pass's loader, stay ours
            with rng_preserved():
                return self._fit(teacher, tokenizer, data, device, t0, student, teacher_layers,
                                 student_layers, feature_fn, augment)
        finally:
            teacher.train(teacher_state[0])
            for p, flag in zip(teacher.parameters(), teacher_state[1]):
                p.requires_grad_(flag)

    def _fit(self, teacher, tokenizer, data, device, t0, student, teacher_layers, student_layers,
             feature_fn, augment) -> MIMICResult:
        cfg = self.config

        if student is None:
            student = make_student(teacher, cfg.student_layers, cfg.student_overrides, cfg.seed)
        elif cfg.student_layers is not None or cfg.student_overrides:
            raise ValueError("MIMICConfig.student_layers / student_overrides shape the student "
                             "fit() builds, but a student= was passed (used as given): drop "
                             "one or the other")
        # A caller's student goes back to its own mode when the run fails; on success it is the
        # result, in eval mode. Accelerate's wrappers come off the student's step either way.
        with handing_back(student) as stage:
            result = self._distil(teacher, tokenizer, data, device, student, teacher_layers,
                                  student_layers, feature_fn, augment, stage)
        student.eval()
        result.seconds = time.perf_counter() - t0
        return result

    def _distil(self, teacher, tokenizer, data, device, student, teacher_layers, student_layers,
                feature_fn, augment, stage: dict) -> MIMICResult:
        """The run itself; ``stage`` receives the accelerator and the wrapped step once the stage
        is prepared, for :meth:`_fit` to release."""
        cfg = self.config
        student.to(device).train()
        _check_fresh(teacher, student)
        if _is_hf(teacher) and _is_hf(student):
            widths = [_hf_width(m) for m in (teacher, student)]
            if widths[0] != widths[1]:  # refused here, not after minutes of MINE
                raise ValueError(f"the student's hidden_size {widths[1]} differs from the "
                                 f"teacher's {widths[0]}: the clone loss compares their features "
                                 f"directly; make the student smaller in depth (student_layers) "
                                 f"or other fields, not in width")

        if (teacher_layers is None) != (student_layers is None):
            raise ValueError("pass both teacher_layers and student_layers (paired in order), or "
                             "neither to pair them by depth")
        if teacher_layers is None:
            if not (_is_hf(teacher) and _is_hf(student)):
                raise ValueError("for a plain nn.Module pass teacher_layers and student_layers "
                                 "(module names, paired in order)")
            pairs = layer_pairs(_hf_depth(teacher), _hf_depth(student))
            teacher_layers = [t for t, _ in pairs]
            student_layers = [s for _, s in pairs]
        if len(teacher_layers) != len(student_layers) or not teacher_layers:
            raise ValueError(f"teacher_layers ({len(teacher_layers)}) and student_layers "
                             f"({len(student_layers)}) must pair up, at least one layer")
        for role, model, ids in (("teacher", teacher, teacher_layers),
                                 ("student", student, student_layers)):
            depth = _hf_depth(model)
            bad = [i for i in ids if isinstance(i, int) and depth is not None
                   and not 1 <= i <= depth]
            if bad:  # hidden_states[0] is the embedding output, 1..depth the layers
                raise ValueError(f"{role}_layers {bad} are not layers of the {role} (1 to "
                                 f"{depth})")
        n_batches = _count(data, cfg.batch_size)
        if n_batches == 0:
            raise ValueError("batches is empty")
        # The taps hook the caller's modules (by name): they come off on every exit path, an
        # error before the loop included (the caller's RNG streams are restored by fit).
        taps: list[_Taps] = []
        try:
            t_taps = _Taps(teacher, teacher_layers, feature_fn)
            taps.append(t_taps)
            s_taps = _Taps(student, student_layers, feature_fn)
            taps.append(s_taps)
            result = MIMICResult(student, list(teacher_layers), list(student_layers), [], [],
                                 mi_source=cfg.mi_source)
            result.clean_examples = _len(data) or 0

            mi_taps = t_taps if cfg.mi_source == "teacher" else s_taps
            mi = self._estimate_mi(mi_taps, tokenizer, data, device, "init", result)
            weights = layer_weights(mi, cfg.mi_a, cfg.mi_b)
            result.mi, result.weights = mi, weights

            params = [p for p in student.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            # batches= is this process's share already (see the module docstring); a TextDataset
            # is sharded by accelerate each epoch
            total = scheduler_steps(cfg.epochs, n_batches,
                                    per_rank=not isinstance(data, TextDataset))
            warm = int(cfg.warmup_ratio * total)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / max(1, warm)) * max(0.0, 1 - s / total)
                if warm else max(0.0, 1 - s / total))
            from tqdm.auto import tqdm

            step_fn = _StudentStep(student, s_taps, augment, cfg.ssl_weight > 0)
            tau = cfg.ssl_temperature
            if tau is None:
                tau = 0.5 if augment is not None else 0.05
            accelerator = None
            if distributed_launch():
                from accelerate.utils import broadcast_object_list

                from purify_fast.distributed import prepare_stage

                accelerator, step_fn, opt, sched = prepare_stage(step_fn, opt, scheduler=sched)
                stage.update(accelerator=accelerator, net=step_fn)  # released by _fit
                device = accelerator.device
                teacher.to(device)
                # Rank 0's MI estimate decides every rank's layer weights.
                mi, weights = broadcast_object_list([mi, weights], from_process=0)
                result.mi, result.weights = mi, weights

            torch.manual_seed(cfg.seed)
            rank_dropout_seed(cfg.seed, accelerator)  # under a launch, each rank its own views
            step, warned_single = 0, False
            for epoch in range(cfg.epochs):
                if cfg.mi_source == "student" and epoch > 0 and epoch % cfg.mi_every == 0:
                    mi = self._estimate_mi(s_taps, tokenizer, data, device, f"epoch {epoch}",
                                           result)
                    weights = layer_weights(mi, cfg.mi_a, cfg.mi_b)
                    if accelerator is not None:
                        mi, weights = broadcast_object_list([mi, weights], from_process=0)
                    result.mi, result.weights = mi, weights
                batches = self._batches(tokenizer, data, epoch)
                if accelerator is not None and isinstance(data, TextDataset):
                    batches = accelerator.prepare_data_loader(batches)  # this rank's share
                main = accelerator is None or accelerator.is_main_process
                bar = tqdm(batches, total=_len(batches) or n_batches or None,
                           desc=f"mimic {epoch + 1}/{cfg.epochs}",
                           disable=not cfg.progress or not main)
                for batch in bar:
                    if isinstance(data, TextDataset):
                        batch.pop("labels", None)  # our own loader's dict; callers' stay intact
                    batch = _to(batch, device)
                    with torch.no_grad():
                        t_maps, t_feat, mask = t_taps(batch)
                    s_maps, s_feat, s_feat2 = step_fn(batch)
                    l_clone = clone_loss(s_feat, t_feat)
                    # a bf16 teacher's maps in the (fp32) student's dtype
                    t_maps = [t.detach().to(s.dtype) for t, s in zip(t_maps, s_maps)]
                    l_attn = attention_map_loss(s_maps, t_maps, weights,
                                                mask if (mask is not None and s_maps[0].dim() == 3)
                                                else None, backend=cfg.backend)
                    loss = l_clone + cfg.attn_weight * l_attn
                    l_ssl = torch.zeros((), device=device)
                    if s_feat2 is not None:
                        if s_feat.shape[0] < 2 and not warned_single:
                            warned_single = True
                            warnings.warn("a batch of 1 input: the self-supervised NT-Xent term "
                                          "has no negatives and is exactly 0 for it; use "
                                          "batches of 2 or more, or ssl_weight=0",
                                          RuntimeWarning, stacklevel=4)
                        l_ssl = nt_xent(s_feat, s_feat2, tau)
                        loss = loss + cfg.ssl_weight * l_ssl
                    opt.zero_grad(set_to_none=True)
                    if accelerator is not None:
                        accelerator.backward(loss)  # averages the gradients over the ranks
                        accelerator.clip_grad_norm_(step_fn.parameters(), 1.0)
                    else:
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    step += 1
                    rec = {"step": step, "epoch": epoch, "loss": loss.item(),
                           "clone": l_clone.item(), "attn": l_attn.item(), "ssl": l_ssl.item()}
                    result.history.append(rec)
                    bar.set_postfix(clone=f"{rec['clone']:.3f}", attn=f"{rec['attn']:.3f}")
        finally:
            for t in taps:
                t.close()
        return result


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch.to(device)


def _len(obj) -> int | None:
    """``len(obj)``, or None when it has none (a DataLoader over an IterableDataset has a
    ``__len__`` that raises TypeError)."""
    try:
        return len(obj)
    except TypeError:
        return None


def _count(data, batch_size: int) -> int:
    """Batches in one epoch of ``data`` (this process's share for ``batches=``)."""
    if isinstance(data, TextDataset):
        return math.ceil(len(data) / batch_size)
    n = _len(data)
    if n is None:
        # A re-iterable without a length (a stream re-opened each epoch, a DataLoader over an
        # IterableDataset): the LR schedule must know its steps up front (counted as 0, its
        # total was 1 and the lr 0 from the second step on). Count them in a pass of their own,
        # holding none: one more read of the data, where materialising them as fit() does for
        # a one-shot iterator would hold the whole epoch in memory (image batches can be large);
        # the MI pass cannot count them, it stops after mine_samples inputs. The schedule
        # assumes every epoch gives this many batches.
        n = sum(1 for _ in data)
    return n


def _check_fresh(teacher: nn.Module, student: nn.Module) -> None:
    """The student must not share storage with the teacher (it would inherit the backdoor)."""
    t_ptrs = {p.untyped_storage().data_ptr() for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if p.untyped_storage().data_ptr() in t_ptrs]
    if shared:
        raise ValueError(f"the student shares storage with the teacher ({shared[:3]} ...); "
                         f"MIMIC needs a freshly initialised student")
    # A copy of the teacher shares no storage but starts from its weights, backdoor included.
    # Constant tensors (LayerNorm's fresh ones and zeros) say nothing; any other equal one does.
    # A copy cast to another dtype (an fp32 copy of a bf16 teacher) is one too: each side is
    # compared in the other's dtype, so the rounded side matches either way.
    t_params = dict(teacher.named_parameters())

    def same(p, t):
        return torch.equal(p, t.to(p.dtype)) or torch.equal(p.to(t.dtype), t)

    copied = [n for n, p in student.named_parameters()
              if n in t_params and t_params[n].shape == p.shape
              and p.is_floating_point() == t_params[n].is_floating_point() and p.numel() > 1
              and not bool((p == p.reshape(-1)[0]).all())
              and same(p.detach(), t_params[n].detach())]
    if copied:
        raise ValueError(f"the student holds the teacher's weights ({copied[:3]} ...): it would "
                         f"inherit the backdoor; MIMIC needs a freshly initialised student")


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def _features(encoder, tokenizer, texts, max_length):
    from purify_fast.attacks.encoder_backdoor import encode_texts

    return F.normalize(encode_texts(encoder, tokenizer, texts, max_length=max_length), dim=-1)


def linear_probe(encoder, tokenizer, train: TextDataset, test: TextDataset,
                 triggered: TextDataset | None = None, target_label: int | None = None, *,
                 max_length: int = 64, epochs: int = 300, lr: float = 0.1, seed: int = 0) -> dict:
    """Logistic-regression probe on frozen (L2-normalised, mean-pooled) features, trained on
    ``train``; returns ``{"cacc", "asr", "asr_no_trigger"}`` (ASR: share of ``triggered``
    predicted ``target_label``; ``triggered`` must hold only non-target inputs; ``asr_no_trigger``:
    share of the clean non-target ``test`` inputs predicted ``target_label``). The probe's init
    is drawn from ``seed``; the caller's global RNG states are left as they were."""
    if _is_hf(encoder) and getattr(encoder, "base_model", encoder) is not encoder:
        raise TypeError(f"encoder must be an encoder (AutoModel), got the task model "
                        f"{type(encoder).__name__}; pass its encoder, model.base_model")
    if len(train) < 2 or len(set(train.labels)) < 2:
        raise ValueError(f"the probe's training set needs at least 2 examples of 2 classes, got "
                         f"{len(train)} example(s) of {len(set(train.labels))} class(es)")
    for name, data in (("test", test), ("triggered", triggered)):
        if data is not None and data.num_labels != train.num_labels:
            raise ValueError(f"{name} has {data.num_labels} classes, the probe's training set "
                             f"{train.num_labels}")
    if target_label is not None and not 0 <= target_label < train.num_labels:
        raise ValueError(f"target_label {target_label} is not a class (0 to "
                         f"{train.num_labels - 1})")
    x_tr = _features(encoder, tokenizer, train.texts, max_length)
    y_tr = torch.tensor(train.labels)
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    with rng_preserved():  # its default init draws from the global stream; replaced from gen
        head = nn.Linear(x_tr.shape[1], train.num_labels)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = F.cross_entropy(head((x_tr - mu) / sd), y_tr) + 1e-3 * head.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def pred(texts):
        return head((_features(encoder, tokenizer, texts, max_length) - mu) / sd).argmax(-1)

    test_pred, test_y = pred(test.texts), torch.tensor(test.labels)
    out = {"cacc": float((test_pred == test_y).float().mean()), "asr": None, "asr_no_trigger": None}
    if target_label is not None and bool((test_y != target_label).any()):
        # The same rate on the clean non-target inputs: the floor under ASR (see evaluation.py).
        out["asr_no_trigger"] = float((test_pred[test_y != target_label] == target_label).float().mean())
    if triggered is not None:
        if target_label is None:
            raise ValueError("target_label is required with a triggered set")
        if any(y == target_label for y in triggered.labels):
            raise ValueError("triggered must hold only non-target examples")
        out["asr"] = float((pred(triggered.texts) == target_label).float().mean())
    return out


def plot_curves(result: MIMICResult, path: str | Path) -> Path:
    """MI estimates per layer (MINE training curves) and the distillation losses, as one PNG
    (written atomically)."""
    from purify_fast.report import pyplot, save_figure

    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    # the curves are of the layers MI was estimated on: the student's with mi_source="student"
    student_mi = result.mi_source == "student"
    layers = result.student_layers if student_mi else result.teacher_layers
    for i, curve in enumerate(result.mi_curves):
        ax1.plot(curve, label=f"{'student' if student_mi else 'teacher'} layer {layers[i]}: "
                             f"MI≈{result.mi[i]:.2f}, w={result.weights[i]:.0f}")
    ax1.set(title="MINE (DV bound) per layer", xlabel="logged step", ylabel="nats")
    steps = [h["step"] for h in result.history]
    for key in ("loss", "clone", "attn", "ssl"):
        ax2.plot(steps, [h[key] for h in result.history], label=key)
    ax2.set(title="MIMIC distillation losses", xlabel="step", ylabel="loss")
    # An empty panel says why, rather than showing a legend of empty lines (or none: a warning)
    for ax, empty, what in ((ax1, not result.mi_curves, "no MINE curve recorded"),
                            (ax2, not result.history, "no distillation step taken")):
        if empty:
            ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center",
                    color="grey")
        else:
            ax.legend(fontsize=7 if ax is ax1 else None)
    return save_figure(fig, path, dpi=100)
