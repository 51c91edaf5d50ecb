"""The JointRD training method: teacher and twin in one module whose train-mode forward runs the hybrid paths and
returns the loss (equations in :mod:`jointrd_timm.methods.jointrd`, fields in docs/jointrd.md)."""
from dataclasses import asdict
from typing import Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..adversarial import (AdversarialTerm, DiscriminatorConfig, LogitDiscriminator, conditional_discriminator_loss,
                           conditional_gan_term)
from ..base import TrainingMethod, call_on_buffer_copies, check_teacher_student
from ..feature_losses import MSEFeatureLoss, MarginFeatureLoss, bn_margin, make_connector
from ..schedules import eta_schedule
from ..side_optimizer import SideOptimizer
from ..stages import StageLayoutError, StageSplit, final_preactivation
from ...twins.derive import PlainReport
from ...twins.fade import is_fading
from ...twins.verify import count_shortcut_additions
from .config import LOSS_NORMALIZERS, JointRDConfig, TeacherOptimizerConfig
from .lean import _LeanPaths, _PathGate, fp16_autocast, scale_grad
from .blockwise import BlockTargets
from .loss import hybrid_term, jointrd_loss, stage_weights
from .tails import _InputCapture, fold_frozen_stages

__all__ = ['JointRD']


def _check_roles(student: nn.Module, teacher: nn.Module, fading: bool) -> None:
    """JointRD trains a twin (plain, or fading) under its residual teacher: a teacher that is itself a plain twin,
    or a student that still adds shortcuts and never fades them, would train and deploy something else. Both are
    what swapped arguments look like: ``JointRD(student, teacher, ...)``."""
    swapped = 'Arguments in order: JointRD(student, teacher, ...): the twin first, its residual teacher second.'
    if isinstance(getattr(teacher, 'plain_report', None), PlainReport) and not is_fading(teacher):
        raise ValueError(f'JointRD: the teacher {type(teacher).__name__} is a shortcut-free twin; the teacher is the '
                         f'trained residual model. {swapped}')
    if not fading and not isinstance(getattr(student, 'plain_report', None), PlainReport):
        additions = count_shortcut_additions(student)
        if additions:
            raise ValueError(
                f'JointRD: the student {type(student).__name__} still adds {additions} shortcut(s) and does not fade '
                "them, so it would deploy residual. Give its twin (timm.create_model('plain_<arch>', ...), "
                f"shortcut_fade=True for the recipe's fade, or make_plain / make_fading). {swapped}")


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
        check_teacher_student(teacher, student, 'JointRD')
        super().__init__()
        if isinstance(config, Mapping):  # the fields as a YAML or a dict gives them
            config = JointRDConfig.from_dict(dict(config))
        elif config is not None and not isinstance(config, JointRDConfig):
            raise TypeError(f'JointRD config must be a JointRDConfig or a dict of its fields, got '
                            f'{type(config).__name__}.')
        self.config = config or JointRDConfig()
        self.student = student
        self.teacher = teacher
        if probe is None:
            probe = _probe_for(student)
        self.student_stages = StageSplit(student, probe)
        self.teacher_stages = StageSplit(teacher, probe)
        self._check_layouts()
        fading = is_fading(student)
        _check_roles(student, teacher, fading)
        if fading != (self.config.shortcut_fade is not None):
            raise ValueError(
                'The student has fading shortcuts but JointRDConfig.shortcut_fade is not set (give the fraction of the '
                'run over which they fade, e.g. 0.5)' if fading else
                f'JointRDConfig.shortcut_fade={self.config.shortcut_fade} needs a fading student: build it with '
                "timm.create_model('plain_<arch>', shortcut_fade=True).")
        self.fade = self.config.fade
        if self.fade is not None:
            self.fade.prepare(student)
        self.num_stages = self.student_stages.num_stages
        if self.config.teacher_mode == 'frozen':
            teacher.requires_grad_(False)
        self._teacher_update = None
        if self.config.joint_step_order == 'teacher_first':
            # the teacher's weights are checkpointed once, as teacher.*; trainable only inside its own step
            optimizer = TeacherOptimizerConfig.from_dict(self.config.teacher_optimizer)
            self._teacher_update = SideOptimizer(teacher, **asdict(optimizer))
        self._setup_features(probe)
        # a plain attribute: it holds references to blocks both models own (and hooks on the teacher's)
        self.__dict__['_block_targets'] = BlockTargets(teacher, student) if self.config.block_loss_weight > 0 \
            else None
        self.adversarial = None
        if self.config.adversarial_weight > 0:
            num_classes = self.student_stages.num_logits
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
        # the taps copy the pre-activation on every forward: only when the feature loss reads it
        tapped = use_margin and self.config.feature_loss_weight > 0
        self._teacher_tap = _InputCapture(self.teacher_act) if tapped else None
        self._student_tap = _InputCapture(student_act) if tapped else None
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
    def fades_shortcuts(self) -> bool:
        return self.fade is not None

    def run_length_schedules(self) -> List[str]:
        return ((['the shortcut fade'] if self.fade is not None else [])
                + (['eta (eta_horizon_fraction)'] if self.config.eta_horizon_fraction is not None else []))

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

    def _recorded_teacher_forward(self, x: torch.Tensor):
        """The teacher's own forward on ``x``, its blocks' inputs and outputs recorded for the block targets."""
        if self._block_targets is None:
            return self._teacher_forward(x)
        with self._block_targets.recording():
            return self._teacher_forward(x)

    def _teacher_tail(self, h: torch.Tensor, after: int):
        if self.config.teacher_mode == 'joint':
            # gradients reach h only, never the teacher's weights
            if self.config.hybrid_teacher_bn == 'running':
                # the reference: the teacher in eval mode (its running statistics, which stay untouched)
                state = {n: p.detach() for n, p in self.teacher_stages.named_parameters()}
                was_training = self.teacher_stages.training
                self.teacher_stages.eval()
                try:
                    return self._captured(self._teacher_tap,
                                          lambda: functional_call(self.teacher_stages, state, (h, after)))
                finally:
                    self.teacher_stages.train(was_training)
            # the teacher (in train mode) normalises h with h's batch statistics, and its BN running statistics are
            # updated on copies that are dropped, so they keep describing the teacher's own features (what it is
            # evaluated and checkpointed with)
            return self._captured(self._teacher_tap, lambda: call_on_buffer_copies(
                self.teacher_stages, (h, after), detach_parameters=True))
        folded = self._folded_teacher_stages()
        if folded is None:
            return self._captured(self._teacher_tap, lambda: self.teacher_stages(h, after))
        for stage in folded[after:]:
            h = stage(h)
        neck = self.teacher_stages.neck(h)
        return self.teacher_stages._forward_head(neck), neck

    def _folded_teacher_stages(self) -> Optional[List[nn.Module]]:
        """The frozen teacher's stages with every BN folded into the conv before it (``fold_teacher_bn``), kept
        in sync with the teacher's weights: refolded whenever one of them was written (a load_state_dict, a move to
        another device). None where nothing is folded: a joint teacher, a feature tap inside the tails, a stage
        torch.fx cannot trace."""
        if not self.config.fold_teacher_bn or self.config.teacher_mode != 'frozen' or self._teacher_tap is not None:
            return None
        stages = self.teacher_stages.stages
        key = tuple((t.data_ptr(), t._version) for t in (*stages.parameters(), *stages.buffers()))
        cached = self.__dict__.get('_fold_cache')  # a plain attribute: not in the state dict, never trained
        if cached is None or cached[0] != key:
            cached = self.__dict__['_fold_cache'] = (key, fold_frozen_stages(stages))
        return cached[1]

    def _needs_teacher_forward(self) -> bool:
        """Whether a loss term reads the teacher's own outputs z_T / f_T: a joint teacher's CE, KD, the adversarial
        term, the feature loss. The default (frozen teacher, CE terms only) reads neither, so its forward is skipped:
        the hybrid paths run only the teacher's later stages, on the twin's features."""
        c = self.config
        return c.teacher_mode == 'joint' or c.kd_weight > 0 or c.adversarial_weight > 0 or \
            self.feature_loss is not None or self._block_targets is not None

    def _refresh_margin(self) -> None:
        """``margin_refresh='epoch'``: the margin recomputed from the teacher's last BN once per epoch (at its first
        step, before the teacher's update of that step)."""
        if self.config.margin_refresh != 'epoch' or not isinstance(self.feature_loss, MarginFeatureLoss):
            return
        epoch = int(self.epoch)
        if getattr(self, '_margin_epoch', None) != epoch:
            _, bn = final_preactivation(self.teacher)
            self.feature_loss.margin.copy_(bn_margin(bn).reshape(self.feature_loss.margin.shape))
            self._margin_epoch = epoch

    def _teacher_outputs(self, x: torch.Tensor, targets: Optional[torch.Tensor]):
        """(z_T, f_T, parts): the teacher's forward where a term reads it (None, None otherwise); with
        'teacher_first', its own SGD step on its CE too (logged as ``ce_teacher``)."""
        if self._teacher_update is not None:
            if targets is None:
                raise ValueError("joint_step_order='teacher_first' trains the teacher inside the forward: call the "
                                 'JointRD module with the targets, model(x, y) (forward_proc: forward_batch_target).')

            def teacher_loss():
                logits, feature = self._recorded_teacher_forward(x)
                return F.cross_entropy(logits, targets), logits, feature
            self._teacher_update.set_epoch(int(self.epoch))
            ce_teacher, logits, feature = self._teacher_update.step(teacher_loss)
            return logits, feature, dict(ce_teacher=ce_teacher)
        if not self._needs_teacher_forward():
            return None, None, {}
        with torch.set_grad_enabled(self.config.teacher_mode == 'joint'):
            logits, feature = self._recorded_teacher_forward(x)
        return logits, feature, {}

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Eval mode: the twin's logits. Train mode: the outputs dict, with ``loss`` and its parts when
        ``targets`` are given (``teacher_logits`` / ``teacher_feature`` are None where no term reads them)."""
        if not self.training:
            return self.student(x)
        self._check_progress()
        self.apply_progress()
        self._refresh_margin()
        teacher_logits, teacher_feature, teacher_parts = self._teacher_outputs(x, targets)
        if teacher_feature is not None:
            teacher_feature = teacher_feature.detach()
        block_loss = self._block_targets.loss() if self._block_targets is not None else None
        hs = []

        eta = self.eta
        # per_stage: stage j's gradient is divided by W_j. The hybrid branch at h_k carries 1/W_k, and the twin's own
        # continuation from h_j into stage j+1 carries W_{j+1}/W_j (what arrives there already carries 1/W_{j+1})
        weights = stage_weights(self.num_stages, eta) if self.config.loss_normalization == 'per_stage' else None
        # lean needs a backward to come (not a train-mode forward under no_grad, e.g. a loss logged without one)
        lean = _LeanPaths() if self.config.lean_memory and targets is not None and torch.is_grad_enabled() else None

        def carry(j, h):
            if lean is not None:  # where path j's gradient joins the twin's, in the caller's backward
                h = _PathGate.apply(h, lean, j, *self._connector_parameters(j))
            return h if weights is None else scale_grad(h, weights[j] / weights[j - 1])

        def run_student():
            hs.extend(self.student_stages.features(x, carry if lean is not None or weights is not None else None))
            return self.student_stages(hs[-1], self.num_stages)
        logits, student_feature = self._captured(self._student_tap, run_student)

        paths = self._sample_paths()
        path_scale = (self.num_stages - 1) / max(1, len(paths))
        # lean with tails that save more than bool masks (unfolded): each path backpropagated here, at once
        eager = lean is not None and self._folded_teacher_stages() is None and not fp16_autocast(x)
        norm = LOSS_NORMALIZERS[self.config.loss_normalization](self.num_stages, eta)
        hybrid_logits, hybrid_features = [], []
        for k in paths:
            h = hs[k - 1].detach().requires_grad_() if lean is not None else hs[k - 1]
            z_k, f_k = self._teacher_tail(h if weights is None else scale_grad(h, 1.0 / weights[k - 1]), k)
            if len(self.connectors):
                f_k = self.connectors[k](f_k)
            if lean is not None:
                term = hybrid_term(z_k, f_k, targets, teacher_feature, eta * path_scale / norm, self.config,
                                   self.feature_loss)
                lean.add(k, term, [h, *self._connector_parameters(k)], eager)
                z_k, f_k = z_k.detach(), f_k.detach()
            hybrid_logits.append(z_k)
            hybrid_features.append(f_k)
        if len(self.connectors):
            student_feature = self.connectors[0](student_feature)
        outputs = dict(logits=logits, teacher_logits=teacher_logits, hybrid_logits=hybrid_logits, paths=paths,
                       path_scale=path_scale, student_feature=student_feature, teacher_feature=teacher_feature,
                       hybrid_features=hybrid_features, eta=eta, block_loss=block_loss, **teacher_parts)
        self.count_step()  # counted always: the shortcut fade is per step; eta reads it only if eta_per_step
        if targets is not None:
            outputs.update(self.loss(outputs, targets))
            if lean is not None:
                # the hybrid terms are in the value already (as constants); this records the gradient the caller's
                # backward brings to the loss, by which each gate scales its path's gradient
                outputs['loss'] = lean.tap(outputs['loss'])
            if self.adversarial is not None:
                self._add_adversarial_term(outputs, targets)
        return outputs

    def _add_adversarial_term(self, outputs: Dict, targets: torch.Tensor) -> None:
        """The discriminator's step on (teacher, twin) logits, then its conditional GAN term in the twin's loss."""
        d, logits = self.adversarial.discriminator, outputs['logits']
        teacher_logits = outputs['teacher_logits'].detach()
        outputs['discriminator_loss'] = self.adversarial.step(lambda: conditional_discriminator_loss(
            d(teacher_logits), d(logits.detach()), targets))
        gan = conditional_gan_term(d(teacher_logits), d(logits), targets, self.config.adversarial_non_saturating)
        outputs['gan'] = gan.detach()
        outputs['loss'] = outputs['loss'] + self.config.adversarial_weight * gan

    def extra_optimizers(self) -> Dict:
        extra = {'discriminator': self.adversarial.optimizer} if self.adversarial is not None else {}
        if self._teacher_update is not None:
            extra['teacher'] = self._teacher_update.optimizer
        return extra

    def side_optimizers(self) -> list:
        sides = [self.adversarial.updates] if self.adversarial is not None else []
        return sides + ([self._teacher_update] if self._teacher_update is not None else [])

    def frozen_modules(self) -> list:
        frozen = super().frozen_modules()
        return [self.teacher, *frozen] if self.config.teacher_mode == 'frozen' else frozen

    def extra_schedulers(self) -> Dict:
        extra = {'discriminator': self.adversarial.scheduler} if self.adversarial is not None else {}
        if self._teacher_update is not None:
            extra['teacher'] = self._teacher_update.scheduler
        return extra

    def _connector_parameters(self, k: int) -> List[nn.Parameter]:
        """The parameters of hybrid path k's feature connector (none without connectors)."""
        return list(self.connectors[k].parameters()) if len(self.connectors) else []

    def _sample_paths(self) -> List[int]:
        all_paths = list(range(1, self.num_stages))
        m = self.config.hybrid_paths
        if m is None or m >= len(all_paths):
            return all_paths
        chosen = torch.randperm(len(all_paths))[:m].sort().values
        return [all_paths[i] for i in chosen.tolist()]

    def loss(self, outputs: Dict, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return jointrd_loss(outputs, targets, self.num_stages, self.config, self.feature_loss)


def _probe_for(model: nn.Module) -> torch.Tensor:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    _, h, w = cfg.get('input_size', (3, 64, 64))
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    chans = first_conv.in_channels
    if not cfg.get('fixed_input_size', False):
        h, w = min(h, 64), min(w, 64)
    device = next(model.parameters()).device
    return torch.randn(2, chans, h, w, device=device)
