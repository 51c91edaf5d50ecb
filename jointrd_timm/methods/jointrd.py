"""JointRD: Residual Distillation (Li, Zhang, Wang, Huang, Xu, Zhang; "Residual Distillation: Towards Portable
Deep Neural Networks without Shortcuts", NeurIPS 2020), in plain PyTorch.

A residual teacher T and its shortcut-free twin S are cut into the same n stages. Per batch (x, y):

    with no grad:  z_T, f_T = T(x)                             (frozen teacher, eval mode)
    h_1..h_n, z_S, f_S = S(x)
    for k in 1..n-1:  z_k, f_k = head_T(T_{k+1..n}(h_k))     (gradients reach h_k through T's shortcuts)
    L_cls  = 1/n [ CE(z_S, y) + eta(e) * sum_k CE(z_k, y) ]
    L_feat = 1/n [ D(C_S(f_S), f_T) + eta(e) * sum_k D(C_k(f_k), f_T) ]
    L      = L_cls + lambda * L_feat  (+ kd_weight * Hinton KD(z_S, z_T), an optional extra)

The 1/n is the reference's; ``loss_normalization`` can replace it (DECISION below, in :class:`JointRDConfig`).

eta fades from 1 to eta_min (``schedules.eta_schedule``); C_* are 1x1 conv + BN connectors; D is the margin loss
of Heo et al. on pre-activation features, or MSE where the family exposes none (``feature_losses``).
Only S and the connectors are updated in ``frozen`` mode (the default). In ``joint`` mode the teacher also learns
from its own CE in the same step (DECISION: one simultaneous update; the hybrid paths see the teacher's weights
detached and run on copies of its BN buffers, so the student's loss never moves the teacher's weights or running
statistics), the reference's JOINT branch up to step order.

Every decision of ``../shared/docs/jointrd-method.md`` is a field of :class:`JointRDConfig`.
"""
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .adversarial import (AdversarialTerm, DiscriminatorConfig, LogitDiscriminator, conditional_discriminator_loss,
                          conditional_gan_term)
from .base import TrainingMethod
from .fading import ShortcutFade
from .feature_losses import MSEFeatureLoss, MarginFeatureLoss, bn_margin, make_connector
from .schedules import check_fade_power, eta_schedule
from .stages import StageLayoutError, StageSplit, final_preactivation
from ..twins.fade import is_fading

__all__ = ['JointRD', 'JointRDConfig', 'jointrd_loss', 'scale_grad', 'stage_weights']

# JointRDConfig.loss_normalization -> what the JointRD sums are divided by, from (n stages, eta). Sampled hybrid terms
# carry the scale (n-1)/m, so their weights always add up to eta * (n - 1).
# 'per_stage' divides nothing here: JointRD.forward scales each stage's gradient instead (stage_weights).
LOSS_NORMALIZERS = {'stages': lambda n, eta: float(n), 'none': lambda n, eta: 1.0,
                    'weights': lambda n, eta: 1.0 + eta * (n - 1), 'per_stage': lambda n, eta: 1.0}


def stage_weights(n: int, eta: float) -> List[float]:
    """W_1..W_n: the summed weight of the loss terms whose gradient reaches student stage j: the twin's own CE
    (weight 1, through every stage) and the hybrid terms of paths k >= j (eta each; in expectation when paths are
    sampled). Stage n and the head get the twin's CE only (W_n = 1); stage 1 (and the stem) everything."""
    return [1.0 + eta * (n - j) for j in range(1, n + 1)]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` unchanged, with its gradient multiplied by ``factor`` (no node when factor is 1)."""
    return x if factor == 1.0 else _ScaleGrad.apply(x, factor)


@dataclass
class JointRDConfig:
    """JointRD's settings; defaults are the reference CIFAR values (jointrd-method.md).

    Args:
        eta_min: floor of the hybrid-term weight (CIFAR 0.5, ImageNet 5e-3).
        eta_horizon: E, in epochs, over which eta fades from 1 to eta_min (reference 60).
        eta_horizon_fraction: if set, E = fraction * total epochs instead (overrides eta_horizon).
        eta_per_step: anneal eta every step (fractional epochs) rather than once per epoch.
        feature_loss_weight: lambda (CIFAR reference 0, ImageNet 1e-4, 1e-3 suggested for 32x32).
        feature_loss: 'margin' (Heo et al.; MSE where the family has no pre-activation feature) or 'mse'.
        teacher_mode: 'frozen' (pretrained teacher, eval mode, never updated) or 'joint'.
        hybrid_paths: number of hybrid paths sampled per step (None: all n-1). Sampled terms are scaled by
            (n-1)/hybrid_paths so the loss stays an unbiased estimate of the full one.
        kd_weight, kd_temperature: optional Hinton KD on the student's logits (0: off, as in the paper).
        adversarial_weight, discriminator, adversarial_non_saturating: our "beyond": add Xu et al.'s conditional
            adversarial term on the twin's logits (a LogitDiscriminator trained alternately, D first; 0: off).
        shortcut_fade: fraction of the run over which a *fading* twin's shortcut scale s goes from 1 to 0 (cosine,
            per step; None: off). The student must be built with ``shortcut_fade=True``
            (:mod:`jointrd_timm.twins.fade`, Monti et al. 2018); it is deployed with the shortcuts removed.
        shortcut_fade_window: 1 (default): every block's shortcut fades together; < 1: a staggered fade, each block
            over this share of the fade, first block first (``methods.schedules.block_scales``).
        shortcut_fade_power: the cosine fade raised to this power (``methods.schedules.fade_scale``; 1: the cosine; 0.5
            keeps a twin twice as deep as resnet56, e.g. resnet110, on resnet56's shortcut-path weights; measured
            in benchmarks/results/recipe_ablation_resnet110.md).
        loss_normalization: what L_cls and L_feat are divided by. 'stages' (the reference): n, so the twin's own
            CE always has weight 1/n (1/4 at ResNet-18) and, once eta is small, it trains as if alone at about a
            1/n learning rate with n times the relative weight decay. 'none': nothing; the twin's own terms keep
            weight 1 (the objective of the twin trained alone) and the hybrid terms are added on top, eta each.
            'weights' (DECISION): the sum of the weights, 1 + eta * (n - 1), so the loss is a weighted mean of
            the n terms, reference at eta = 1 and the twin alone's objective at eta = 0. 'per_stage' (DECISION): the sums are
            not divided; instead the gradient reaching student stage j is divided by W_j = 1 + eta (n - j), the
            weight of the terms that reach it (``stage_weights``), so every stage (stem with stage 1, head with
            stage n) gets a weighted mean of its terms: the last stage trains at the twin alone's rate, the first
            at the 'weights' rate, and at eta = 0 it is the twin alone. Extras on z_S (KD, adversarial) are scaled
            with the twin's CE. Each is measured against 'stages' in benchmarks/results/recipe_ablation*.md.
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
    adversarial_weight: float = 0.0
    discriminator: Optional[Dict] = None
    adversarial_non_saturating: bool = True
    shortcut_fade: Optional[float] = None
    shortcut_fade_window: float = 1.0
    shortcut_fade_power: float = 1.0
    loss_normalization: str = 'stages'

    def __post_init__(self):
        if not 0.0 <= self.eta_min <= 1.0:
            raise ValueError(f'eta_min must be in [0, 1], got {self.eta_min}.')
        if self.feature_loss not in ('margin', 'mse'):
            raise ValueError(f"feature_loss must be 'margin' or 'mse', got {self.feature_loss!r}.")
        if self.teacher_mode not in ('frozen', 'joint'):
            raise ValueError(f"teacher_mode must be 'frozen' or 'joint', got {self.teacher_mode!r}.")
        if self.hybrid_paths is not None and self.hybrid_paths < 1:
            raise ValueError(f'hybrid_paths must be >= 1 or None (all paths), got {self.hybrid_paths}.')
        if self.eta_horizon_fraction is not None and not 0 < self.eta_horizon_fraction <= 1:
            raise ValueError(f'eta_horizon_fraction must be in (0, 1], got {self.eta_horizon_fraction}.')
        if self.shortcut_fade is not None and not 0 < self.shortcut_fade <= 1:
            raise ValueError(f'shortcut_fade must be in (0, 1] (fraction of the run) or None, got {self.shortcut_fade}.')
        if not 0 < self.shortcut_fade_window <= 1:
            raise ValueError('shortcut_fade_window must be in (0, 1] (1: all blocks fade together), got '
                             f'{self.shortcut_fade_window}.')
        check_fade_power(self.shortcut_fade_power)
        if self.loss_normalization not in LOSS_NORMALIZERS:
            raise ValueError(f'loss_normalization must be one of {list(LOSS_NORMALIZERS)} (the reference: '
                             f"'stages'), got {self.loss_normalization!r}.")

    @classmethod
    def from_dict(cls, values: Dict) -> 'JointRDConfig':
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f'Unknown JointRD setting(s) {unknown}; valid keys: {sorted(known)}.')
        return cls(**values)


class _InputCapture:
    """Forward pre-hook keeping a copy of a module's input (the pre-activation before an in-place ReLU)."""

    def __init__(self, module: nn.Module):
        self.values: List[torch.Tensor] = []
        self.enabled = False
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.enabled:
            self.values.append(args[0].clone())

    def pop(self) -> torch.Tensor:
        return self.values.pop()


class JointRD(TrainingMethod):
    """Teacher + twin trained together; in eval mode it is just the twin (``forward`` returns its logits).

    In train mode ``forward(x)`` returns a dict with everything :func:`jointrd_loss` needs:
    ``logits`` z_S, ``teacher_logits`` z_T, ``hybrid_logits`` [z_k], ``paths`` [k], ``path_scale``,
    ``student_feature``/``teacher_feature``/``hybrid_features`` (after connectors for the student side), ``eta``.

    Progress (eta, the fade) follows :class:`~jointrd_timm.methods.base.TrainingMethod`: give the run length
    (``num_epochs``, ``steps_per_epoch``) here and every train-mode forward counts as a step, or call
    ``set_epoch(epoch, steps_per_epoch, num_epochs)`` at each epoch; a schedule that cannot advance raises at the
    first train-mode forward instead of staying at its start value.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, config: Optional[JointRDConfig] = None,
                 probe: Optional[torch.Tensor] = None, num_epochs: int = 0, steps_per_epoch: int = 0):
        super().__init__()
        self.config = config or JointRDConfig()
        self.student = student
        self.teacher = teacher
        if probe is None:
            probe = _probe_for(student)
        self.student_stages = StageSplit(student, probe)
        self.teacher_stages = StageSplit(teacher, probe)
        self._check_layouts()
        fading = is_fading(student)
        if fading != (self.config.shortcut_fade is not None):
            raise ValueError(
                'The student has fading shortcuts but JointRDConfig.shortcut_fade is not set (give the fraction of the '
                'run over which they fade, e.g. 0.5)' if fading else
                f'JointRDConfig.shortcut_fade={self.config.shortcut_fade} needs a fading student: build it with '
                "timm.create_model('plain_<arch>', shortcut_fade=True).")
        c = self.config
        self.fade = None if c.shortcut_fade is None else \
            ShortcutFade(c.shortcut_fade, c.shortcut_fade_window, c.shortcut_fade_power)
        self.num_stages = self.student_stages.num_stages
        if self.config.teacher_mode == 'frozen':
            teacher.requires_grad_(False)
        self._setup_features(probe)
        self.adversarial = None
        if self.config.adversarial_weight > 0:
            num_classes = student.get_classifier().out_features
            self.adversarial = AdversarialTerm(LogitDiscriminator(num_classes),
                                               DiscriminatorConfig.from_dict(self.config.discriminator))
        if num_epochs or steps_per_epoch:
            self.set_run_length(num_epochs, steps_per_epoch)
        self.train(student.training)

    # -- construction -------------------------------------------------------------------------------------------
    def _check_layouts(self) -> None:
        s, t = self.student_stages, self.teacher_stages
        if (s.num_stages, s.stage_channels, s.stage_reductions) != (t.num_stages, t.stage_channels, t.stage_reductions):
            raise StageLayoutError(
                f'Teacher {t.model_name} has {t.num_stages} stages with channels {t.stage_channels} at reductions '
                f'{t.stage_reductions}, student {s.model_name} has {s.num_stages} with {s.stage_channels} at '
                f'{s.stage_reductions}. JointRD runs student stage outputs through the teacher\'s later stages, so '
                f'the layouts must match: use the twin of the teacher (timm.create_model("plain_<teacher>")).')

    def _setup_features(self, probe: torch.Tensor) -> None:
        """Where the final feature is read, which loss compares it, and the connectors (only if lambda > 0)."""
        self.teacher_act, teacher_bn = final_preactivation(self.teacher)
        student_act, _ = final_preactivation(self.student)
        use_margin = self.config.feature_loss == 'margin' and self.teacher_act is not None and \
            student_act is not None and teacher_bn is not None
        self.uses_margin = use_margin
        self._teacher_tap = _InputCapture(self.teacher_act) if use_margin else None
        self._student_tap = _InputCapture(student_act) if use_margin else None
        self.connectors = nn.ModuleList()
        self.feature_loss = None
        if self.config.feature_loss_weight <= 0:
            return
        with torch.no_grad():
            was_training = self.teacher.training
            self.teacher.eval()
            channels = self._teacher_forward(probe)[1].shape[1]
            self.teacher.train(was_training)
        self.feature_loss = MarginFeatureLoss(bn_margin(teacher_bn)) if use_margin else MSEFeatureLoss()
        self.connectors = nn.ModuleList(make_connector(channels) for _ in range(self.num_stages))

    # -- modes and progress ---------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> 'JointRD':
        super().train(mode)
        if self.config.teacher_mode == 'frozen':
            self.teacher.eval()  # a frozen teacher's BN statistics never move
        return self

    def _needs_progress(self) -> bool:
        """Whether the forward depends on the progress (a changing eta, a fade, a scheduled discriminator)."""
        d = self.adversarial.config if self.adversarial is not None else None
        return self.config.eta_min < 1.0 or self.fade is not None or \
            (d is not None and bool(d.milestones or d.cosine_epochs))

    def _check_progress(self) -> None:
        if self.fade is not None or self.config.eta_horizon_fraction is not None:
            self.require_run_length('the shortcut fade' if self.fade is not None else 'eta_horizon_fraction')
        elif self._needs_progress() and int(self.steps_per_epoch) <= 0:
            self.require_run_length('the eta schedule (whose progress is counted in steps)')

    def apply_progress(self) -> None:
        if self.adversarial is not None:
            self.adversarial.set_epoch(int(self.epoch))
        if self.fade is not None and self.knows_run_length:
            self.fade.apply(self, self.student)

    @property
    def shortcut_scale(self) -> Optional[float]:
        """The fading twin's shortcut scale s at this point of training (None without a fade)."""
        return None if self.fade is None else self.fade.scale(self)

    @property
    def eta(self) -> float:
        horizon = self.config.eta_horizon
        if self.config.eta_horizon_fraction is not None:
            self.require_run_length('eta_horizon_fraction')
            horizon = self.config.eta_horizon_fraction * int(self.num_epochs)
        progress = self.progress if self.config.eta_per_step else float(self.epoch)
        return eta_schedule(progress, self.config.eta_min, horizon)

    def epoch_metrics(self) -> Dict[str, float]:
        metrics = {}
        if self.config.eta_horizon_fraction is None or self.knows_run_length:
            metrics['eta'] = self.eta
        if self.fade is not None and self.knows_run_length:
            metrics['shortcut_scale'] = self.shortcut_scale
        return metrics

    # -- forward ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _captured(tap: Optional[_InputCapture], fn):
        """Run ``fn`` with ``tap`` recording; returns fn's (logits, neck) with the feature the loss reads."""
        if tap is None:
            return fn()
        tap.enabled = True
        try:
            logits, _ = fn()
        finally:
            tap.enabled = False
        feature = tap.pop()
        # a shared activation module (SE-ResNet's, GhostNet's) runs more than once per forward: the last call is the
        # final feature, and the earlier ones must not stay on the hook (they hold the graph, leak memory, and make
        # the model impossible to deep-copy for deployment)
        tap.values.clear()
        return logits, feature

    def _teacher_forward(self, x: torch.Tensor):
        return self._captured(self._teacher_tap, lambda: self.teacher_stages(x, 0))

    def _teacher_tail(self, h: torch.Tensor, after: int):
        if self.config.teacher_mode == 'joint':
            # gradients reach h only, never the teacher's weights; the teacher (in train mode) normalises h with h's
            # batch statistics, and its BN running statistics are updated on copies that are dropped, so they keep
            # describing the teacher's own features (what it is evaluated and checkpointed with)
            state = {n: p.detach() for n, p in self.teacher_stages.named_parameters()}
            state.update((n, b.clone()) for n, b in self.teacher_stages.named_buffers())
            return self._captured(self._teacher_tap,
                                  lambda: functional_call(self.teacher_stages, state, (h, after)))
        return self._captured(self._teacher_tap, lambda: self.teacher_stages(h, after))

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Eval mode: the twin's logits. Train mode: the outputs dict, with ``loss`` and its parts when
        ``targets`` are given."""
        if not self.training:
            return self.student(x)
        self._check_progress()
        self.apply_progress()
        with torch.set_grad_enabled(self.config.teacher_mode == 'joint'):
            teacher_logits, teacher_feature = self._teacher_forward(x)
        hs = []

        eta = self.eta
        # per_stage: stage j's gradient is divided by W_j. The hybrid branch at h_k carries 1/W_k, and the twin's own
        # continuation from h_j into stage j+1 carries W_{j+1}/W_j (what arrives there already carries 1/W_{j+1})
        weights = stage_weights(self.num_stages, eta) if self.config.loss_normalization == 'per_stage' else None

        def run_student():
            carry = None if weights is None else lambda j, h: scale_grad(h, weights[j] / weights[j - 1])
            hs.extend(self.student_stages.features(x, carry))
            return self.student_stages(hs[-1], self.num_stages)
        logits, student_feature = self._captured(self._student_tap, run_student)

        paths = self._sample_paths()
        hybrid_logits, hybrid_features = [], []
        for k in paths:
            h = hs[k - 1] if weights is None else scale_grad(hs[k - 1], 1.0 / weights[k - 1])
            z_k, f_k = self._teacher_tail(h, k)
            hybrid_logits.append(z_k)
            hybrid_features.append(f_k)
        if len(self.connectors):
            student_feature = self.connectors[0](student_feature)
            hybrid_features = [self.connectors[k](f) for k, f in zip(paths, hybrid_features)]
        outputs = dict(logits=logits, teacher_logits=teacher_logits, hybrid_logits=hybrid_logits, paths=paths,
                       path_scale=(self.num_stages - 1) / max(1, len(paths)), student_feature=student_feature,
                       teacher_feature=teacher_feature.detach(), hybrid_features=hybrid_features, eta=eta)
        self.count_step()  # counted always: the shortcut fade is per step; eta reads it only if eta_per_step
        if targets is not None:
            outputs.update(self.loss(outputs, targets))
            if self.adversarial is not None:
                d = self.adversarial.discriminator
                teacher_logits = outputs['teacher_logits'].detach()
                outputs['discriminator_loss'] = self.adversarial.step(lambda: conditional_discriminator_loss(
                    d(teacher_logits), d(logits.detach()), targets))
                gan = conditional_gan_term(d(teacher_logits), d(logits), targets,
                                           self.config.adversarial_non_saturating)
                outputs['gan'] = gan.detach()
                outputs['loss'] = outputs['loss'] + self.config.adversarial_weight * gan
        return outputs

    def extra_optimizers(self) -> Dict:
        return {'discriminator': self.adversarial.optimizer} if self.adversarial is not None else {}

    def extra_schedulers(self) -> Dict:
        return {'discriminator': self.adversarial.scheduler} if self.adversarial is not None else {}

    def _sample_paths(self) -> List[int]:
        all_paths = list(range(1, self.num_stages))
        m = self.config.hybrid_paths
        if m is None or m >= len(all_paths):
            return all_paths
        chosen = torch.randperm(len(all_paths))[:m].sort().values
        return [all_paths[i] for i in chosen.tolist()]

    def loss(self, outputs: Dict, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return jointrd_loss(outputs, targets, self.num_stages, self.config, self.feature_loss)


def jointrd_loss(outputs: Dict, targets: torch.Tensor, num_stages: int, config: JointRDConfig,
                 feature_loss: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
    """The JointRD objective on :class:`JointRD` outputs. Returns ``loss`` and its parts (for logging)."""
    eta, scale, n = outputs['eta'], outputs['path_scale'], num_stages
    ce_student = F.cross_entropy(outputs['logits'], targets)
    ce_hybrid = sum((F.cross_entropy(z, targets) for z in outputs['hybrid_logits']), torch.zeros_like(ce_student))
    parts = dict(ce_student=ce_student.detach(), ce_hybrid=ce_hybrid.detach())
    norm = LOSS_NORMALIZERS[config.loss_normalization](n, eta)
    loss = (ce_student + eta * scale * ce_hybrid) / norm
    if feature_loss is not None and config.feature_loss_weight > 0:
        target = outputs['teacher_feature']
        feat = feature_loss(outputs['student_feature'], target) + eta * scale * sum(
            (feature_loss(f, target) for f in outputs['hybrid_features']), torch.zeros_like(ce_student))
        parts['feature'] = (feat / norm).detach()
        loss = loss + config.feature_loss_weight * feat / norm
    if config.kd_weight > 0:
        t = config.kd_temperature
        kd = F.kl_div(F.log_softmax(outputs['logits'] / t, 1), F.softmax(outputs['teacher_logits'].detach() / t, 1),
                      reduction='batchmean') * t * t
        parts['kd'] = kd.detach()
        loss = loss + config.kd_weight * kd
    if config.teacher_mode == 'joint':
        ce_teacher = F.cross_entropy(outputs['teacher_logits'], targets)
        parts['ce_teacher'] = ce_teacher.detach()
        loss = loss + ce_teacher
    parts['loss'] = loss
    return parts


def _probe_for(model: nn.Module) -> torch.Tensor:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    _, h, w = cfg.get('input_size', (3, 64, 64))
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    chans = first_conv.in_channels
    if not cfg.get('fixed_input_size', False):
        h, w = min(h, 64), min(w, 64)
    device = next(model.parameters()).device
    return torch.randn(2, chans, h, w, device=device)
