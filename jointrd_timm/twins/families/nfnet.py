"""timm.models.nfnet (Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization",
ICML 2021; NF-ResNets/RegNets). The residual branch keeps its ``alpha`` scale; ``skipinit_gain`` (zero at
init) is reset to one by make_plain, or the plain net would start dead."""
import torch
from timm.models.nfnet import NormFreeBlock

from ..rules import swap_rule


class PlainNormFreeBlock(NormFreeBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = out
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:
            out = self.attn_gain * self.attn(out)
        out = self.conv3(self.act3(out))
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain
        out = out * self.alpha
        if self.downsample is not None:
            out = out + self.downsample(shortcut)
        return out


swap_rule(NormFreeBlock, PlainNormFreeBlock, 'downsample')
