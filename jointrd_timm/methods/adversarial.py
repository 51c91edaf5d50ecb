"""The adversarial distillation methods of the seed papers, in plain PyTorch.

1. Conditional adversarial KD: Xu, Hsu, Huang, "Training Shallow and Thin Networks for Acceleration via Knowledge
   Distillation with Conditional Adversarial Networks", arXiv 1709.00513 (ICLR 2018 workshop). A discriminator on
   logits learns the loss between teacher and student. D: BatchNorm -> 3 residual MLP blocks (BN, ReLU,
   Linear(C, C), Dropout 0.3, identity skip) -> C + 2 outputs (C class logits as in AC-GAN, 2-way real/fake).
       D maximises   1/2 (L_A + L_DS)
           L_A  = mean[ log P(real | D(t)) + log P(fake | D(s)) ]
           L_DS = mean[ log P(y | D(t)) + log P(y | D(s)) ]
       student minimises  L_S + L_L1 + L_GAN,  L_S = CE(s, y),  L_L1 = mean_i |s_i - t_i|_1,
           L_GAN = 1/2 (L_A - L_DS) with D fixed (saturating, the paper's literal form; DECISION default), or the
           non-saturating form where log P(fake | D(s)) becomes -log P(real | D(s)).
2. Adversarial learning of portable student networks: Wang, Xu, Xu, Tao, AAAI 2018. Only the abstract was
   available; every choice below is OUR DECISION and a named field: D sees the pooled penultimate features of
   teacher (real) and student (fake, through a linear adapter when widths differ); D is an MLP with a real/fake
   logit and optionally an auxiliary label head; the student minimises CE + kd_weight * Hinton KD(T) +
   adversarial_weight * (non-saturating BCE of D calling its features real); D minimises BCE (+ aux CE).
   Defaults: kd_weight 1, T 4, adversarial_weight 0.1, hidden 256, no label head.

Both alternate every iteration, D first, then the student. The discriminator's update happens inside the
module's train-mode ``forward`` (with D's own optimizer, never the student's; DECISION, the reason is in
:mod:`jointrd_timm.methods.base`), so any torchdistill box and the runner train these modules unchanged; the
student's loss is then computed against the updated D and returned.
D is trained by a :class:`~jointrd_timm.methods.side_optimizer.SideOptimizer`: its parameters have
``requires_grad=False`` outside its own step (the student's optimizer never holds them), its gradients are averaged
across processes explicitly, and its optimizer and scheduler are exposed through ``extra_optimizers()`` /
``extra_schedulers()`` so checkpoints save and restore them.
"""
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..io import classifier_module
from .base import (TrainingMethod, check_flag, check_number, check_teacher_student, class_count, config_from_dict,
                   hinton_kd)
from .side_optimizer import SideOptimizer, check_side_sgd

__all__ = ['LogitDiscriminator', 'FeatureDiscriminator', 'DiscriminatorConfig', 'AdversarialTerm',
           'conditional_discriminator_loss', 'conditional_gan_term', 'conditional_student_loss', 'ConditionalAdversarialKD',
           'AdversarialPortableStudent', 'REAL', 'FAKE']

REAL, FAKE = 0, 1  # indices of the 2-way real/fake output
_POOLED_INTERFACE = ('forward_features', 'forward_head', 'get_classifier')


def _pre_logits_width(model: nn.Module) -> int:
    """The width of the features a model's classifier gets: timm's ``head_hidden_size`` (past a head's own layers:
    MobileNetV3's 1280, not 960) or ``num_features``; else its classifier's input width (a ``nn.Linear``)."""
    width = getattr(model, 'head_hidden_size', None) or getattr(model, 'num_features', None)
    if width:
        return width
    head = classifier_module(model)
    if not isinstance(head, nn.Linear):
        raise ValueError(f'AdversarialPortableStudent: {type(model).__name__} has neither timm\'s model interface '
                         '(forward_features, forward_head, get_classifier) nor an nn.Linear classifier, so the '
                         'features its classifier gets cannot be read. Give it timm\'s interface.')
    return head.in_features


class _BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that takes a batch of one sample in train mode (a loader's last, partial batch): normalised with
    its running statistics, which it leaves as they are (batch statistics of one sample are undefined)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class _ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(_BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class LogitDiscriminator(nn.Module):
    """Xu et al.'s D on C logits: BN -> ``depth`` residual MLP blocks -> C class logits + 2 real/fake logits."""

    def __init__(self, num_classes: int, depth: int = 3, dropout: float = 0.3):
        super().__init__()
        self.num_classes = num_classes
        self.input_norm = _BatchNorm1d(num_classes)
        self.blocks = nn.Sequential(*[_ResidualMLPBlock(num_classes, dropout) for _ in range(depth)])
        self.head = nn.Linear(num_classes, num_classes + 2)

    def forward(self, logits: torch.Tensor):
        """Returns (class logits (N, C), real/fake logits (N, 2))."""
        out = self.head(self.blocks(self.input_norm(logits)))
        return out[:, :self.num_classes], out[:, self.num_classes:]


def conditional_discriminator_loss(d_teacher, d_student, targets) -> torch.Tensor:
    """-1/2 (L_A + L_DS): what D minimises. ``d_*`` are LogitDiscriminator outputs."""
    (cls_t, adv_t), (cls_s, adv_s) = d_teacher, d_student
    real = torch.full_like(targets, REAL)
    l_a = -F.cross_entropy(adv_t, real) - F.cross_entropy(adv_s, torch.full_like(targets, FAKE))
    l_ds = -F.cross_entropy(cls_t, targets) - F.cross_entropy(cls_s, targets)
    return -0.5 * (l_a + l_ds)


def conditional_gan_term(d_teacher, d_student, targets, non_saturating: bool = False) -> torch.Tensor:
    """L_GAN = 1/2 (L_A - L_DS) with D fixed (or its non-saturating form): the student's adversarial term."""
    (cls_t, adv_t), (cls_s, adv_s) = d_teacher, d_student
    log_p_real_t = -F.cross_entropy(adv_t, torch.full_like(targets, REAL))
    if non_saturating:
        fake_term = F.cross_entropy(adv_s, torch.full_like(targets, REAL))  # -log P(real | D(s))
    else:
        fake_term = -F.cross_entropy(adv_s, torch.full_like(targets, FAKE))  # log P(fake | D(s))
    l_a = log_p_real_t + fake_term
    l_ds = -F.cross_entropy(cls_t, targets) - F.cross_entropy(cls_s, targets)
    return 0.5 * (l_a - l_ds)


def conditional_student_loss(student_logits, teacher_logits, d_teacher, d_student, targets,
                             non_saturating: bool = False) -> Dict[str, torch.Tensor]:
    """L_S + L_L1 + L_GAN (weights 1, no temperature) with D fixed. Returns the total and its parts."""
    l_s = F.cross_entropy(student_logits, targets)
    l_l1 = (student_logits - teacher_logits).abs().sum(1).mean()
    l_gan = conditional_gan_term(d_teacher, d_student, targets, non_saturating)
    return dict(loss=l_s + l_l1 + l_gan, ce=l_s.detach(), l1=l_l1.detach(), gan=l_gan.detach())


class FeatureDiscriminator(nn.Module):
    """DECISION (Wang et al. 2018): MLP on pooled features -> real/fake logit (+ optional label logits)."""

    def __init__(self, in_features: int, hidden: int = 256, num_classes: int = 0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), _BatchNorm1d(hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(hidden, hidden), _BatchNorm1d(hidden), nn.LeakyReLU(0.2))
        self.real_fake = nn.Linear(hidden, 1)
        self.label_head = nn.Linear(hidden, num_classes) if num_classes > 0 else None

    def forward(self, features: torch.Tensor):
        h = self.body(features)
        return self.real_fake(h).squeeze(1), (self.label_head(h) if self.label_head is not None else None)


@dataclass
class DiscriminatorConfig:
    """The discriminator's optimiser (SGD) and schedule. Xu et al.: lr 1e-3 on the student's schedule;
    momentum/wd unstated (DECISION 0.9 / 0). ``milestones`` (epochs) with ``gamma``, or ``cosine_epochs``; with
    neither (the default) the lr stays constant: the discriminator knows nothing of the student's schedule, so a run
    that follows the paper names the student's milestones here too (the committed ``xu2017-*`` YAMLs do)."""
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    cosine_epochs: Optional[int] = None

    def __post_init__(self):
        check_side_sgd('discriminator', **asdict(self))

    @classmethod
    def from_dict(cls, values: Optional[Dict]) -> 'DiscriminatorConfig':
        return config_from_dict(cls, dict(values or {}), 'discriminator')


class AdversarialTerm(nn.Module):
    """A discriminator with its own optimiser and schedule (:class:`~.side_optimizer.SideOptimizer`); ``step``
    trains it on one batch (D first)."""

    def __init__(self, discriminator: nn.Module, config: DiscriminatorConfig):
        super().__init__()
        self.discriminator = discriminator
        self.config = config
        # D's parameters are frozen outside its own step: the student's optimizer never sees them
        self.updates = SideOptimizer(discriminator, **asdict(config))

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.updates.optimizer

    @property
    def scheduler(self):
        return self.updates.scheduler

    def set_epoch(self, epoch: int) -> None:
        self.updates.set_epoch(epoch)

    def step(self, loss_fn) -> torch.Tensor:
        """One optimiser step of D on ``loss_fn()`` (computed with D's parameters trainable); the loss, detached."""
        return self.updates.step(loss_fn)


class _TeacherStudent(TrainingMethod):
    """A frozen teacher (eval mode, no gradients) beside a student; eval mode is just the student. Progress (the
    discriminator's schedule, in epochs) follows :class:`~jointrd_timm.methods.base.TrainingMethod`."""

    def __init__(self, student: nn.Module, teacher: nn.Module, num_epochs: int = 0, steps_per_epoch: int = 0):
        check_teacher_student(teacher, student, type(self).__name__)
        super().__init__(num_epochs, steps_per_epoch)  # the discriminator's schedule follows at the first step
        self.student = student
        self.teacher = teacher.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def apply_progress(self) -> None:
        if hasattr(self, 'adversarial'):
            self.adversarial.set_epoch(int(self.epoch))

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Eval mode: the student's logits. Train mode: one step of the method (:meth:`step`), counted."""
        if not self.training:
            return self.student(x)
        d = self.adversarial.config
        if (d.milestones or d.cosine_epochs) and int(self.steps_per_epoch) <= 0:
            self.require_run_length('the discriminator schedule (in epochs)')
        self.apply_progress()
        out = self.step(x, targets)
        self.count_step()
        return out

    def extra_optimizers(self) -> Dict:
        return {'discriminator': self.adversarial.optimizer}

    def side_optimizers(self) -> list:
        return [self.adversarial.updates]

    def frozen_modules(self) -> list:
        return [self.teacher, *super().frozen_modules()]

    def extra_schedulers(self) -> Dict:
        return {'discriminator': self.adversarial.scheduler}


class ConditionalAdversarialKD(_TeacherStudent):
    """Xu et al. 2017 (see the module docstring). ``forward(x, y)`` in train mode: D step, then the student loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module, num_classes: int, discriminator_depth: int = 3,
                 dropout: float = 0.3, non_saturating: bool = False, discriminator: Optional[Dict] = None,
                 num_epochs: int = 0, steps_per_epoch: int = 0):
        check_number(discriminator_depth, 'ConditionalAdversarialKD: discriminator_depth', 1, integer=True)
        check_number(dropout, 'ConditionalAdversarialKD: dropout', 0.0, 1.0, below=True)
        check_flag(non_saturating, 'ConditionalAdversarialKD: non_saturating')
        super().__init__(student, teacher, num_epochs, steps_per_epoch)
        self.non_saturating = non_saturating
        self.adversarial = AdversarialTerm(LogitDiscriminator(num_classes, discriminator_depth, dropout),
                                           DiscriminatorConfig.from_dict(discriminator))

    def step(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        logits = self.student(x)
        out = dict(logits=logits, teacher_logits=teacher_logits)
        if targets is None:
            return out
        d = self.adversarial.discriminator
        out['discriminator_loss'] = self.adversarial.step(
            lambda: conditional_discriminator_loss(d(teacher_logits), d(logits.detach()), targets))
        out.update(conditional_student_loss(logits, teacher_logits, d(teacher_logits), d(logits), targets,
                                            self.non_saturating))
        return out


class AdversarialPortableStudent(_TeacherStudent):
    """Wang et al. 2018 as we read it (every choice a field, see the module docstring)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, adversarial_weight: float = 0.1,
                 kd_weight: float = 1.0, kd_temperature: float = 4.0, hidden: int = 256, label_head: bool = False,
                 discriminator: Optional[Dict] = None, num_epochs: int = 0, steps_per_epoch: int = 0):
        for name, value in (('adversarial_weight', adversarial_weight), ('kd_weight', kd_weight)):
            check_number(value, f'AdversarialPortableStudent: {name}', 0.0, meaning='0 turns the term off')
        check_number(kd_temperature, 'AdversarialPortableStudent: kd_temperature', 0.0, above=True)
        check_number(hidden, 'AdversarialPortableStudent: hidden', 1, integer=True)
        check_flag(label_head, 'AdversarialPortableStudent: label_head')
        super().__init__(student, teacher, num_epochs, steps_per_epoch)
        s_dim, t_dim = (_pre_logits_width(m) for m in (student, teacher))
        self.adapter = nn.Linear(s_dim, t_dim) if s_dim != t_dim else nn.Identity()
        self.adversarial_weight, self.kd_weight, self.kd_temperature = adversarial_weight, kd_weight, kd_temperature
        num_classes = (class_count(teacher) or 0) if label_head else 0
        self.adversarial = AdversarialTerm(FeatureDiscriminator(t_dim, hidden, num_classes),
                                           DiscriminatorConfig.from_dict(discriminator))

    @staticmethod
    def _pooled(model: nn.Module, x: torch.Tensor):
        """(pooled penultimate features, logits): timm's ``forward_head(..., pre_logits=True)``; for a model without
        timm's interface (torchvision's), what its forward hands its classifier, flattened."""
        if all(hasattr(model, name) for name in _POOLED_INTERFACE):
            features = model.forward_head(model.forward_features(x), pre_logits=True)
            return features, model.get_classifier()(features)
        captured = []
        hook = classifier_module(model).register_forward_hook(lambda module, args, out: captured.append((args[0], out)))
        try:
            logits = model(x)
        finally:
            hook.remove()
        if not captured or captured[-1][1] is not logits:
            raise ValueError(f'AdversarialPortableStudent: {type(model).__name__} does not return what its last '
                             'nn.Linear computes, so that Linear is not its classifier and the features the classifier '
                             'gets cannot be read; give the model timm\'s interface (forward_features, forward_head, '
                             'get_classifier).')
        return captured[-1][0].flatten(1), logits

    def step(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        with torch.no_grad():
            teacher_features, teacher_logits = self._pooled(self.teacher, x)
        student_features, logits = self._pooled(self.student, x)
        fake = self.adapter(student_features)
        out = dict(logits=logits, teacher_logits=teacher_logits)
        if targets is None:
            return out
        d = self.adversarial.discriminator

        def discriminator_loss():
            (real_logit, real_cls), (fake_logit, fake_cls) = d(teacher_features), d(fake.detach())
            loss = F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit)) + \
                F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
            if real_cls is not None:
                loss = loss + F.cross_entropy(real_cls, targets) + F.cross_entropy(fake_cls, targets)
            return loss
        out['discriminator_loss'] = self.adversarial.step(discriminator_loss)
        fake_logit, fake_cls = d(fake)
        adversarial = F.binary_cross_entropy_with_logits(fake_logit, torch.ones_like(fake_logit))
        if fake_cls is not None:
            adversarial = adversarial + F.cross_entropy(fake_cls, targets)
        ce = F.cross_entropy(logits, targets)
        kd = hinton_kd(logits, teacher_logits, self.kd_temperature)
        loss = ce + self.kd_weight * kd + self.adversarial_weight * adversarial
        out.update(loss=loss, ce=ce.detach(), kd=kd.detach(), adversarial=adversarial.detach())
        return out
