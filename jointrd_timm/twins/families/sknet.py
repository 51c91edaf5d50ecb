"""timm.models.sknet (Li et al., "Selective Kernel Networks", CVPR 2019). The selective-kernel attention sums
its branches inside ``conv2``; that fusion is not a shortcut and stays."""
import torch
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck

from ..rules import swap_rule
from ._tails import DownsampleTail


class PlainSelectiveKernelBasic(DownsampleTail, SelectiveKernelBasic):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return self.act(self._se_and_kept_projection(out, x))


class PlainSelectiveKernelBottleneck(DownsampleTail, SelectiveKernelBottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.act(self._se_and_kept_projection(out, x))


swap_rule(SelectiveKernelBasic, PlainSelectiveKernelBasic, 'downsample')
swap_rule(SelectiveKernelBottleneck, PlainSelectiveKernelBottleneck, 'downsample')
