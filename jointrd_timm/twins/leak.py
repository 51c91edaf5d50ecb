"""Leaky activations for a fading twin: its ReLUs let a share of their negative inputs through while its shortcuts
fade, and are ReLUs again when the fade ends.

A deep twin loses the identity paths of its shortcuts during the fade; a ReLU passes nothing below 0, so a plain
chain of many blocks can lose signal that its teacher's shortcuts carried around them (Monti et al. 2018 and the
plain-net literature anneal leaky activations for this reason). :func:`make_leaky` replaces every ``nn.ReLU``
module of a model with a :class:`LeakingReLU`, ``relu(x) + a * min(x, 0)``, whose slope ``a`` (a non-persistent
buffer: the state dict is unchanged) the training sets each step (:class:`~jointrd_timm.methods.fading.ShortcutFade`
with ``leak``). At ``a = 0`` it is the ReLU exactly; :func:`restore_relus` (called by ``finish_fade``) puts the
ReLUs back, so the deployed twin and its export hold plain ``nn.ReLU`` modules.

Model surgery only: which slope when is decided by the fade (:mod:`jointrd_timm.methods.fading`). ReLUs applied as
functions inside a forward (``F.relu``), not modules, are not reached: :func:`make_leaky` returns how many modules
it replaced, and the fade refuses a model where that is none.
"""
from typing import List

import torch
from torch import nn

__all__ = ['LeakingReLU', 'make_leaky', 'set_activation_leak', 'activation_leaks', 'restore_relus']

SLOPE = 'negative_slope'


class LeakingReLU(nn.Module):
    """``relu(x) + negative_slope * min(x, 0)``: a ReLU at slope 0 (bit for bit), a leaky ReLU above it."""

    def __init__(self, slope: float = 0.0, inplace: bool = False):
        super().__init__()
        self.inplace = inplace  # the replaced ReLU's, given back by restore_relus (the leak itself is not in place)
        self.register_buffer(SLOPE, torch.tensor(float(slope)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = getattr(self, SLOPE)
        if not slope:  # exactly a ReLU (and as cheap)
            return torch.relu(x)
        return torch.relu(x) + slope.to(x.dtype) * torch.clamp(x, max=0)

    def extra_repr(self) -> str:
        return f'negative_slope={float(getattr(self, SLOPE)):.4g}'


def _leaking(model: nn.Module) -> List[LeakingReLU]:
    return [m for m in model.modules() if isinstance(m, LeakingReLU)]


def make_leaky(model: nn.Module) -> int:
    """Replace every ``nn.ReLU`` module of ``model`` with a :class:`LeakingReLU` at slope 0 (the same function), in
    place. Idempotent; returns how many activations of ``model`` are leaking afterwards."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.ReLU:  # not subclasses (ReLU6 etc. are other functions)
            parent_name, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent_name), child, LeakingReLU(inplace=module.inplace))
    return len(_leaking(model))


def set_activation_leak(model: nn.Module, slope: float) -> None:
    """Set the negative slope of every :class:`LeakingReLU` of ``model``."""
    if not slope >= 0:
        raise ValueError(f'an activation leak must be a number >= 0, got {slope!r}.')
    for module in _leaking(model):
        getattr(module, SLOPE).fill_(float(slope))


def activation_leaks(model: nn.Module) -> List[float]:
    """The negative slope of each :class:`LeakingReLU` of ``model`` (empty when it has none)."""
    return [float(getattr(m, SLOPE)) for m in _leaking(model)]


def restore_relus(model: nn.Module, force: bool = False) -> nn.Module:
    """Put ``nn.ReLU`` back in place of every :class:`LeakingReLU` of ``model``, in place.

    Raises:
        ValueError: a slope is not 0 (the outputs would change), unless ``force``.
    """
    leaks = activation_leaks(model)
    if leaks and max(leaks) != 0 and not force:
        raise ValueError(f'The activations still leak (negative slope {max(leaks):.4g}, not 0): turning them into '
                         'ReLUs would change the outputs. Train until the fade ends or pass force=True.')
    for name, module in list(model.named_modules()):
        if isinstance(module, LeakingReLU):
            parent_name, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent_name), child, nn.ReLU(inplace=module.inplace))
    return model
