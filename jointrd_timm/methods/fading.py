"""Shortcut fading as a training schedule (Monti, Tootoonian & Cao, ICANN 2018): the scale ``s`` of a fading
twin's shortcuts (:mod:`jointrd_timm.twins.fade`, the model surgery) follows the run's progress, and
:class:`FadingStudent` trains such a twin alone with cross-entropy. JointRD fades its student with the same
:class:`ShortcutFade`, the one object that carries the fade's settings (the flat ``shortcut_fade*`` fields of a
YAML, a :class:`~jointrd_timm.methods.JointRDConfig` or a recipe become one with :meth:`ShortcutFade.from_fields`)."""
import math
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import nn

from .base import TrainingMethod
from .schedules import block_scales, capped_fade_horizon, check_fade_order, check_fade_power, fade_scale
from ..twins.fade import FADE_MODES, fading_block_count, is_fading, pin_shortcut_share, set_shortcut_scale

__all__ = ['ShortcutFade', 'FadingStudent']


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ShortcutFade:
    """The fade of one run: ``s`` from 1 to 0 over ``fraction`` of it (:func:`~.schedules.fade_scale`, horizon capped
    at the last step), each block staggered by ``window`` in ``order`` (:func:`~.schedules.block_scales`:
    'shallow_first' or 'deep_first'; only a window < 1 has an order), raised to ``power``.

    ``mode`` says what ``s`` scales. 'scale': the shortcut itself (``branch + s * shortcut``). 'share': the
    shortcut's size relative to the branch (:class:`~jointrd_timm.twins.fade.ShareGain`), so that a network cannot
    keep its shortcuts carrying the signal by shrinking its branches while ``s`` falls; :meth:`prepare` installs it.

    The settings are checked here, once, whoever gives them (messages name the flat YAML fields).
    """
    fraction: float
    window: float = 1.0
    power: float = 1.0
    mode: str = 'scale'
    order: str = 'shallow_first'

    def __post_init__(self):
        if not _is_number(self.fraction) or not 0 < self.fraction <= 1:
            raise ValueError('shortcut_fade must be in (0, 1] (the fraction of the run over which the shortcuts '
                             f'fade; None: no fade), got {self.fraction!r}.')
        if not _is_number(self.window) or not 0 < self.window <= 1:
            raise ValueError('shortcut_fade_window must be in (0, 1] (the fade window of each block, as a share of '
                             f'the fade; 1: all blocks fade together), got {self.window!r}.')
        if self.mode not in FADE_MODES:
            raise ValueError(f'shortcut_fade_mode must be one of {FADE_MODES}, got {self.mode!r}.')
        check_fade_order(self.order)
        for name, value in (('fraction', float(self.fraction)), ('window', float(self.window)),
                            ('power', check_fade_power(self.power))):
            object.__setattr__(self, name, value)

    @classmethod
    def from_fields(cls, fields) -> Optional['ShortcutFade']:
        """The fade that the flat fields ``shortcut_fade``, ``shortcut_fade_window``, ``shortcut_fade_power``,
        ``shortcut_fade_mode`` and ``shortcut_fade_order`` of ``fields`` (a config or recipe object) describe; None
        when ``shortcut_fade`` is None. The others are checked even then: a mistyped value fails whether or not the
        fade is on."""
        fraction = fields.shortcut_fade
        fade = cls(1.0 if fraction is None else fraction, fields.shortcut_fade_window, fields.shortcut_fade_power,
                   fields.shortcut_fade_mode, fields.shortcut_fade_order)
        return None if fraction is None else fade

    def prepare(self, model: nn.Module) -> None:
        """Make ``model`` (a fading twin, its weights already loaded) fade as ``mode`` says."""
        if self.mode == 'share':
            pin_shortcut_share(model)

    def scale(self, method: TrainingMethod) -> float:
        """``s`` at ``method``'s progress."""
        method.require_run_length('the shortcut fade')
        horizon = capped_fade_horizon(self.fraction, int(method.num_epochs), int(method.steps_per_epoch))
        return fade_scale(method.progress, horizon, self.power)

    def apply(self, method: TrainingMethod, model: nn.Module) -> float:
        """Set ``s`` (staggered per block) in ``model``'s fading blocks; returns the run's ``s``."""
        value = self.scale(method)
        # one walk over the modules per step; only a staggered fade needs the block count for its per-block scales
        set_shortcut_scale(model, value if self.window >= 1 else
                           block_scales(value, fading_block_count(model), self.window, self.order))
        return value


class FadingStudent(TrainingMethod):
    """A fading twin trained alone (cross-entropy): ``forward`` is the twin's, with ``s`` set from the training
    progress first (per step). ``student`` is what gets deployed.

    Args:
        student: a fading twin (``timm.create_model('plain_<arch>', shortcut_fade=True)``).
        shortcut_fade: fraction of the run over which ``s`` fades from 1 to 0, or a whole :class:`ShortcutFade`
            (then ``window``, ``power``, ``mode`` and ``order`` stay unset).
        window: 1 (default): all blocks fade together; < 1: staggered, each block over this share of the fade.
        power: the cosine fade raised to this power (1: the cosine itself).
        mode: 'scale' or 'share' (what ``s`` scales, :class:`ShortcutFade`).
        order: 'shallow_first' or 'deep_first': which blocks of a staggered fade lose their shortcuts first.
        num_epochs, steps_per_epoch: the run length, for a loop that does not call ``set_epoch`` (see
            :mod:`~jointrd_timm.methods.base`).
    """

    def __init__(self, student: nn.Module, shortcut_fade: Union[float, ShortcutFade],
                 window: float = ShortcutFade.window, power: float = ShortcutFade.power, num_epochs: int = 0,
                 steps_per_epoch: int = 0, mode: str = ShortcutFade.mode, order: str = ShortcutFade.order):
        if not is_fading(student):
            raise ValueError(f'{type(student).__name__} has no fading shortcuts: build it with '
                             "timm.create_model('plain_<arch>', shortcut_fade=True).")
        if isinstance(shortcut_fade, ShortcutFade):
            if (window, power, mode, order) != (ShortcutFade.window, ShortcutFade.power, ShortcutFade.mode,
                                                ShortcutFade.order):
                raise ValueError('FadingStudent: give window, power, mode and order inside the ShortcutFade, not '
                                 'beside it.')
            fade = shortcut_fade
        else:
            fade = ShortcutFade(shortcut_fade, window, power, mode, order)
        super().__init__()
        self.student = student
        self.fade = fade
        fade.prepare(student)
        if num_epochs or steps_per_epoch:
            self.set_run_length(num_epochs, steps_per_epoch)

    @property
    def fraction(self) -> float:
        return self.fade.fraction

    @property
    def window(self) -> float:
        return self.fade.window

    @property
    def power(self) -> float:
        return self.fade.power

    @property
    def shortcut_scale(self) -> float:
        return self.fade.scale(self)

    def apply_progress(self) -> None:
        if self.knows_run_length:
            self.fade.apply(self, self.student)

    def epoch_metrics(self) -> Dict[str, float]:
        return dict(shortcut_scale=self.shortcut_scale) if self.knows_run_length else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.fade.apply(self, self.student)
            out = self.student(x)
            self.count_step()
            return out
        return self.student(x)
