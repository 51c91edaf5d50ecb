"""timm.models.resnetv2: pre-activation ResNets (He et al., "Identity Mappings in Deep Residual Networks",
ECCV 2016), BiT, and the non-pre-activation ``Bottleneck`` used by the hybrid ViT stems."""
import torch
from timm.models.resnetv2 import Bottleneck, PreActBasic, PreActBottleneck

from ..rules import swap_rule
from ._tails import DownsampleTail


class PlainPreActBasic(DownsampleTail, PreActBasic):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        out = self.conv2(self.norm2(self.conv1(x_preact)))
        return self._add_kept_projection(out, x_preact)


class PlainPreActBottleneck(DownsampleTail, PreActBottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        out = self.conv2(self.norm2(self.conv1(x_preact)))
        out = self.conv3(self.norm3(out))
        return self._add_kept_projection(out, x_preact)


class PlainNonPreActBottleneck(DownsampleTail, Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm1(self.conv1(x))
        out = self.norm2(self.conv2(out))
        out = self.norm3(self.conv3(out))
        return self.act3(self._add_kept_projection(out, x))


swap_rule(PreActBasic, PlainPreActBasic, 'downsample')
swap_rule(PreActBottleneck, PlainPreActBottleneck, 'downsample')
swap_rule(Bottleneck, PlainNonPreActBottleneck, 'downsample')
