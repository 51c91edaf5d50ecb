"""JointRD: Residual Distillation (Li, Zhang, Wang, Huang, Xu, Zhang; "Residual Distillation: Towards Portable
Deep Neural Networks without Shortcuts", NeurIPS 2020), in plain PyTorch.

A residual teacher T and its shortcut-free twin S are cut into the same n stages. Per batch (x, y):

    with no grad:  z_T, f_T = T(x)          (frozen teacher, eval mode; only where a term reads them: KD, lambda > 0)
    h_1..h_n, z_S, f_S = S(x)
    for k in 1..n-1:  z_k, f_k = head_T(T_{k+1..n}(h_k))     (gradients reach h_k through T's shortcuts)
    L_cls  = 1/n [ CE(z_S, y) + eta(e) * sum_k CE(z_k, y) ]
    L_feat = 1/n [ D(C_S(f_S), f_T) + eta(e) * sum_k D(C_k(f_k), f_T) ]
    L      = L_cls + lambda * L_feat  (+ kd_weight * Hinton KD(z_S, z_T), an optional extra)

The 1/n is the reference's; ``loss_normalization`` can replace it (DECISION below, in :class:`JointRDConfig`).

eta fades from 1 to eta_min (``schedules.eta_schedule``); C_* are 1x1 conv + BN connectors; D is the margin loss
of Heo et al. on pre-activation features, or MSE where the family exposes none (``feature_losses``).
Only S and the connectors are updated in ``frozen`` mode (the default). In ``joint`` mode the teacher also learns
from its own CE (DECISIONs, fields of :class:`JointRDConfig`: by default one simultaneous update, the hybrid paths
seeing the teacher's weights detached and normalising with batch statistics on copies of its BN buffers, so the
student's loss never moves the teacher's weights or running statistics; ``joint_step_order``, ``hybrid_teacher_bn``
and ``margin_refresh`` give the reference's JOINT branch: teacher step first, tails in eval mode, margin per epoch).
``lean_memory`` backpropagates each hybrid path inside the forward (peak memory of about one path).

Every decision of the method (docs/jointrd.md) is a field of :class:`JointRDConfig`.
"""
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.fx.experimental.optimization import fuse as fx_fuse

from .adversarial import (AdversarialTerm, DiscriminatorConfig, LogitDiscriminator, conditional_discriminator_loss,
                          conditional_gan_term)
from .base import TrainingMethod, check_teacher_student, config_from_dict, hinton_kd
from .fading import ShortcutFade, check_fade_mode
from .feature_losses import MSEFeatureLoss, MarginFeatureLoss, bn_margin, make_connector
from .schedules import check_fade_power, eta_schedule
from .stages import StageLayoutError, StageSplit, final_preactivation
from ..twins.fade import is_fading

__all__ = ['JointRD', 'JointRDConfig', 'TeacherOptimizerConfig', 'hybrid_term', 'jointrd_loss', 'scale_grad',
           'stage_weights']

# JointRDConfig.lean_memory's default (DECISION): on. It computes what the plain single backward computes, in another
# order, and lowers the step's peak memory (most at four stages, where the tails' backward ran while every
# activation of the twin was alive); step times match within noise (benchmarks/results/training_cost.md). The cost: the
# returned hybrid logits and features are detached, so a custom loss on them gets no gradient (turn it off for that)
DEFAULT_LEAN_MEMORY = True

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


class _LeanPaths:
    """One lean forward's hybrid paths, waiting for the caller's backward. Each path k holds either its term's graph
    (deferred: its backward runs at path k's gate, once the twin's backward has freed stages k+1..n) or the
    gradients already taken in the forward (eager: for tails that save whole activations, freed at once); and the
    gradient the caller's backward brings to the returned loss (a GradScaler's scale, a 1/accumulation factor),
    which both are scaled by."""

    def __init__(self):
        self.paths: Dict[int, tuple] = {}
        self.loss_grad: Optional[torch.Tensor] = None

    def add(self, k: int, term: torch.Tensor, inputs: List[torch.Tensor], eager: bool) -> None:
        if eager:
            self.paths[k] = (None, None, torch.autograd.grad(term, inputs, allow_unused=True))
        else:
            self.paths[k] = (term, inputs, None)

    def gradients(self, k: int) -> Optional[tuple]:
        """Path k's gradients with respect to (h_k, its connector's parameters), scaled as the loss's; None where
        path k did not run or the returned loss was not what was backpropagated."""
        entry = self.paths.pop(k, None)
        if entry is None or self.loss_grad is None:
            return None
        term, inputs, grads = entry
        if grads is not None:
            return tuple(None if g is None else g * self.loss_grad.to(g.dtype) for g in grads)
        return torch.autograd.grad(term, inputs, self.loss_grad.to(term.dtype), allow_unused=True)


class _LossTap(torch.autograd.Function):
    """Identity on the loss; its backward (the first of the caller's backward) records the incoming gradient."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, lean: _LeanPaths) -> torch.Tensor:
        ctx.lean = lean
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.lean.loss_grad = grad
        return grad, None


class _PathGate(torch.autograd.Function):
    """Identity on h_k where it enters the twin's stage k+1. Its backward runs when the twin's gradient reaches h_k
    (after _LossTap's, which it depends on) and adds hybrid path k's, so the path's backward runs when the twin's
    later stages have freed their activations; it also returns the gradients of path k's connector."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, lean: _LeanPaths, k: int, *connector: torch.Tensor) -> torch.Tensor:
        ctx.lean, ctx.k, ctx.num_connector = lean, k, len(connector)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        extra = ctx.lean.gradients(ctx.k)
        if extra is None:
            return (grad, None, None) + (None,) * ctx.num_connector
        g_h, *g_connector = extra
        return (grad if g_h is None else grad + g_h, None, None, *g_connector)


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
        shortcut_fade_mode: what s scales: 'scale' (the shortcut: ``branch + s * shortcut``) or 'share' (the
            shortcut's size relative to the branch, so that the twin cannot keep leaning on its shortcuts by
            shrinking its branches as s falls; ``twins.fade.ShareGain``; measured in
            benchmarks/results/deep_twin_diagnostics.md).
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
        lean_memory: backpropagate each hybrid path where its gradient joins the twin's: path k's backward runs
            inside the caller's ``loss.backward()`` when the twin's gradient reaches h_k, after the twin's stages
            k+1..n have freed their activations, instead of at the start of the backward when all of them are
            alive; the tail's input is a detached copy of h_k, and a gate on h_k's way into stage k+1 adds the
            path's gradient (and returns its connector's). Same loss (bit for bit) and gradients (summed in another
            order). The hybrid terms are in the returned loss's value as constants; the gates scale their gradients
            by the gradient the caller's backward brings to that loss (a GradScaler's scale, a 1/accumulation
            factor), so fp16 autocast, accumulation, DDP and ``zero_grad`` placement behave as before and the
            optimizer sees one gradient. Only the returned ``loss`` carries the paths' gradients: the returned
            hybrid logits and features are detached. Where the tails save whole activations (not BN-folded: a
            joint teacher, a feature tap inside the tails), each path is instead backpropagated in the forward, as
            soon as it is computed, so only one tail's activations are alive at a time (not under fp16 autocast,
            where those gradients would miss the loss scale). Needs the targets in the forward (the runner passes
            them); without them the paths are kept for the caller's backward as usual. DECISION default: see
            ``DEFAULT_LEAN_MEMORY``.
        joint_step_order: joint teacher only. 'simultaneous' (DECISION default: it needs no second optimizer to be
            configured): one update of twin and teacher from one loss, the hybrid paths reading the teacher's
            pre-update weights. The reference's combination ('teacher_first' + 'running' + margin per epoch) measured
            better on the depth-110 joint recipe (benchmarks/results/recipe_ablation_resnet110.md), which the
            resnet110 recipe (``recipes.ARCH_RECIPES``) and YAMLs therefore use.
            'teacher_first' (the reference's JOINT branch): the teacher takes its own SGD step on its CE first
            (its optimizer: ``teacher_optimizer``, exposed by ``extra_optimizers()`` for checkpoints), then the
            hybrid paths run through the updated teacher; its CE is then logged, not part of the returned loss.
        teacher_optimizer: the teacher's SGD for 'teacher_first' (fields of :class:`TeacherOptimizerConfig`; give
            the twin's lr, momentum, weight decay and schedule to train both alike).
        hybrid_teacher_bn: joint teacher only (a frozen teacher is always in eval mode). 'batch' (DECISION
            default, with 'simultaneous': the pre-update teacher's running statistics lag its weights): the tails
            normalise the twin's features with their own batch statistics (train-mode BN, running statistics
            untouched). 'running' (the reference): the tails run
            the teacher in eval mode, with the running statistics of its own features.
        fold_teacher_bn: a frozen teacher's tails run with each BN folded into the conv before it (eval-mode BN is
            an affine map: the same function within float rounding, without the BN's compute and saved activations),
            its convs saving nothing for the backward (only the input gradient is needed, and it needs only the
            weight) and its ReLUs a bool mask instead of their output. A copy of the teacher's stages, refolded when
            its weights change; the teacher itself is untouched.
        margin_refresh: the feature loss's margin (Heo et al., from the teacher's last BN). 'once' (DECISION
            default): computed at construction, as a frozen teacher's never changes. 'epoch' (the reference's
            JOINT branch): recomputed from the teacher's BN at the first step of every epoch, for a teacher that
            trains along.
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
    shortcut_fade_mode: str = 'scale'
    loss_normalization: str = 'stages'
    lean_memory: bool = None  # DEFAULT_LEAN_MEMORY, set in __post_init__
    joint_step_order: str = 'simultaneous'
    teacher_optimizer: Optional[Dict] = None
    hybrid_teacher_bn: str = 'batch'
    margin_refresh: str = 'once'
    fold_teacher_bn: bool = True

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
        check_fade_mode(self.shortcut_fade_mode)
        if self.loss_normalization not in LOSS_NORMALIZERS:
            raise ValueError(f'loss_normalization must be one of {list(LOSS_NORMALIZERS)} (the reference: '
                             f"'stages'), got {self.loss_normalization!r}.")
        if self.lean_memory is None:
            self.lean_memory = DEFAULT_LEAN_MEMORY
        for name, allowed in (('joint_step_order', ('simultaneous', 'teacher_first')),
                              ('hybrid_teacher_bn', ('batch', 'running')), ('margin_refresh', ('once', 'epoch'))):
            if getattr(self, name) not in allowed:
                raise ValueError(f'{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.')
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

    @classmethod
    def from_dict(cls, values: Dict) -> 'TeacherOptimizerConfig':
        if 'lr' not in values and not set(values) - {f.name for f in fields(cls)}:
            raise ValueError("teacher_optimizer needs 'lr' (the teacher's learning rate, e.g. the twin's).")
        return config_from_dict(cls, values, 'teacher_optimizer')


class _TeacherStep:
    """The joint teacher's optimizer and scheduler (not a module: the teacher's weights are checkpointed once, as
    ``teacher.*``; the optimizer and scheduler through ``extra_optimizers()`` / ``extra_schedulers()``)."""

    def __init__(self, teacher: nn.Module, config: TeacherOptimizerConfig):
        self.teacher = teacher
        self.optimizer = torch.optim.SGD(teacher.parameters(), lr=config.lr, momentum=config.momentum,
                                         nesterov=config.nesterov, weight_decay=config.weight_decay)
        if config.cosine_epochs:
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.cosine_epochs)
        else:
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, config.milestones, config.gamma)

    def step(self, epoch: int, loss_fn):
        """One SGD step of the teacher on ``loss_fn()`` (run with the teacher's weights trainable, which they are
        not outside this step, so the main optimizer never holds them); returns what loss_fn returned, detached."""
        while self.scheduler.last_epoch < epoch:  # per-epoch schedule, also right after a resume
            self.scheduler.step()
        self.teacher.requires_grad_(True)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            loss, *rest = loss_fn()
            loss.backward()
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                for p in self.teacher.parameters():  # DDP does not see this backward
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= dist.get_world_size()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.teacher.requires_grad_(False)
        return [loss.detach()] + [r.detach() for r in rest]


class _InputGradConv(torch.autograd.Function):
    """A frozen conv: its backward returns the input gradient only, which needs the weight, not the input, so
    nothing is saved (aten's convolution saves the input whenever the input needs a gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        ctx.conv, ctx.input_shape = conv, x.shape
        return conv._conv_forward(x, conv.weight, conv.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # the transposed conv of the gradient (conv2d_input would materialise an input-sized tensor first); the
        # output padding recovers the input sizes the stride rounded away. Under autocast the forward ran in the
        # autocast dtype and the backward runs outside it: the weight follows the gradient
        c = ctx.conv
        spatial = ctx.input_shape[2:]
        padding = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in
                   zip(spatial, grad.shape[2:], c.stride, c.padding, c.dilation, c.kernel_size)]
        return F.conv_transpose2d(grad, c.weight.to(grad.dtype), None, c.stride, c.padding, padding, c.groups,
                                  c.dilation), None


class _MaskReLUFn(torch.autograd.Function):
    """ReLU saving a bool mask (a quarter of the float output it would save) for the backward, which multiplies by
    it: one pass over the gradient, where ``masked_fill`` needs the inverted mask and a copy first."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        ctx.save_for_backward(y > 0)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, = ctx.saved_tensors
        return grad * mask


class _FrozenConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return self.conv(x)
        return _InputGradConv.apply(x, self.conv)


class _MaskReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskReLUFn.apply(x) if x.requires_grad else torch.relu(x)


def _lean_frozen(stage: nn.Module) -> nn.Module:
    """``stage`` (a folded copy of frozen teacher modules) with its plain convs and ReLUs replaced by the
    variants above, which compute the same and save less for an input-gradient backward."""
    for name, module in list(stage.named_modules()):
        if isinstance(module, nn.Conv2d) and type(module) is nn.Conv2d and module.padding_mode == 'zeros' and \
                not isinstance(module.padding, str) and not module.weight.requires_grad:
            replacement = _FrozenConv(module)
        elif type(module) is nn.ReLU:
            replacement = _MaskReLU()
        else:
            continue
        parent, _, child = name.rpartition('.')
        setattr(stage.get_submodule(parent) if parent else stage, child, replacement)
    return stage


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
        check_teacher_student(teacher, student, 'JointRD')
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
            ShortcutFade(c.shortcut_fade, c.shortcut_fade_window, c.shortcut_fade_power, c.shortcut_fade_mode)
        if self.fade is not None:
            self.fade.prepare(student)
        self.num_stages = self.student_stages.num_stages
        if self.config.teacher_mode == 'frozen':
            teacher.requires_grad_(False)
        self._teacher_update = None
        if self.config.joint_step_order == 'teacher_first':
            optimizer = TeacherOptimizerConfig.from_dict(self.config.teacher_optimizer)
            self._teacher_update = _TeacherStep(teacher, optimizer)
            teacher.requires_grad_(False)  # trainable only inside its own step
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
            # gradients reach h only, never the teacher's weights
            state = {n: p.detach() for n, p in self.teacher_stages.named_parameters()}
            if self.config.hybrid_teacher_bn == 'running':
                # the reference: the teacher in eval mode (its running statistics, which stay untouched)
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
            state.update((n, b.clone()) for n, b in self.teacher_stages.named_buffers())
            return self._captured(self._teacher_tap,
                                  lambda: functional_call(self.teacher_stages, state, (h, after)))
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
            try:
                folded = [_lean_frozen(fx_fuse(stage)) for stage in stages]
            except Exception:  # noqa: BLE001 (torch.fx raises many kinds); such a stage runs as it is, unfolded
                folded = None
            cached = self.__dict__['_fold_cache'] = (key, folded)
        return cached[1]

    def _needs_teacher_forward(self) -> bool:
        """Whether a loss term reads the teacher's own outputs z_T / f_T: a joint teacher's CE, KD, the adversarial
        term, the feature loss. The default (frozen teacher, CE terms only) reads neither, so its forward is skipped:
        the hybrid paths run only the teacher's later stages, on the twin's features."""
        c = self.config
        return c.teacher_mode == 'joint' or c.kd_weight > 0 or c.adversarial_weight > 0 or self.feature_loss is not None

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
                logits, feature = self._teacher_forward(x)
                return F.cross_entropy(logits, targets), logits, feature
            ce_teacher, logits, feature = self._teacher_update.step(int(self.epoch), teacher_loss)
            return logits, feature, dict(ce_teacher=ce_teacher)
        if not self._needs_teacher_forward():
            return None, None, {}
        with torch.set_grad_enabled(self.config.teacher_mode == 'joint'):
            logits, feature = self._teacher_forward(x)
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
        eager = lean is not None and self._folded_teacher_stages() is None and not _fp16_autocast(x)
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
                       hybrid_features=hybrid_features, eta=eta, **teacher_parts)
        self.count_step()  # counted always: the shortcut fade is per step; eta reads it only if eta_per_step
        if targets is not None:
            outputs.update(self.loss(outputs, targets))
            if lean is not None:
                # the hybrid terms are in the value already (as constants); this records the gradient the caller's
                # backward brings to the loss, by which each gate scales its path's gradient
                outputs['loss'] = _LossTap.apply(outputs['loss'], lean)
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
        extra = {'discriminator': self.adversarial.optimizer} if self.adversarial is not None else {}
        if self._teacher_update is not None:
            extra['teacher'] = self._teacher_update.optimizer
        return extra

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


def hybrid_term(logits: torch.Tensor, feature: torch.Tensor, targets: torch.Tensor,
                teacher_feature: Optional[torch.Tensor], weight: float, config: JointRDConfig,
                feature_loss: Optional[nn.Module] = None) -> torch.Tensor:
    """One hybrid path's share of the loss: ``weight`` (eta * path scale / normaliser) times its CE plus lambda
    times its feature loss (``lean_memory`` backpropagates it alone; :func:`jointrd_loss` sums the same terms)."""
    term = F.cross_entropy(logits, targets)
    if feature_loss is not None and config.feature_loss_weight > 0:
        term = term + config.feature_loss_weight * feature_loss(feature, teacher_feature)
    return weight * term


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
        kd = hinton_kd(outputs['logits'], outputs['teacher_logits'], config.kd_temperature)
        parts['kd'] = kd.detach()
        loss = loss + config.kd_weight * kd
    if config.teacher_mode == 'joint':
        if config.joint_step_order == 'simultaneous':
            ce_teacher = F.cross_entropy(outputs['teacher_logits'], targets)
            loss = loss + ce_teacher
        else:  # 'teacher_first': the teacher took its step in the forward; logged only
            ce_teacher = outputs['ce_teacher']
        parts['ce_teacher'] = ce_teacher.detach()
    parts['loss'] = loss
    return parts


def _fp16_autocast(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.float16


def _probe_for(model: nn.Module) -> torch.Tensor:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    _, h, w = cfg.get('input_size', (3, 64, 64))
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    chans = first_conv.in_channels
    if not cfg.get('fixed_input_size', False):
        h, w = min(h, 64), min(w, 64)
    device = next(model.parameters()).device
    return torch.randn(2, chans, h, w, device=device)
