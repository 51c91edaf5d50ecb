"""JointRD: Residual Distillation (Li, Zhang, Wang, Huang, Xu, Zhang; "Residual Distillation: Towards Portable
Deep Neural Networks without Shortcuts", NeurIPS 2020), in plain PyTorch.

A residual teacher T and its shortcut-free twin S are cut into the same n stages. Per batch (x, y):

    with no grad:  z_T, f_T = T(x)          (frozen teacher, eval mode; only where a term reads them: KD, lambda > 0)
    h_1..h_n, z_S, f_S = S(x)
    for k in 1..n-1:  z_k, f_k = head_T(T_{k+1..n}(h_k))     (gradients reach h_k through T's shortcuts)
    L_cls  = 1/n [ CE(z_S, y) + eta(e) * sum_k CE(z_k, y) ]
    L_feat = 1/n [ D(C_S(f_S), f_T) + eta(e) * sum_k D(C_k(f_k), f_T) ]
    L      = L_cls + lambda * L_feat  (+ kd_weight * Hinton KD(z_S, z_T), an optional extra)

eta fades from 1 to eta_min (``schedules.eta_schedule``); C_* are 1x1 conv + BN connectors; D is the margin loss
of Heo et al. on pre-activation features, or MSE where the family exposes none (``feature_losses``). Every
decision of the method (the 1/n normaliser, a teacher trained along, lean memory, BN-folded tails) is a field of
:class:`JointRDConfig`, described in docs/jointrd.md.

The package: ``config`` (the settings), ``loss`` (the objective), ``method`` (the :class:`JointRD` module),
``blockwise`` (the teacher-forced block targets of ``block_loss_weight``),
``lean`` (the autograd machinery of ``lean_memory``), ``tails`` (the frozen teacher's BN-folded tails). The joint
teacher's own optimizer ('teacher_first') is a :class:`~jointrd_timm.methods.side_optimizer.SideOptimizer`.
"""
from .config import DEFAULT_LEAN_MEMORY, LOSS_NORMALIZERS, JointRDConfig, TeacherOptimizerConfig
from .lean import scale_grad
from .loss import hybrid_term, jointrd_loss, stage_weights
from .method import JointRD
# importable from here as when the package was one module (tests reach them)
from .lean import _LeanPaths  # noqa: F401
from .tails import _FrozenConv, _MaskReLUFn  # noqa: F401

__all__ = ['JointRD', 'JointRDConfig', 'TeacherOptimizerConfig', 'hybrid_term', 'jointrd_loss', 'scale_grad',
           'stage_weights']
