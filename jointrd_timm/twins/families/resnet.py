"""timm.models.resnet (ResNet, ResNeXt, SE/ECA-ResNet, ResNet-D, wide ResNets, ResNet-RS) and the CIFAR ResNets.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. The plain blocks are the same blocks with
``x += shortcut`` gone; the projection (``downsample``) stays only when a rule is asked to keep it.
"""
import torch
from timm.models.resnet import BasicBlock, Bottleneck

from ..rules import swap_rule
from ._tails import DownsampleTail


class PlainBasicBlock(DownsampleTail, BasicBlock):
    """BasicBlock without its identity shortcut: conv-bn-act, conv-bn[, se][ + projection], act."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        out = self.bn2(self.conv2(out))
        return self.act2(self._se_and_kept_projection(out, x))


class PlainBottleneck(DownsampleTail, Bottleneck):
    """Bottleneck without its identity shortcut: 1x1, kxk, 1x1 conv-bn with activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(out)))))
        out = self.bn3(self.conv3(out))
        return self.act3(self._se_and_kept_projection(out, x))


swap_rule(BasicBlock, PlainBasicBlock, 'downsample')
swap_rule(Bottleneck, PlainBottleneck, 'downsample')
