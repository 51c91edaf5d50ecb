"""timm.models.resnet (ResNet, ResNeXt, SE/ECA-ResNet, ResNet-D, wide ResNets, ResNet-RS) and the CIFAR ResNets.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. The plain blocks are the same blocks with
``x += shortcut`` gone; the projection (``downsample``) stays only when a rule is asked to keep it.
"""
import torch
from timm.models.resnet import BasicBlock, Bottleneck

from ..rules import swap_rule


class PlainBasicBlock(BasicBlock):
    """BasicBlock without its identity shortcut: conv-bn-act, conv-bn[, se][ + projection], act."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)
        x = self.conv2(x)
        x = self.bn2(x)
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            x = x + self.downsample(shortcut)
        return self.act2(x)


class PlainBottleneck(Bottleneck):
    """Bottleneck without its identity shortcut: 1x1, kxk, 1x1 conv-bn with activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)
        x = self.conv3(x)
        x = self.bn3(x)
        if self.se is not None:
            x = self.se(x)
        if self.downsample is not None:
            x = x + self.downsample(shortcut)
        return self.act3(x)


swap_rule(BasicBlock, PlainBasicBlock, 'downsample')
swap_rule(Bottleneck, PlainBottleneck, 'downsample')
