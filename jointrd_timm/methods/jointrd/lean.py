"""The autograd machinery of ``JointRDConfig.lean_memory`` (docs/jointrd.md): each hybrid path's backward runs
where its gradient joins the twin's, inside the caller's ``loss.backward()``, once the twin's later stages have
freed their activations; and the per-stage gradient scaling of ``loss_normalization='per_stage'``.

The returned loss passes through a tap (:meth:`_LeanPaths.tap`), which records the gradient the caller's backward brings to it
(a GradScaler's scale, a 1/accumulation factor); the twin's stage output h_k passes through :class:`_PathGate` on
its way into stage k+1, whose backward adds path k's gradient, scaled by what the tap recorded."""
from typing import Callable, Dict, List, Optional

import torch

__all__ = ['scale_grad']


class _OnGradient(torch.autograd.Function):
    """Identity forward; on the way back the gradient is what ``fn`` makes of it (``fn`` may also record it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        ctx.fn = fn
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.fn(grad), None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``factor`` (no node when factor is 1)."""
    return x if factor == 1.0 else _OnGradient.apply(x, lambda grad: grad * factor)


class _LeanPaths:
    """One lean forward's hybrid paths, waiting for the caller's backward. Each path k holds either its term's graph
    (deferred: its backward runs at path k's gate, once the twin's backward has freed stages k+1..n) or the
    gradients already taken in the forward (eager: for tails that save whole activations, freed at once); and the
    gradient the caller's backward brings to the returned loss (a GradScaler's scale, a 1/accumulation factor),
    which both are scaled by."""

    def __init__(self):
        self.paths: Dict[int, tuple] = {}
        self.loss_grad: Optional[torch.Tensor] = None

    def tap(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` unchanged; its backward (the first of the caller's backward) records the incoming gradient."""
        return _OnGradient.apply(loss, self._record_loss_grad)

    def _record_loss_grad(self, grad: torch.Tensor) -> torch.Tensor:
        self.loss_grad = grad
        return grad

    def add(self, k: int, term: torch.Tensor, inputs: List[torch.Tensor], eager: bool) -> None:
        if eager:
            self.paths[k] = (None, None, torch.autograd.grad(term, inputs, allow_unused=True))
        else:
            self.paths[k] = (term, inputs, None)

    def gradients(self, k: int) -> Optional[tuple]:
        """Path k's gradients with respect to (h_k, its connector's parameters), scaled as the loss's; None where
        path k did not run or the returned loss was not what was backpropagated."""
        entry = self.paths.pop(k, None)
        if entry is None or self.loss_grad is None:
            return None
        term, inputs, grads = entry
        if grads is not None:
            return tuple(None if g is None else g * self.loss_grad.to(g.dtype) for g in grads)
        return torch.autograd.grad(term, inputs, self.loss_grad.to(term.dtype), allow_unused=True)


class _PathGate(torch.autograd.Function):
    """Identity on h_k where it enters the twin's stage k+1. Its backward runs when the twin's gradient reaches h_k
    (after the loss tap's, which it depends on) and adds hybrid path k's, so the path's backward runs when the twin's
    later stages have freed their activations; it also returns the gradients of path k's connector."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, lean: _LeanPaths, k: int, *connector: torch.Tensor) -> torch.Tensor:
        ctx.lean, ctx.k, ctx.num_connector = lean, k, len(connector)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        extra = ctx.lean.gradients(ctx.k)
        if extra is None:
            return (grad, None, None) + (None,) * ctx.num_connector
        g_h, *g_connector = extra
        return (grad if g_h is None else grad + g_h, None, None, *g_connector)


def fp16_autocast(x: torch.Tensor) -> bool:
    """Whether ``x``'s device runs under fp16 autocast (where gradients taken in the forward would miss the loss
    scale, so the paths are not backpropagated eagerly)."""
    return torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.float16
