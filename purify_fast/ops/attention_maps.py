"""MIMIC attention-map loss: ``Σ_l w_l · MSE(A(F_S,l), A(F_T,l))`` with padding masked.

The math is in :mod:`purify_fast.reference.attention_maps`. Every backend module implements this
contract on contiguous tensors, writing into preallocated fp32 outputs:

=====================================================================================  ==========
``attention_map_forward(fs[B,N,CS], ft[B,N,CT], mask_fp32[B,N], eps, loss[B], gs[B,N], gt[B,N])``  rows
``attention_map_backward(f[B,N,C], g_fp32[B,N], scale, out[B,N,C])``                   dF
=====================================================================================  ==========

``gs``/``gt`` come back holding ``dL_row/ds`` for the student/teacher, so the backward is a single
elementwise pass ``dF = scale · g · 2F`` over the features that need a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from purify_fast import backend as _backend
from purify_fast.ops._first_order import first_order_only
from purify_fast.reference import attention_maps as ref

DEFAULT_EPS = ref.DEFAULT_EPS


def _as_tokens(feat: torch.Tensor, name: str) -> torch.Tensor:
    """[B, N, C] view of a feature map: 3-D maps are tokens × channels already; 4-D maps are
    CNN ``[B, C, H, W]`` and become ``[B, H·W, C]``."""
    if not isinstance(feat, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(feat).__name__}")
    if not feat.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {feat.dtype}")
    if feat.dim() not in (3, 4):
        raise ValueError(f"{name} must be [batch, positions, channels] or [batch, channels, H, W]; "
                         f"got shape {tuple(feat.shape)}")
    # Before the 4-D reshape too: an empty CNN map would otherwise give a loss of 0, not an error.
    if feat.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(feat.shape)})")
    return feat.flatten(2).transpose(1, 2) if feat.dim() == 4 else feat


def _kernel_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # Resolve on the one dtype the kernels cannot take, if any, so fp64 falls back to torch.
    for d in dtypes:
        if d not in _backend.KERNEL_DTYPES:
            return d
    return dtypes[0]


class _LayerMSE(torch.autograd.Function):
    """One layer's ``MSE(A(F_S), A(F_T))`` on a compiled backend, differentiable in both maps to
    first order only: a second backward raises (:func:`first_order_only`). Takes contiguous
    maps (the caller copies them under autograd, so the saved maps keep their graph)."""

    @staticmethod
    def forward(ctx, fs, ft, mask, count, eps, name):
        kern = _backend.module(name)
        B, N = fs.shape[:2]
        loss_rows = torch.empty(B, dtype=torch.float32, device=fs.device)
        gs = torch.empty(B, N, dtype=torch.float32, device=fs.device)
        gt = torch.empty(B, N, dtype=torch.float32, device=fs.device)
        kern.attention_map_forward(fs, ft, mask, float(eps), loss_rows, gs, gt)
        ctx.save_for_backward(fs, ft, gs, gt)
        ctx.count, ctx.name = count, name
        return loss_rows.sum() / count

    @staticmethod
    def backward(ctx, grad):
        fs, ft, gs, gt = ctx.saved_tensors
        kern = _backend.module(ctx.name)
        # The upstream gradient is a 0-d tensor; one host sync per layer per step is negligible
        # next to the encoder forward that produced the maps.
        scale = float(grad.detach()) / ctx.count
        grads = []
        with torch.no_grad():  # kernel outputs: nothing for autograd to record under create_graph
            for need, f, g in ((ctx.needs_input_grad[0], fs, gs), (ctx.needs_input_grad[1], ft, gt)):
                if need:
                    d = torch.empty_like(f)
                    kern.attention_map_backward(f, g, scale, d)
                    grads.append(d)
                else:
                    grads.append(None)
        grads = first_order_only("attention_map_loss", ctx.name, grads, (grad, fs, ft))
        return grads[0], grads[1], None, None, None, None


def attention_layer_mse(student: torch.Tensor, teacher: torch.Tensor,
                        mask: torch.Tensor | None = None, *, eps: float = DEFAULT_EPS,
                        backend: str | None = None) -> torch.Tensor:
    """``MSE(A(F_S), A(F_T))`` of one layer, averaged over unmasked positions (a 0-d tensor:
    fp32, or fp64 when either map is fp64, which runs on the torch backend).

    ``student`` ``[B, N, C_S]`` and ``teacher`` ``[B, N, C_T]`` (or CNN ``[B, C, H, W]`` maps with
    equal H·W); ``mask`` ``[B, N]`` (bool/int/float, nonzero = real token) or None. Higher-order
    gradients as :func:`attention_map_loss` (``backend='torch'`` only).
    """
    return attention_map_loss([student], [teacher], [1.0], mask, eps=eps, backend=backend)


def attention_map_loss(student_feats: Sequence[torch.Tensor] | torch.Tensor,
                       teacher_feats: Sequence[torch.Tensor] | torch.Tensor,
                       weights: Sequence[float] | None = None, mask: torch.Tensor | None = None,
                       *, eps: float = DEFAULT_EPS, backend: str | None = None) -> torch.Tensor:
    """MIMIC attention loss ``Σ_l w_l · MSE(A(F_S,l), A(F_T,l))`` (a differentiable 0-d tensor:
    fp32, or fp64 when any map is fp64, which runs on the torch backend).

    ``A(F) = normalise(Σ_channels F²)`` over positions with padding masked (math:
    :mod:`purify_fast.reference.attention_maps`). ``student_feats``/``teacher_feats``: paired
    lists (or single tensors) of ``[B, N, C_l]`` token maps or ``[B, C_l, H, W]`` CNN maps; the
    student's channel count may differ from the teacher's, and without a mask each layer may have
    its own number of positions (a CNN's stages). ``weights``: one float per layer
    (default all 1). ``mask``: ``[B, N]`` for token maps, nonzero on real tokens. Gradients flow
    to every input that requires one (the student's in MIMIC; the teacher is frozen): to any
    order on the ``torch`` backend, to first order only on the kernel backends (``cpp``,
    ``triton``, ``cuda``), where a second backward (``create_graph=True``, e.g. a gradient
    penalty) raises an error naming ``backend='torch'``.
    """
    if isinstance(student_feats, torch.Tensor):
        student_feats = [student_feats]
    if isinstance(teacher_feats, torch.Tensor):
        teacher_feats = [teacher_feats]
    student_feats, teacher_feats = list(student_feats), list(teacher_feats)
    if not student_feats:
        raise ValueError("student_feats is empty: pass at least one layer's feature map")
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"student_feats has {len(student_feats)} layers but teacher_feats has "
                         f"{len(teacher_feats)}")
    if weights is None:
        weights = [1.0] * len(student_feats)
    try:
        weights = [float(w) for w in weights]
    except TypeError:
        raise TypeError(f"weights must be a sequence of floats (one per layer), got "
                        f"{type(weights).__name__}") from None
    if len(weights) != len(student_feats):
        raise ValueError(f"weights has {len(weights)} entries for {len(student_feats)} layers")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite, got {weights}")
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")

    pairs = []
    for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats)):
        fs = _as_tokens(fs, f"student_feats[{i}]")
        ft = _as_tokens(ft, f"teacher_feats[{i}]")
        if fs.shape[:2] != ft.shape[:2]:
            raise ValueError(f"layer {i}: student map has (batch, positions) {tuple(fs.shape[:2])} "
                             f"but teacher map has {tuple(ft.shape[:2])}")
        if fs.device != ft.device:
            raise ValueError(f"layer {i}: student map is on {fs.device}, teacher map on {ft.device}")
        if pairs and fs.shape[0] != pairs[0][0].shape[0]:
            raise ValueError(f"layer {i}: batch {fs.shape[0]} differs from layer 0's "
                             f"{pairs[0][0].shape[0]}")
        # One padding mask serves every layer of a transformer; a CNN's stages have their own
        # resolutions (no mask), each averaged over its own positions.
        if pairs and mask is not None and fs.shape[:2] != pairs[0][0].shape[:2]:
            raise ValueError(f"layer {i}: (batch, positions) {tuple(fs.shape[:2])} differs from "
                             f"layer 0's {tuple(pairs[0][0].shape[:2])}, and one mask is given "
                             f"for all layers")
        if pairs and fs.device != pairs[0][0].device:
            raise ValueError(f"layer {i} is on {fs.device}, layer 0 on {pairs[0][0].device}")
        pairs.append((fs, ft))
    device = pairs[0][0].device
    if mask is None:
        # each layer averaged over its own positions (a CNN's stages differ in resolution)
        masks = [torch.ones(fs.shape[:2], dtype=torch.float32, device=device) for fs, _ in pairs]
        layer_masks = [(m, float(m.numel())) for m in masks]
    else:
        B, N = pairs[0][0].shape[:2]
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != (B, N):
            raise ValueError(f"mask must have shape ({B}, {N}) (batch, positions), got "
                             f"{tuple(mask.shape)}")
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but the feature maps are on {device}")
        mask_f = (mask != 0).to(torch.float32).contiguous()
        layer_masks = [(mask_f, max(float(mask_f.sum()), 1.0))] * len(pairs)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for (fs, ft), w, (mask_l, count) in zip(pairs, weights, layer_masks):
        total = total + w * _layer_mse(fs, ft, mask_l, count, eps, backend)
    return total


def _layer_mse(fs, ft, mask_f, count: float, eps: float, backend) -> torch.Tensor:
    name = _backend.resolve(backend, fs.device, _kernel_dtype(fs.dtype, ft.dtype))
    if name == "torch":
        return ref.attention_row_loss(fs, ft, mask_f, eps).sum() / count
    # Copied outside the Function (a no-op when already contiguous) so the maps it saves link
    # back to the originals' graph, which a refused second backward must reach.
    return _LayerMSE.apply(fs.contiguous(), ft.contiguous(), mask_f, count, eps, name)
