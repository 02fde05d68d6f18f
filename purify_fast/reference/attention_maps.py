"""Reference implementation of the MIMIC attention-map loss (readable PyTorch, the truth the
kernels are tested against).

Shapes and math
---------------
A feature map is ``F[B, N, C]``: B examples, N positions (tokens of a transformer, or the H·W
pixels of a CNN map moved to the middle axis), C channels. ``mask[B, N]`` is 1 for real
positions and 0 for padding (all ones for images). With ``m`` the mask::

    s[b, n] = m[b, n] · Σ_c F[b, n, c]²                       (channel energy per position)
    A(F)[b, n] = s[b, n] / max(‖s[b, :]‖₂, eps)                (L2-normalised over positions)

so padded positions carry no attention and do not change the norm. For one layer, with a student
map ``F_S[B, N, C_S]`` and a teacher map ``F_T[B, N, C_T]`` (C_S and C_T may differ: a smaller
student only has to agree on where the energy lies, not on the channel count)::

    row_loss[b] = Σ_n (A(F_S)[b, n] − A(F_T)[b, n])²
    MSE_l       = Σ_b row_loss[b] / Σ_{b,n} m[b, n]           (mean over real positions)

and the MIMIC attention loss over the chosen layers is ``Σ_l w_l · MSE_l``.

Gradients (used by every backend's backward; ``a = A(F_S)``, ``t = A(F_T)``, per row)::

    g_a = 2 (a − t),  g_t = −2 (a − t)
    dL/ds_S = (g_a − a·⟨a, g_a⟩) / ‖s_S‖   if ‖s_S‖ > eps,  else g_a / eps
    dL/ds_T = (g_t − t·⟨t, g_t⟩) / ‖s_T‖   (same rule)
    dL/dF[b, n, c] = dL/ds[b, n] · 2 F[b, n, c]   (dL/ds is already 0 where m = 0)
"""

from __future__ import annotations

import torch

DEFAULT_EPS = 1e-12


def attention_map(feat: torch.Tensor, mask: torch.Tensor | None = None,
                  eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``A(F)``: fp32 (fp64 for fp64 input) ``[B, N]`` attention map of ``feat[B, N, C]`` with padding masked."""
    # fp32 math for half inputs; fp64 stays fp64 (gradchecks).
    s = feat.to(torch.promote_types(feat.dtype, torch.float32)).pow(2).sum(-1)
    if mask is not None:
        s = s * mask.to(s.dtype)
    return s / s.norm(dim=-1, keepdim=True).clamp_min(eps)


def attention_row_loss(student: torch.Tensor, teacher: torch.Tensor,
                       mask: torch.Tensor | None = None, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``row_loss[b] = Σ_n (A(F_S) − A(F_T))²`` as fp32 ``[B]`` (fp64 for an fp64 map;
    differentiable)."""
    return (attention_map(student, mask, eps) - attention_map(teacher, mask, eps)).pow(2).sum(-1)


def attention_layer_mse(student: torch.Tensor, teacher: torch.Tensor,
                        mask: torch.Tensor | None = None, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``MSE_l``: the squared map difference averaged over real (unmasked) positions."""
    count = (float(mask.ne(0).sum()) if mask is not None
             else float(student.shape[0] * student.shape[1]))
    return attention_row_loss(student, teacher, mask, eps).sum() / max(count, 1.0)


def attention_map_loss(student_feats, teacher_feats, weights, mask: torch.Tensor | None = None,
                       eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``Σ_l w_l · MSE(A(F_S,l), A(F_T,l))`` over paired lists of ``[B, N, C_l]`` maps (fp32
    scalar, fp64 when a map is fp64). Gradients flow to whichever inputs require them."""
    total = torch.zeros((), dtype=torch.float32, device=student_feats[0].device)
    for fs, ft, w in zip(student_feats, teacher_feats, weights):
        total = total + float(w) * attention_layer_mse(fs, ft, mask, eps)
    return total
