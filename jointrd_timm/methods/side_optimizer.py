"""An extra module trained by its own optimizer alongside the student, inside the method's train-mode forward: the
adversarial methods' discriminator, JointRD's joint teacher with ``joint_step_order='teacher_first'``.

The module's parameters have ``requires_grad=False`` outside its own step, so the student's optimizer (built from
the trainable parameters) never holds them, and the student's backward never fills their gradients. Its step is
one SGD update on a loss the caller computes; across processes the gradients are averaged explicitly, because DDP
does not see this backward. The optimizer and scheduler are what a method returns from ``extra_optimizers()`` /
``extra_schedulers()``, so checkpoints save and restore them (DECISION in :mod:`jointrd_timm.methods.base`).
"""
import numbers
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .base import check_flag, check_number

__all__ = ['SideOptimizer', 'epoch_scheduler']


def epoch_scheduler(optimizer: torch.optim.Optimizer, cosine_epochs: Optional[int], milestones: Sequence[int],
                    gamma: float):
    """The learning-rate schedule of a side optimizer, stepped once per epoch: cosine annealing to 0 over
    ``cosine_epochs`` epochs when given, else the lr times ``gamma`` at each of ``milestones`` (epochs)."""
    if cosine_epochs:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cosine_epochs)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma)


def check_side_sgd(what: str, lr, momentum, weight_decay, cosine_epochs, milestones, gamma, nesterov=False) -> None:
    """A ValueError naming ``what`` (the config section) and the setting, for settings SGD or its schedule would
    reject only at the first step, or silently misread."""
    check_number(lr, f'{what}.lr', 0.0, meaning='0 freezes it, as for the main optimizer')
    check_number(momentum, f'{what}.momentum', 0.0, 1.0, below=True)
    check_number(weight_decay, f'{what}.weight_decay', 0.0)
    check_number(gamma, f'{what}.gamma', 0.0, above=True)
    check_flag(nesterov, f'{what}.nesterov')
    if cosine_epochs is not None:
        check_number(cosine_epochs, f'{what}.cosine_epochs', 0, integer=True,
                     meaning='epochs of the cosine decay; 0 or none: the milestones')
    if not isinstance(milestones, (list, tuple)) or not all(
            isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 0 for m in milestones):
        raise ValueError(f'{what}.milestones must be a list of epochs (integers >= 0), got {milestones!r}.')


class SideOptimizer:
    """SGD for ``module``, with its per-epoch schedule (:func:`epoch_scheduler`).

    Not a module itself: the trained module is registered by its owner (``adversarial.discriminator.*``,
    ``teacher.*`` in the state dict), the optimizer and scheduler travel through ``extra_optimizers()``.
    """

    def __init__(self, module: nn.Module, lr: float, momentum: float, weight_decay: float,
                 cosine_epochs: Optional[int], milestones: Sequence[int], gamma: float, nesterov: bool = False):
        self.module = module
        self.optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                                         weight_decay=weight_decay)
        self.scheduler = epoch_scheduler(self.optimizer, cosine_epochs, milestones, gamma)
        module.requires_grad_(False)  # trainable only inside its own step

    def set_epoch(self, epoch: int) -> None:
        """Step the schedule up to ``epoch`` (0-based), however many epochs that is: also right after a resume
        restored its ``last_epoch``."""
        while self.scheduler.last_epoch < epoch:
            self.scheduler.step()

    @property
    def accumulate(self) -> int:
        """Micro-batches per SGD step (the run's gradient accumulation, ``TrainingMethod.set_grad_accumulation``)."""
        return int(self.optimizer.param_groups[0].get('accumulate', 1))

    @accumulate.setter
    def accumulate(self, steps: int) -> None:
        check_number(steps, 'gradient accumulation steps', 1, integer=True)
        self.optimizer.param_groups[0]['accumulate'] = int(steps)

    @property
    def pending(self) -> int:
        """Micro-batches whose gradients wait for the next SGD step. Kept in the optimizer's param group, as
        ``accumulate`` is, so a checkpoint of the optimizer holds them (the gradients are the module's, saved by
        the runner with the run's other pending gradients)."""
        return int(self.optimizer.param_groups[0].get('pending', 0))

    def reset(self) -> None:
        """Drop the gradients pending in an accumulation (a new training stage restarts the student's count)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.param_groups[0]['pending'] = 0

    def step(self, loss_fn: Callable):
        """One SGD step of the module on ``loss_fn()``, computed with the module's parameters trainable; with
        gradient accumulation (:attr:`accumulate` > 1) the loss's gradient, divided by ``accumulate``, is added to
        the pending ones and the step is taken at every ``accumulate``-th call, as the student's optimizer steps.
        ``loss_fn`` returns the loss, or a tuple whose first element is the loss; the same comes back detached."""
        accumulate, pending = self.accumulate, self.pending
        self.module.requires_grad_(True)
        try:
            if pending == 0:
                self.optimizer.zero_grad(set_to_none=True)
            out = loss_fn()
            loss = out[0] if isinstance(out, tuple) else out
            (loss / accumulate if accumulate > 1 else loss).backward()
            pending += 1
            # averaged over the processes at every micro-batch (the sum so far is the same on every process, so
            # averaging it again adds only this micro-batch's average): every process then holds the same pending
            # gradients, and the main process's checkpoint of them is the run's
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for p in self.module.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= dist.get_world_size()
            if pending >= accumulate:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)  # the gradients are not needed past the step: free them
                pending = 0
            self.optimizer.param_groups[0]['pending'] = pending
        finally:
            self.module.requires_grad_(False)
        return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
