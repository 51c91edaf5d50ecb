"""Learning-rate schedules that torch does not ship: :class:`HoldCosineLR`, the twin's schedule of a recipe with
``lr_hold`` (``Recipe.twin_schedule``; registered with torchdistill as ``HoldCosineLR``, stepped per optimizer
step through the scheduler section's ``scheduling_step: 1``).

Why a conversion may want it: a twin's shortcuts fade over most of its run (``shortcut_fade``), and under an epoch-wise
cosine the last and hardest part of the fade, the removal of what is left of the shortcuts, runs at a small fraction
of the peak, with few steps left to adapt after it. Holding the peak through the fade and annealing after it gives the
shortcut-free twin its own decay. Measured at full CIFAR-10 at depth 56 (the ``-hold08`` run of
benchmarks/results/deep_twin_diagnostics.md); no recipe uses it.
"""
import math
from typing import List, Optional

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ['HoldCosineLR', 'hold_cosine_factor', 'check_hold', 'set_scheduler_run_length']


def check_hold(value, what: str) -> float:
    """``value`` as a float when it is a fraction of the run in [0, 1) (the part at the peak lr before the cosine
    decay), else a ValueError naming ``what`` (the field or argument it came from)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
        raise ValueError(f'{what} must be a fraction of the run in [0, 1) (the part of the run at the peak lr before '
                         f'the cosine decay; 0: no hold), got {value!r}.')
    return float(value)


def hold_cosine_factor(step: int, total_steps: int, hold_steps: int) -> float:
    """The multiple of the peak lr after ``step`` optimizer steps: 1 for the first ``hold_steps`` steps, then a
    cosine from 1 to 0 reached at ``total_steps`` (and 0 after it)."""
    if step <= hold_steps:
        return 1.0
    decay = max(1, total_steps - hold_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - hold_steps, decay) / decay))


class HoldCosineLR(LRScheduler):
    """The peak lr for ``hold`` of the run, then a per-step cosine to 0 at the run's end.

    Args:
        optimizer: its param groups' initial lr is the peak.
        hold: fraction of the run's optimizer steps at the peak, in [0, 1) (0: a per-step cosine over the run).
        epochs: the run's epochs (the run's own count replaces it at each epoch start, :meth:`set_run_length`).
        batches_per_epoch: batches per epoch; None until the run tells it (:meth:`set_run_length`, called by the
            runner and by ``jointrd_pre_epoch_process`` at each epoch start with the training data loader's length).
        grad_accum_steps: batches per optimizer step (gradient accumulation).

    Step it once per optimizer step (torchdistill: ``scheduling_step: 1``). The lr is a closed form of the step
    count, so a scheduler restored from its ``state_dict`` continues exactly where it stopped; the run length is
    set again at every epoch start, so a run resumed with more epochs decays over its new length (from the lr the
    closed form gives there).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, hold: float, epochs: int,
                 batches_per_epoch: Optional[int] = None, grad_accum_steps: int = 1, last_epoch: int = -1):
        hold = check_hold(hold, 'HoldCosineLR: hold')
        if not (isinstance(epochs, int) and epochs > 0):
            raise ValueError(f'HoldCosineLR: epochs must be a positive integer, got {epochs!r}.')
        self.hold, self.epochs, self.batches_per_epoch, self.grad_accum_steps = hold, epochs, None, 1
        if batches_per_epoch is not None:
            self.set_run_length(batches_per_epoch, epochs, grad_accum_steps)
        super().__init__(optimizer, last_epoch)

    def set_run_length(self, batches_per_epoch: int, epochs: Optional[int] = None, grad_accum_steps: int = 1) -> None:
        """The run's batches per epoch, its epochs (None: as before) and its batches per optimizer step."""
        for name, value in (('batches_per_epoch', batches_per_epoch), ('epochs', epochs),
                            ('grad_accum_steps', grad_accum_steps)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f'HoldCosineLR: {name} must be a positive integer, got {value!r}.')
        self.batches_per_epoch, self.grad_accum_steps = batches_per_epoch, grad_accum_steps
        if epochs is not None:
            self.epochs = epochs

    @property
    def total_steps(self) -> int:
        """The run's optimizer steps (torchdistill counts batches across epochs and steps every grad_accum_steps)."""
        return max(1, self.epochs * self.batches_per_epoch // self.grad_accum_steps)

    def factor(self, step: int) -> float:
        if step <= 0:
            return 1.0
        if self.batches_per_epoch is None:
            raise RuntimeError('HoldCosineLR was stepped before it knew the run length: call '
                               'set_run_length(batches_per_epoch) first (torchdistill: use jointrd_pre_epoch_process '
                               'as the pre-epoch process, which does).')
        total = self.total_steps
        # at least the last step decays, however short the run
        return hold_cosine_factor(step, total, min(round(self.hold * total), total - 1))

    def get_lr(self) -> List[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]


def set_scheduler_run_length(scheduler, num_batches: int, num_epochs: int, grad_accum_steps: int = 1) -> None:
    """Tell a per-step scheduler that needs it (:class:`HoldCosineLR`) the run's length: ``num_batches`` of the
    training loader per epoch, ``num_epochs``, one optimizer step per ``grad_accum_steps`` batches. Other
    schedulers: nothing."""
    if isinstance(scheduler, HoldCosineLR):
        scheduler.set_run_length(num_batches, num_epochs, max(1, grad_accum_steps or 1))
