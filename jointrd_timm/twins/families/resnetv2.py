"""timm.models.resnetv2: pre-activation ResNets (He et al., "Identity Mappings in Deep Residual Networks",
ECCV 2016), BiT, and the non-pre-activation ``Bottleneck`` used by the hybrid ViT stems."""
import torch
from timm.models.resnetv2 import Bottleneck, PreActBasic, PreActBottleneck

from ..rules import swap_rule


class PlainPreActBasic(PreActBasic):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        if self.downsample is not None:
            x = x + self.downsample(x_preact)
        return x


class PlainPreActBottleneck(PreActBottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        if self.downsample is not None:
            x = x + self.downsample(x_preact)
        return x


class PlainNonPreActBottleneck(Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv1(x)
        x = self.norm1(x)
        x = self.conv2(x)
        x = self.norm2(x)
        x = self.conv3(x)
        x = self.norm3(x)
        if self.downsample is not None:
            x = x + self.downsample(shortcut)
        return self.act3(x)


swap_rule(PreActBasic, PlainPreActBasic, 'downsample')
swap_rule(PreActBottleneck, PlainPreActBottleneck, 'downsample')
swap_rule(Bottleneck, PlainNonPreActBottleneck, 'downsample')
