"""Step-wise shortcut removal with a frozen teacher: Tailor's SkipRemover (Weng et al., "Tailor: Altering Skip
Connections for Resource-Efficient Inference", ACM TRETS 2023; code: github.com/oliviaweng/tailor).

The twin S starts as its residual teacher T (a fading twin, :mod:`jointrd_timm.twins.fade`, given T's weights by
the caller, e.g. ``stepwise_model``; every shortcut scale s = 1) and loses one shortcut every ``interval`` epochs: the removed block's s is set to
exactly 0, the others stay 1, so every step trains a network that is either the teacher's or has whole shortcuts
gone. Per batch (x, y):

    with no grad:  z_T = T(x)                                  (frozen teacher, eval mode)
    z_S = S(x)
    L   = mse_weight * MSE(z_S, z_T) + ce_weight * CE(z_S, y)   (Tailor: 0.35 and 0.65)

The schedule: with n fading blocks numbered in removal order k = 0..n-1, block k has no shortcut from progress
``first_removal + k * interval`` epochs on (fractional progress, per step, from the progress counters of
:class:`~jointrd_timm.methods.base.TrainingMethod`; a checkpoint holds them, so a resumed run follows the same
schedule). The twin is deployable (:func:`~jointrd_timm.twins.fade.deployable`) once all n are gone.

DECISIONs (where Tailor's paper and code leave a choice, or where we differ from its code):

* ``order`` (default 'input_first'): Tailor's code removes skip 0 first, and its skip 0 is the first block after
  the stem (``layers[0][0]``); its docstring calls that end the network's "head". 'output_first' is the reverse.
  The values name the end, not "head", which readers take for the classifier end.
* ``first_removal`` (default: ``interval``): the twin first trains ``interval`` epochs with every shortcut, as
  Tailor's code comment intends ("train for how_often epochs first to establish some optimizer states"). Its
  end-of-epoch hook lands one epoch later (skip k goes at the end of 0-based epoch ``interval * (k + 1)``: after 4,
  7, 10, ... epochs for an interval of 3); we do not copy that offset. ``interval`` and ``first_removal`` may be fractional; a removal then
  happens at the first training step whose progress reaches it, and an interval shorter than one step is refused.
* Run length: every removal, the last included, is followed by ``interval`` epochs of training, so a run needs
  ``first_removal + n * interval`` epochs; a shorter one is refused as soon as the run length is known (at
  construction, ``set_run_length`` / ``set_epoch``, or a state-dict load) with the numbers to fix it, and a
  train-mode forward without a known run length is refused (:class:`~jointrd_timm.methods.base.RunLengthError`).
  We do not remove the remaining shortcuts at the end instead: that twin would be deployed untrained without them.
* The scales are set from the progress counters at the start of every training step and at every progress change
  (``set_epoch``, a state-dict load), never between a forward and its backward (autograd holds them): a checkpoint
  reloaded mid-run takes its next step with the scales and the loss the uninterrupted run takes.
* The teacher is in eval mode (running statistics), the frozen-teacher convention of every method here; Tailor's
  LightningModule leaves its teacher in train mode (batch statistics, running statistics updated).
"""
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import RunLengthError, TrainingMethod, check_number, check_teacher_student, model_name
from ..twins.fade import fading_block_count, is_fading, set_shortcut_scale

__all__ = ['StepwiseRemoval', 'removal_points', 'removal_scales', 'stepwise_loss', 'REMOVAL_ORDERS']

REMOVAL_ORDERS = ('input_first', 'output_first')
_ROUNDING = 1e-9  # progress is a float (step / steps_per_epoch): a removal point it reaches up to rounding counts


def removal_points(blocks: int, interval: float, first_removal: Optional[float] = None) -> List[float]:
    """The progress (epochs) at which each of ``blocks`` shortcuts goes, in removal order: ``first_removal + k *
    interval`` (``first_removal`` defaults to ``interval``)."""
    first = interval if first_removal is None else first_removal
    return [first + k * interval for k in range(blocks)]


def removal_scales(progress: float, blocks: int, interval: float, first_removal: Optional[float] = None,
                   order: str = 'input_first') -> List[float]:
    """Each fading block's shortcut scale at ``progress`` epochs, blocks in forward order: 0.0 for the blocks whose
    removal point it has reached, 1.0 for the others. 'input_first' removes block 0 first, 'output_first' block
    ``blocks - 1``."""
    if order not in REMOVAL_ORDERS:
        raise ValueError(f'StepwiseRemoval: order must be one of {REMOVAL_ORDERS} (the end of the network whose '
                         f'shortcut goes first), got {order!r}.')
    removed = sum(progress + _ROUNDING >= point for point in removal_points(blocks, interval, first_removal))
    scales = [0.0] * removed + [1.0] * (blocks - removed)
    return scales if order == 'input_first' else scales[::-1]


def stepwise_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  mse_weight: float = 0.35, ce_weight: float = 0.65) -> Dict[str, torch.Tensor]:
    """``mse_weight * MSE(z_S, z_T) + ce_weight * CE(z_S, y)`` (MSE: mean over every logit); the total and its
    parts (detached)."""
    mse = F.mse_loss(logits, teacher_logits.detach())
    ce = F.cross_entropy(logits, targets)
    return dict(loss=mse_weight * mse + ce_weight * ce, mse=mse.detach(), ce=ce.detach())


class StepwiseRemoval(TrainingMethod):
    """Tailor's SkipRemover (see the module docstring): a fading twin loses one shortcut every ``interval`` epochs,
    trained on ``mse_weight`` MSE to a frozen teacher's logits plus ``ce_weight`` cross-entropy.

    Args:
        student: a fading twin (``timm.create_model('plain_<arch>', shortcut_fade=True)``), normally started from
            the teacher's weights (``load_teacher_weights``; ``stepwise_model`` in a YAML does it).
        teacher: the trained residual network (frozen here: eval mode, no gradients).
        interval: epochs between two removals (Tailor's CIFAR code: 3); may be fractional.
        order: 'input_first' (Tailor's code: the block nearest the input first) or 'output_first'.
        first_removal: epochs before the first removal; None: ``interval``.
        mse_weight, ce_weight: the loss weights (Tailor: 0.35, 0.65).
        num_epochs, steps_per_epoch: the run length, for a loop that does not call ``set_epoch``.

    Train mode, ``forward(x, y)``: a dict with ``loss``, its parts ``mse`` and ``ce``, ``logits`` and
    ``teacher_logits`` (without ``y``: only the logits); one step counted. Eval mode: the twin's logits.
    """
    fades_shortcuts = True

    def __init__(self, student: nn.Module, teacher: nn.Module, interval: float = 3, order: str = 'input_first',
                 first_removal: Optional[float] = None, mse_weight: float = 0.35, ce_weight: float = 0.65,
                 num_epochs: int = 0, steps_per_epoch: int = 0):
        check_teacher_student(teacher, student, 'StepwiseRemoval')
        if not is_fading(student):
            raise ValueError(f'StepwiseRemoval: the student {type(student).__name__} has no fading shortcuts to '
                             "remove; build it with timm.create_model('plain_<arch>', shortcut_fade=True) (in a "
                             'YAML, stepwise_model does).')
        interval = check_number(interval, 'StepwiseRemoval: interval', 0.0, above=True)
        if first_removal is not None:
            first_removal = check_number(first_removal, 'StepwiseRemoval: first_removal', 0.0)
        removal_scales(0.0, 0, interval, order=order)  # validates the order
        super().__init__()
        self.interval, self.first_removal, self.order = interval, first_removal, order
        self.mse_weight = check_number(mse_weight, 'StepwiseRemoval: mse_weight', 0.0)
        self.ce_weight = check_number(ce_weight, 'StepwiseRemoval: ce_weight', 0.0)
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.blocks = fading_block_count(student)
        self.apply_progress()
        if num_epochs or steps_per_epoch:
            self.set_run_length(num_epochs, steps_per_epoch)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def frozen_modules(self) -> list:
        return [self.teacher]

    # -- the schedule -----------------------------------------------------------------------------------------------
    @property
    def epochs_needed(self) -> float:
        """``first_removal + blocks * interval``: the last removal, then ``interval`` epochs of training."""
        return removal_points(self.blocks, self.interval, self.first_removal)[-1] + self.interval

    def block_scales(self) -> List[float]:
        """The per-block shortcut scales at the current progress (forward order)."""
        return removal_scales(self.progress, self.blocks, self.interval, self.first_removal, self.order)

    @property
    def shortcuts_removed(self) -> int:
        """The blocks whose shortcut is gone in the twin as it is now (as trained last, or as evaluated)."""
        return self._scales_set.count(0.0)

    def check_run_length(self) -> None:
        """Refuse a run that would not remove every shortcut with ``interval`` epochs of training after the last.

        Raises:
            ValueError: naming the blocks, the interval and the epochs needed, when the run is too short.
        """
        epochs, steps = int(self.num_epochs), int(self.steps_per_epoch)
        name = model_name(self.student)
        if steps > 0 and self.interval * steps < 1 - _ROUNDING:
            raise ValueError(f'StepwiseRemoval: interval {self.interval:g} epochs is shorter than one training step '
                             f'(1/{steps} epoch), so several shortcuts would go at once; give interval >= '
                             f'{1 / steps:.4g}.')
        if self.epochs_needed > epochs + _ROUNDING:
            first = self.interval if self.first_removal is None else self.first_removal
            fits = epochs / (self.blocks + 1) if self.first_removal is None else (epochs - first) / self.blocks
            needed = (f'{self.epochs_needed:g} epochs, and the run has {epochs}. Give train.num_epochs >= '
                      f'{math.ceil(self.epochs_needed - _ROUNDING)}')
            if fits > 0 and steps > 0 and fits * steps < 1 - _ROUNDING:  # no interval fits: one step each at least
                alternative = (f'; no shorter interval fits, since every removal takes one training step at least '
                               f'and the run has {epochs * steps} steps for {self.blocks} removals and the training '
                               'after the last: give more epochs or more steps per epoch (a smaller batch).')
            else:
                shorter = f'an interval <= {fits:.4g}' if fits > 0 else f'a first_removal below {epochs}'
                alternative = (f', or {shorter} (models.model.kwargs.interval / first_removal in a stepwise_model '
                               'YAML).')
            raise ValueError(
                f'StepwiseRemoval: {name} has {self.blocks} shortcut blocks; removing one every {self.interval:g} '
                f'epoch(s) from epoch {first:g} on, each followed by {self.interval:g} epoch(s) of training, needs '
                + needed + alternative)

    def apply_progress(self) -> None:
        if self.knows_run_length:
            self.check_run_length()
        scales = self.block_scales()
        if scales != getattr(self, '_scales_set', None):  # written only when they change: autograd may hold them
            set_shortcut_scale(self.student, scales)
            self._scales_set = scales

    def epoch_metrics(self) -> Dict[str, float]:
        return dict(shortcuts_removed=float(self.shortcuts_removed))

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Eval mode: the twin's logits. Train mode: one step (see the class docstring)."""
        if not self.training:
            return self.student(x)
        if not self.knows_run_length:
            raise RunLengthError(
                'StepwiseRemoval: the run length must be known before training, to check that every shortcut is '
                f'removed before the end ({self.epochs_needed:g} epochs needed): pass num_epochs and steps_per_epoch '
                'when building the module (or call set_run_length), or call set_epoch(epoch, steps_per_epoch, '
                'num_epochs) at the start of every epoch (the runner and jointrd_pre_epoch_process do).')
        self.apply_progress()
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        logits = self.student(x)
        out = dict(logits=logits, teacher_logits=teacher_logits)
        if targets is not None:
            out.update(stepwise_loss(logits, teacher_logits, targets, self.mse_weight, self.ce_weight))
        self.count_step()
        return out
