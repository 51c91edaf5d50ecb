"""JointRD's settings: :class:`JointRDConfig` (every decision of the method is a field; each field is described in
docs/jointrd.md, section "JointRDConfig fields") and the joint teacher's optimizer settings."""
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Optional

from ..base import check_flag, check_number, config_from_dict
from ..fading import ShortcutFade
from ..side_optimizer import check_side_sgd

__all__ = ['JointRDConfig', 'TeacherOptimizerConfig', 'LOSS_NORMALIZERS', 'DEFAULT_LEAN_MEMORY']

# JointRDConfig.lean_memory's default (DECISION): on. It computes what the plain single backward computes, in another
# order, and lowers the step's peak memory (most at four stages, where the tails' backward ran while every
# activation of the twin was alive); step times match within noise (benchmarks/results/training_cost.md). The cost: the
# returned hybrid logits and features are detached, so a custom loss on them gets no gradient (turn it off for that)
DEFAULT_LEAN_MEMORY = True

# JointRDConfig.loss_normalization -> what the JointRD sums are divided by, from (n stages, eta). Sampled hybrid terms
# carry the scale (n-1)/m, so their weights always add up to eta * (n - 1).
# 'per_stage' divides nothing here: JointRD.forward scales each stage's gradient instead (loss.stage_weights).
LOSS_NORMALIZERS = {'stages': lambda n, eta: float(n), 'none': lambda n, eta: 1.0,
                    'weights': lambda n, eta: 1.0 + eta * (n - 1), 'per_stage': lambda n, eta: 1.0}

_CHOICES = dict(feature_loss=('margin', 'mse'), teacher_mode=('frozen', 'joint'),
                joint_step_order=('simultaneous', 'teacher_first'), hybrid_teacher_bn=('batch', 'running'),
                margin_refresh=('once', 'epoch'))


@dataclass
class JointRDConfig:
    """JointRD's settings; defaults are the reference CIFAR values (jointrd-method.md), and the recipes
    (:mod:`jointrd_timm.recipes`) set the recommended ones. Each field, and the DECISION behind each default, is
    described in docs/jointrd.md ("JointRDConfig fields"); the ``jointrd:`` section of a ``jointrd_model`` YAML
    holds these fields. The six ``shortcut_fade*`` fields are one :class:`~..fading.ShortcutFade` (:attr:`fade`).
    """
    eta_min: float = 0.5
    eta_horizon: float = 60.0
    eta_horizon_fraction: Optional[float] = None
    eta_per_step: bool = True
    feature_loss_weight: float = 0.0
    feature_loss: str = 'margin'
    teacher_mode: str = 'frozen'
    hybrid_paths: Optional[int] = None
    kd_weight: float = 0.0
    kd_temperature: float = 4.0
    block_loss_weight: float = 0.0
    adversarial_weight: float = 0.0
    discriminator: Optional[Dict] = None
    adversarial_non_saturating: bool = True
    shortcut_fade: Optional[float] = None
    shortcut_fade_window: float = ShortcutFade.window
    shortcut_fade_power: float = ShortcutFade.power
    shortcut_fade_mode: str = ShortcutFade.mode
    shortcut_fade_order: str = ShortcutFade.order
    shortcut_fade_leak: float = ShortcutFade.leak
    loss_normalization: str = 'stages'
    lean_memory: bool = None  # DEFAULT_LEAN_MEMORY, set in __post_init__
    joint_step_order: str = 'simultaneous'
    teacher_optimizer: Optional[Dict] = None
    hybrid_teacher_bn: str = 'batch'
    margin_refresh: str = 'once'
    fold_teacher_bn: bool = True

    def __post_init__(self):
        check_number(self.eta_min, 'eta_min', 0.0, 1.0,
                     meaning='the weight of the hybrid paths at the end of its decay')
        check_number(self.eta_horizon, 'eta_horizon', 0.0, above=True, meaning='epochs over which eta decays')
        if self.eta_horizon_fraction is not None:
            check_number(self.eta_horizon_fraction, 'eta_horizon_fraction', 0.0, 1.0, above=True,
                         meaning='the fraction of the run over which eta decays; None: eta_horizon epochs')
        for name in ('feature_loss_weight', 'kd_weight', 'adversarial_weight'):
            check_number(getattr(self, name), name, 0.0, meaning='0 turns the term off')
        check_number(self.kd_temperature, 'kd_temperature', 0.0, above=True, meaning="Hinton KD's temperature")
        for name in ('eta_per_step', 'adversarial_non_saturating', 'fold_teacher_bn'):
            check_flag(getattr(self, name), name)
        if self.lean_memory is not None:
            check_flag(self.lean_memory, 'lean_memory')
        for name in ('discriminator', 'teacher_optimizer'):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ValueError(f'{name} must be a mapping of settings (or absent), got {getattr(self, name)!r}.')
        for name in ('feature_loss', 'teacher_mode'):
            if getattr(self, name) not in _CHOICES[name]:
                raise ValueError(f'{name} must be ' + ' or '.join(map(repr, _CHOICES[name])) +
                                 f', got {getattr(self, name)!r}.')
        check_number(self.block_loss_weight, 'block_loss_weight', 0.0, meaning='0: no teacher-forced block targets')
        if self.hybrid_paths is not None:
            check_number(self.hybrid_paths, 'hybrid_paths', 1, integer=True,
                         meaning='the hybrid paths sampled per step; None: all of them')
        ShortcutFade.from_fields(self)  # checks the six fade fields
        if self.loss_normalization not in LOSS_NORMALIZERS:
            raise ValueError(f'loss_normalization must be one of {list(LOSS_NORMALIZERS)} (the reference: '
                             f"'stages'), got {self.loss_normalization!r}.")
        if self.lean_memory is None:
            self.lean_memory = DEFAULT_LEAN_MEMORY
        for name in ('joint_step_order', 'hybrid_teacher_bn', 'margin_refresh'):
            if getattr(self, name) not in _CHOICES[name]:
                raise ValueError(f'{name} must be one of {list(_CHOICES[name])}, got {getattr(self, name)!r}.')
        self._check_teacher_optimizer()

    def _check_teacher_optimizer(self) -> None:
        if self.joint_step_order == 'teacher_first':
            if self.teacher_mode != 'joint':
                raise ValueError("joint_step_order='teacher_first' updates the teacher: it needs teacher_mode='joint'.")
            if self.teacher_optimizer is None:
                raise ValueError("joint_step_order='teacher_first' needs teacher_optimizer, the teacher's own SGD "
                                 "(e.g. {'lr': 0.1, 'momentum': 0.9, 'weight_decay': 5e-4, 'cosine_epochs': <epochs>}, "
                                 "the twin's settings).")
            TeacherOptimizerConfig.from_dict(self.teacher_optimizer)
        elif self.teacher_optimizer is not None:
            raise ValueError("teacher_optimizer is used only with joint_step_order='teacher_first' (in 'simultaneous' "
                             "the teacher is updated by the main optimizer); remove it or set the step order.")

    @property
    def fade(self) -> Optional[ShortcutFade]:
        """The shortcut fade these fields describe (None without ``shortcut_fade``)."""
        return ShortcutFade.from_fields(self)

    @classmethod
    def from_dict(cls, values: Dict) -> 'JointRDConfig':
        return config_from_dict(cls, values, 'JointRD')


@dataclass
class TeacherOptimizerConfig:
    """The joint teacher's own SGD and schedule (``JointRDConfig.joint_step_order='teacher_first'``): ``lr`` is
    required; ``cosine_epochs`` (CosineAnnealingLR over that many epochs) or ``milestones`` with ``gamma``."""
    lr: float
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    cosine_epochs: Optional[int] = None
    milestones: list = field(default_factory=list)
    gamma: float = 0.1

    def __post_init__(self):
        check_side_sgd('teacher_optimizer', **asdict(self))

    @classmethod
    def from_dict(cls, values: Dict) -> 'TeacherOptimizerConfig':
        if 'lr' not in values and not set(values) - {f.name for f in fields(cls)}:
            raise ValueError("teacher_optimizer needs 'lr' (the teacher's learning rate, e.g. the twin's).")
        return config_from_dict(cls, values, 'teacher_optimizer')
