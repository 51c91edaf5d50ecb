"""timm.models.cspnet (Wang et al., "CSPNet", CVPRW 2020; CSPResNet/ResNeXt/DarkNet): the blocks inside the
cross-stage stages add an identity shortcut. The cross-stage split/concat itself is not an addition and stays."""
import torch
from timm.models.cspnet import BottleneckBlock, DarkBlock, EdgeBlock

from ..rules import swap_rule


class PlainCspBottleneckBlock(BottleneckBlock):
    shortcut = None  # CSP blocks never project; the attribute exists for the shared rule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.attn2(x)
        x = self.conv3(x)
        x = self.attn3(x)
        return self.act3(x)


class _PlainConvAttnConv:
    """DarkBlock and EdgeBlock share one forward: conv1, attn, conv2 (then the shortcut, gone here)."""
    shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.attn(self.conv1(x)))


class PlainCspDarkBlock(_PlainConvAttnConv, DarkBlock):
    pass


class PlainCspEdgeBlock(_PlainConvAttnConv, EdgeBlock):
    pass


swap_rule(BottleneckBlock, PlainCspBottleneckBlock, 'shortcut')
swap_rule(DarkBlock, PlainCspDarkBlock, 'shortcut')
swap_rule(EdgeBlock, PlainCspEdgeBlock, 'shortcut')
