"""A weight average of the model a run deploys (``runner.ema_decay``): timm's ``ModelEmaV3`` over the twin.

An exponential moving average of the weights is the usual last step of a timm recipe (``train.py
--model-ema``); a short conversion ends at a low learning rate where it can still smooth the last steps' noise.
What is averaged is the module the runner deploys (``methods.base.deploy_module``: a method's twin, or the trained
model itself), parameters and buffers alike.

DECISION: a fading twin's average starts when its last shortcut is gone. While any shortcut scale is above 0 the
average is the twin itself (copied at every optimizer step): weights trained under different shortcut scales are
weights of different networks, and their average would be the weights of none of them. From the first
shortcut-free step on it averages; with ``warmup`` (timm's ``use_warmup``, default on) the decay grows with the steps
averaged so far, ``1 - (1 + k) ** (-2/3)`` capped at ``decay``, so that a short shortcut-free tail is averaged over
itself rather than held at its first step. A model without fading shortcuts is averaged from its first step.

The average is checkpointed with the run (``state_dict``/``load_state_dict``) and the runner deploys it in place
of the trained twin, with its BatchNorm statistics recomputed like the twin's (``runner.finish``).
"""
from typing import Dict

import torch
from torch import nn

from ..io import with_module_versions
from ..settings import check_ema_decay
from ..twins.fade import set_shortcut_scale, shortcut_scales
from ..twins.leak import activation_leaks, set_activation_leak

__all__ = ['TwinEma']


class TwinEma:
    """The moving average of ``model`` (the live module a run deploys), updated by :meth:`step` after each
    optimizer step. ``module`` is the average, a copy of ``model`` in eval mode."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        from timm.utils import ModelEmaV3
        self.model = model
        self.decay = check_ema_decay(decay, 'runner.ema_decay')
        if not isinstance(warmup, bool):
            raise ValueError(f'runner.ema_warmup must be true or false, got {warmup!r}.')
        self.average = ModelEmaV3(model, decay=self.decay, use_warmup=warmup)
        self.steps = 0  # optimizer steps averaged so far; 0 while a fading twin still has a shortcut

    @property
    def module(self) -> nn.Module:
        return self.average.module

    @torch.no_grad()
    def step(self) -> None:
        """One optimizer step of ``model``: copied while it still fades, averaged from then on."""
        scales = shortcut_scales(self.model)  # empty: no fading blocks, averaged from the start
        if any(scales):  # a shortcut is still there
            self.steps = 0
            self.average.update(self.model, step=0)  # timm: step 0 is decay 0, a copy
        else:
            self.steps += 1
            # timm counts the first update as step 1 (decay 0: the average starts as the model)
            self.average.update(self.model, step=self.steps)
        if scales:  # s (and a leaky fade's slope) is not in the state dict timm averages: the copy takes the twin's
            set_shortcut_scale(self.module, scales)
            leaks = activation_leaks(self.model)
            if leaks:
                set_activation_leak(self.module, max(leaks))  # one slope for all (methods.fading.ShortcutFade)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor], steps: int) -> None:
        """Restore a checkpointed average and the steps it has averaged (a fading twin's, from a step when its
        shortcuts were gone when ``steps`` > 0)."""
        self.module.load_state_dict(with_module_versions(state, self.module))
        self.steps = int(steps)
        if self.steps and shortcut_scales(self.module):
            set_shortcut_scale(self.module, 0.0)
            set_activation_leak(self.module, 0.0)
