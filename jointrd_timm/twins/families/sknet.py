"""timm.models.sknet (Li et al., "Selective Kernel Networks", CVPR 2019). The selective-kernel attention sums
its branches inside ``conv2``; that fusion is not a shortcut and stays."""
import torch
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck

from ..rules import swap_rule


class PlainSelectiveKernelBasic(SelectiveKernelBasic):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            x = x + self.downsample(shortcut)
        return self.act(x)


class PlainSelectiveKernelBottleneck(SelectiveKernelBottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.conv3(x)
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            x = x + self.downsample(shortcut)
        return self.act(x)


swap_rule(SelectiveKernelBasic, PlainSelectiveKernelBasic, 'downsample')
swap_rule(SelectiveKernelBottleneck, PlainSelectiveKernelBottleneck, 'downsample')
