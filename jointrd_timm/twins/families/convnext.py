"""timm.models.convnext (Liu et al., "A ConvNet for the 2020s", CVPR 2022). The plain block also drops the
tiny layer-scale init (1e-6): without a shortcut it would shrink the signal by 1e-6 per block."""
import torch
from timm.models.convnext import ConvNeXtBlock

from ..rules import swap_rule


class PlainConvNeXtBlock(ConvNeXtBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x)
        if self.use_conv_mlp:
            x = self.norm(x)
            x = self.mlp(x)
        else:
            x = x.permute(0, 2, 3, 1)
            x = self.norm(x)
            x = self.mlp(x)
            x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        if self.shortcut is not None:
            x = x + self.shortcut(shortcut)
        return x


swap_rule(ConvNeXtBlock, PlainConvNeXtBlock, 'shortcut')
