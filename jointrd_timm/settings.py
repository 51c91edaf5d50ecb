"""Training settings: the :class:`Schedule` of each setting (SGD with Nesterov momentum, its decay, epochs, batch, and
the reference JointRD settings of that setting: the JointRD reference's CIFAR and ImageNet runs, the CPU budgets of
the benchmarks, the demo), and the method zoo's settings. Recipes (:mod:`jointrd_timm.recipes`) say how a twin
trains; these say at what hyperparameters. Everything here is also importable from ``jointrd_timm.recipes``.
"""
import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, Mapping, Optional, Sequence

from .methods.base import check_number
from .methods.lr_schedules import check_hold

__all__ = ['Schedule', 'SCHEDULES', 'REFERENCE_JOINTRD', 'SGD_MOMENTUM', 'teacher_sgd', 'ZOO_SETTINGS',
           'DISCRIMINATOR_SGD', 'check_ema_decay']

# The JointRD reference's CIFAR settings (jointrd-method.md): eta from 1 to 0.5 over the first 60 of 200 epochs,
# no feature loss. Every CIFAR-style schedule uses them unless a recipe changes a field.
REFERENCE_JOINTRD = MappingProxyType(dict(eta_min=0.5, eta_horizon_fraction=0.3, feature_loss_weight=0.0))
SGD_MOMENTUM = 0.9  # every schedule's, with Nesterov
DECAYS = ('cosine', 'multistep', 'step', 'hold-cosine')
_IMAGENET_JOINTRD = MappingProxyType(dict(eta_min=5e-3, eta_horizon_fraction=0.5, feature_loss_weight=1e-4))

# the distillation methods' settings in the method zoo (the benchmarks' cifar10_zoo rows and the zoo YAMLs): the
# module kwargs besides teacher and student; a discriminator gets its own SGD (DISCRIMINATOR_SGD) decaying as the run
ZOO_SETTINGS = MappingProxyType(dict(
    cakd=MappingProxyType(dict(discriminator_depth=3, dropout=0.3, non_saturating=False)),
    aps=MappingProxyType(dict(adversarial_weight=0.1, kd_weight=1.0, kd_temperature=4.0, hidden=256,
                              label_head=False))))
DISCRIMINATOR_SGD = MappingProxyType(dict(lr=1e-3, momentum=0.9, weight_decay=0.0))


def check_ema_decay(decay, what: str = 'ema_decay') -> float:
    """``decay`` as a float, or a ValueError saying what a weight average's decay must be (0: no average)."""
    if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0 <= decay < 1):
        raise ValueError(f'{what} must be a number in [0, 1) (the decay of the weight average per optimizer step, '
                         f'e.g. 0.999; 0: no average), got {decay!r}.')
    return float(decay)


@dataclass(frozen=True)
class Schedule:
    """Training hyperparameters of a setting: SGD with Nesterov momentum (``SGD_MOMENTUM``).

    Args:
        epochs, batch_size, lr, weight_decay: as usual (batch_size is the global batch).
        decay: 'cosine' (over the run, stepped per epoch), 'multistep' (x ``gamma`` at ``milestones``), 'step'
            (every ``step_size``) or 'hold-cosine' (the peak for ``hold`` of the run's optimizer steps, then a per-step
            cosine to 0: ``methods.lr_schedules.HoldCosineLR``; what ``Recipe.lr_hold`` gives a twin).
        hold: the fraction of the run at the peak of a 'hold-cosine' decay, in [0, 1).
        ema_decay: a weight average of the deployed model over the run (``runner.ema_decay``,
            :mod:`jointrd_timm.training.ema`): its decay per optimizer step; 0 (default): none.
        jointrd: the reference JointRD settings of this setting (eta and the feature-loss weight).

    The schedule is written into a run's config in one place each: :meth:`optimizer` and :meth:`scheduler` (the
    torchdistill sections of the trained model), :meth:`side_optimizer` (a method's own SGD, e.g. a joint teacher's
    or a discriminator's, in the form of ``TeacherOptimizerConfig`` / ``DiscriminatorConfig``).
    """
    name: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    decay: str = 'cosine'
    milestones: Sequence[int] = ()
    step_size: Optional[int] = None
    gamma: float = 0.1
    hold: float = 0.0
    ema_decay: float = 0.0
    jointrd: Mapping = field(default_factory=lambda: REFERENCE_JOINTRD)

    def __post_init__(self):
        for name in ('epochs', 'batch_size'):
            check_number(getattr(self, name), f'Schedule.{name}', 1, integer=True)
        check_number(self.lr, 'Schedule.lr', 0.0, above=True)
        check_number(self.weight_decay, 'Schedule.weight_decay', 0.0)
        if self.decay not in DECAYS:
            raise ValueError(f"Schedule.decay must be one of {', '.join(map(repr, DECAYS))}, got {self.decay!r}.")
        check_hold(self.hold, 'Schedule.hold')
        object.__setattr__(self, 'ema_decay', check_ema_decay(self.ema_decay, 'Schedule.ema_decay'))
        if self.hold and self.decay != 'hold-cosine':
            raise ValueError(f"Schedule.hold is read by decay 'hold-cosine' only; got hold={self.hold!r} with decay "
                             f"{self.decay!r}.")

    def replace(self, **fields) -> 'Schedule':
        return dataclasses.replace(self, **fields)

    def for_run(self, epochs: Optional[int] = None, lr: Optional[float] = None) -> 'Schedule':
        """This schedule for a run of ``epochs`` at ``lr`` (None: its own). Its step decay belongs to its own length:
        a run of another length decays by cosine over its epochs ('hold-cosine', a fraction of the run, is kept)."""
        schedule = self if lr is None else self.replace(lr=lr)
        if epochs is None or epochs == self.epochs:
            return schedule
        if self.decay == 'hold-cosine':
            return schedule.replace(epochs=epochs)
        return schedule.replace(epochs=epochs, decay='cosine', milestones=(), step_size=None)

    def decay_epochs(self) -> list:
        """The epochs at which a 'multistep' or 'step' decay multiplies the learning rate by ``gamma``."""
        if self.decay == 'step':
            return list(range(self.step_size, self.epochs, self.step_size))
        return list(self.milestones) if self.decay == 'multistep' else []

    def optimizer(self) -> Dict:
        """The torchdistill optimizer section of the trained model."""
        return dict(key='SGD', kwargs=dict(lr=self.lr, momentum=SGD_MOMENTUM, nesterov=True,
                                           weight_decay=self.weight_decay))

    def scheduler(self, epochs: Optional[int] = None) -> Dict:
        """The torchdistill scheduler section (of :meth:`for_run` ``(epochs)`` when ``epochs`` is given)."""
        if epochs is not None:
            return self.for_run(epochs).scheduler()
        if self.decay == 'cosine':
            return dict(key='CosineAnnealingLR', kwargs=dict(T_max=self.epochs))
        if self.decay == 'hold-cosine':  # per optimizer step; its run length comes from jointrd_pre_epoch_process
            return dict(key='HoldCosineLR', kwargs=dict(hold=self.hold, epochs=self.epochs), scheduling_step=1)
        if self.decay == 'step':
            return dict(key='StepLR', kwargs=dict(step_size=self.step_size, gamma=self.gamma))
        return dict(key='MultiStepLR', kwargs=dict(milestones=list(self.milestones), gamma=self.gamma))

    def side_optimizer(self, **sgd) -> Dict:
        """A method's own SGD (``sgd``: lr, momentum, ... as stated) decaying as this schedule does: cosine over its
        epochs (for 'hold-cosine' too: the side optimizer steps per epoch), or x ``gamma`` at :meth:`decay_epochs`."""
        if self.decay in ('cosine', 'hold-cosine'):
            return dict(sgd, cosine_epochs=self.epochs)
        return dict(sgd, milestones=self.decay_epochs(), gamma=self.gamma)


SCHEDULES = {s.name: s for s in (
    # the reference runs (jointrd-method.md)
    Schedule('cifar', epochs=200, batch_size=128, lr=0.1, weight_decay=5e-4, decay='multistep',
             milestones=(100, 150)),
    Schedule('imagenet', epochs=120, batch_size=512, lr=0.2, weight_decay=1e-4, decay='step', step_size=30,
             milestones=(30, 60, 90), jointrd=_IMAGENET_JOINTRD),
    # the CPU budget of benchmarks/accuracy.py subset (8,000 CIFAR-10 images, 5 epochs per run)
    Schedule('cpu-budget', epochs=5, batch_size=128, lr=0.1, weight_decay=5e-4),
    # `jointrd demo` on the 8x8 digits
    Schedule('demo', epochs=12, batch_size=64, lr=0.05, weight_decay=5e-4),
)}


def teacher_sgd(schedule: Schedule) -> Dict:
    """A 'teacher_first' joint teacher's own SGD (``JointRDConfig.teacher_optimizer``) when it trains as the twin
    does: the schedule's learning rate, momentum, weight decay and decay (:meth:`Schedule.side_optimizer`; a
    'hold-cosine' twin's teacher decays by an epoch-wise cosine over the run, without the hold)."""
    return schedule.side_optimizer(lr=schedule.lr, momentum=SGD_MOMENTUM, nesterov=True,
                                   weight_decay=schedule.weight_decay)
