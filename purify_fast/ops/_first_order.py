"""Shared by the ops whose backward runs compiled kernels: autograd cannot differentiate those
kernels again, so their gradients must not be handed out as constants under ``create_graph=True``
(a gradient penalty would silently miss the op's part). :func:`first_order_only` links them to
what they depend on through :class:`_SecondOrderRefused`, whose backward raises."""

from __future__ import annotations

import torch


class _SecondOrderRefused(torch.autograd.Function):
    """Returns the given gradients unchanged (copies), linked to their dependencies; a backward
    through them raises an error naming the op, the backend and ``backend='torch'``."""

    @staticmethod
    def forward(ctx, op, backend, n_grads, *tensors):
        ctx.op, ctx.backend = op, backend
        return tuple(t.clone() for t in tensors[:n_grads])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            f"{ctx.op} on the {ctx.backend!r} backend is differentiable once only: its backward "
            f"runs kernels that autograd cannot differentiate again (create_graph=True followed "
            f"by a second backward, e.g. a gradient penalty); use backend='torch' for second "
            f"derivatives")


def first_order_only(op: str, backend: str, grads, deps):
    """``grads`` (a kernel backward's results, None where not needed) as a tuple; under
    ``create_graph=True`` (grad mode on inside a backward) and when any of ``deps`` (the incoming
    gradient and the op's inputs) requires a gradient, linked so that a second backward raises.
    A plain backward returns them as they are, at no cost."""
    deps = [t for t in deps if t is not None and t.requires_grad]
    present = [g for g in grads if g is not None]
    if not (torch.is_grad_enabled() and deps and present):
        return tuple(grads)
    linked = iter(_SecondOrderRefused.apply(op, backend, len(present), *present, *deps))
    return tuple(None if g is None else next(linked) for g in grads)
