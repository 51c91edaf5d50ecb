"""Shortcut fading as a training schedule (Monti, Tootoonian & Cao, ICANN 2018): the scale ``s`` of a fading
twin's shortcuts (:mod:`jointrd_timm.twins.fade`, the model surgery) follows the run's progress, and
:class:`FadingStudent` trains such a twin alone with cross-entropy. JointRD fades its student with the same
:class:`ShortcutFade`, the one object that carries the fade's settings (the flat ``shortcut_fade*`` fields of a
YAML, a :class:`~jointrd_timm.methods.JointRDConfig` or a recipe become one with :meth:`ShortcutFade.from_fields`)."""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from .base import TrainingMethod
from .schedules import block_scales, capped_fade_horizon, check_fade_order, check_fade_power, fade_scale
from ..twins.fade import FADE_MODES, fading_block_count, is_fading, pin_shortcut_share, set_shortcut_scale
from ..twins.leak import make_leaky, set_activation_leak

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

    ``leak`` > 0 makes the twin's ReLUs leaky while the shortcuts fade (:mod:`~jointrd_timm.twins.leak`), negative
    slope ``leak * 4 s (1 - s)`` (:meth:`leak_at`). DECISION: the slope peaks midway through the fade and is 0 at
    both of its ends, so that a teacher-started twin still starts as its teacher exactly (s = 1) and the twin that
    is deployed is the ReLU twin exactly (s = 0); in between, the negative half of each activation carries some of
    the signal that the shortcuts are giving up.

    The settings are checked here, once, whoever gives them (messages name the flat YAML fields).
    """
    fraction: float
    window: float = 1.0
    power: float = 1.0
    mode: str = 'scale'
    order: str = 'shallow_first'
    leak: float = 0.0

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
        if not _is_number(self.leak) or not 0 <= self.leak <= 1:
            raise ValueError("shortcut_fade_leak must be in [0, 1] (the peak negative slope of the twin's ReLUs "
                             f'during the fade; 0: plain ReLUs), got {self.leak!r}.')
        object.__setattr__(self, 'leak', float(self.leak))
        for name, value in (('fraction', float(self.fraction)), ('window', float(self.window)),
                            ('power', check_fade_power(self.power))):
            object.__setattr__(self, name, value)

    @classmethod
    def from_fields(cls, fields) -> Optional['ShortcutFade']:
        """The fade that the flat fields ``shortcut_fade``, ``shortcut_fade_window``, ``shortcut_fade_power``,
        ``shortcut_fade_mode``, ``shortcut_fade_order`` and ``shortcut_fade_leak`` of ``fields`` (a config or recipe
        object) describe; None when ``shortcut_fade`` is None. The others are checked even then: a mistyped value
        fails whether or not the fade is on."""
        fraction = fields.shortcut_fade
        fade = cls(1.0 if fraction is None else fraction, fields.shortcut_fade_window, fields.shortcut_fade_power,
                   fields.shortcut_fade_mode, fields.shortcut_fade_order, fields.shortcut_fade_leak)
        return None if fraction is None else fade

    def prepare(self, model: nn.Module) -> None:
        """Make ``model`` (a fading twin, its weights already loaded) fade as ``mode`` says, its ReLUs leaky when
        ``leak`` is set (a model without ``nn.ReLU`` modules is refused)."""
        if self.mode == 'share':
            pin_shortcut_share(model)
        if self.leak and not make_leaky(model):
            raise ValueError(f'shortcut_fade_leak={self.leak}: {type(model).__name__} has no nn.ReLU module to make '
                             'leaky (its activations are other functions, or ReLUs called as functions in its '
                             'forward); set shortcut_fade_leak to 0.')

    def leak_at(self, value: float) -> float:
        """The ReLUs' negative slope when the run's shortcut scale is ``value``: ``leak * 4 value (1 - value)``."""
        return self.leak * 4.0 * value * (1.0 - value)

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
        if self.leak:
            set_activation_leak(model, self.leak_at(value))
        return value


class FadingStudent(TrainingMethod):
    """A fading twin trained alone (cross-entropy): ``forward`` is the twin's, with ``s`` set from the training
    progress first (per step). ``student`` is what gets deployed.

    Args:
        student: a fading twin (``timm.create_model('plain_<arch>', shortcut_fade=True)``).
        shortcut_fade: fraction of the run over which ``s`` fades from 1 to 0, or a whole :class:`ShortcutFade`
            (then ``window``, ``power``, ``mode``, ``order`` and ``leak`` stay unset).
        window: 1 (default): all blocks fade together; < 1: staggered, each block over this share of the fade.
        power: the cosine fade raised to this power (1: the cosine itself).
        mode: 'scale' or 'share' (what ``s`` scales, :class:`ShortcutFade`).
        order: 'shallow_first' or 'deep_first': which blocks of a staggered fade lose their shortcuts first.
        leak: the peak negative slope of the twin's ReLUs during the fade (0: plain ReLUs; :class:`ShortcutFade`).
        num_epochs, steps_per_epoch: the run length, for a loop that does not call ``set_epoch`` (see
            :mod:`~jointrd_timm.methods.base`).
    """

    def __init__(self, student: nn.Module, shortcut_fade: Union[float, ShortcutFade],
                 window: float = ShortcutFade.window, power: float = ShortcutFade.power, num_epochs: int = 0,
                 steps_per_epoch: int = 0, mode: str = ShortcutFade.mode, order: str = ShortcutFade.order,
                 leak: float = ShortcutFade.leak):
        if not is_fading(student):
            raise ValueError(f'{type(student).__name__} has no fading shortcuts: build it with '
                             "timm.create_model('plain_<arch>', shortcut_fade=True).")
        if isinstance(shortcut_fade, ShortcutFade):
            if (window, power, mode, order, leak) != (ShortcutFade.window, ShortcutFade.power, ShortcutFade.mode,
                                                      ShortcutFade.order, ShortcutFade.leak):
                raise ValueError('FadingStudent: give window, power, mode, order and leak inside the ShortcutFade, '
                                 'not beside it.')
            fade = shortcut_fade
        else:
            fade = ShortcutFade(shortcut_fade, window, power, mode, order, leak)
        super().__init__()
        self.student = student
        self.fade = fade
        fade.prepare(student)
        if num_epochs or steps_per_epoch:
            self.set_run_length(num_epochs, steps_per_epoch)

    fades_shortcuts = True

    def run_length_schedules(self) -> List[str]:
        return ['the shortcut fade']

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
