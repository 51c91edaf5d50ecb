"""Feature losses for JointRD: the margin loss of Heo et al. and the MSE fallback.

Heo, Kim, Yun, Park, Kwak, Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019.
The teacher's pre-ReLU feature t is clipped from below by a per-channel margin m (the expected value of the
negative responses, from the teacher's last BN under a Gaussian assumption); the student's (connected) feature s
is pulled to it with a partial L2 that ignores positions where both s <= t and t <= 0, i.e. where ReLU would
make them equal anyway. Loss = sum over C, H, W of the masked squared error, averaged over the batch.
"""
import math

import torch
from torch import nn

__all__ = ['bn_margin', 'MarginFeatureLoss', 'MSEFeatureLoss', 'make_connector']


def bn_margin(bn: nn.BatchNorm2d) -> torch.Tensor:
    """m = beta - s * phi(beta/s) / Phi(-beta/s), s = |gamma|; -3s where Phi(-beta/s) < 1e-3. Shape (C,)."""
    s = bn.weight.detach().abs().clamp_min(1e-12)
    b = bn.bias.detach()
    ratio = b / s
    pdf = torch.exp(-ratio.square() / 2) / math.sqrt(2 * math.pi)
    cdf_neg = 0.5 * torch.erfc(ratio / math.sqrt(2))  # Phi(-b/s)
    margin = b - s * pdf / cdf_neg.clamp_min(1e-12)
    return torch.where(cdf_neg > 1e-3, margin, -3 * s)


class MarginFeatureLoss(nn.Module):
    """Partial L2 towards the margin-clipped teacher feature (Heo et al. 2019)."""

    def __init__(self, margin: torch.Tensor):
        super().__init__()
        self.register_buffer('margin', margin.reshape(1, -1, 1, 1).clone())

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        target = torch.max(teacher, self.margin.to(teacher.dtype))
        mask = (student > target) | (target > 0)
        return ((student - target).square() * mask).sum() / student.shape[0]


class MSEFeatureLoss(nn.Module):
    """Fallback where no pre-activation feature / final BN is exposed: sum of squared error / batch."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return (student - teacher).square().sum() / student.shape[0]


def make_connector(channels: int) -> nn.Sequential:
    """1x1 conv (no bias) + BN, conv weights N(0, sqrt(2 / C)) (JointRD reference / Heo et al.)."""
    conv = nn.Conv2d(channels, channels, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / channels))
    bn = nn.BatchNorm2d(channels)
    return nn.Sequential(conv, bn)
