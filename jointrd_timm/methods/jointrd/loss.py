"""The JointRD objective (equations in :mod:`jointrd_timm.methods.jointrd`): summed over the outputs of a
:class:`~.method.JointRD` forward (:func:`jointrd_loss`), one hybrid path's share of it alone (:func:`hybrid_term`,
what ``lean_memory`` backpropagates path by path), and the per-stage weights of ``loss_normalization='per_stage'``."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..base import hinton_kd
from .config import LOSS_NORMALIZERS, JointRDConfig

__all__ = ['stage_weights', 'hybrid_term', 'jointrd_loss']


def stage_weights(n: int, eta: float) -> List[float]:
    """W_1..W_n: the summed weight of the loss terms whose gradient reaches student stage j: the twin's own CE
    (weight 1, through every stage) and the hybrid terms of paths k >= j (eta each; in expectation when paths are
    sampled). Stage n and the head get the twin's CE only (W_n = 1); stage 1 (and the stem) everything."""
    return [1.0 + eta * (n - j) for j in range(1, n + 1)]


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
    """The JointRD objective on :class:`~.method.JointRD` outputs. Returns ``loss`` and its parts (for logging)."""
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
    if outputs.get('block_loss') is not None:
        parts['block'] = outputs['block_loss'].detach()
        loss = loss + config.block_loss_weight * outputs['block_loss']
    if config.teacher_mode == 'joint':
        if config.joint_step_order == 'simultaneous':
            ce_teacher = F.cross_entropy(outputs['teacher_logits'], targets)
            loss = loss + ce_teacher
        else:  # 'teacher_first': the teacher took its step in the forward; logged only
            ce_teacher = outputs['ce_teacher']
        parts['ce_teacher'] = ce_teacher.detach()
    parts['loss'] = loss
    return parts
