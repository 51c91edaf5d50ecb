"""timm.models.nfnet (Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization",
ICML 2021; NF-ResNets/RegNets). DECISION: the plain block drops ``alpha`` and ``beta``: they are the signal-
propagation scales of a residual SUM (beta = 1 / expected std of the accumulated stream, alpha = branch weight);
without the sum, the scaled weight-standardised convs keep unit variance on their own, and alpha = 0.2 per
block would shrink the signal geometrically (dead gradients in deep NF-RegNets). ``skipinit_gain`` (zero at init)
is reset to one by make_plain. A fading twin (``shortcut_fade``) moves alpha and beta to one with the shortcuts
(:func:`~jointrd_timm.twins.rules.drop_scales`): the teacher at s = 1, this plain block at s = 0."""
import torch
from timm.models.nfnet import NormFreeBlock

from ..rules import drop_scales, swap_rule
from ._tails import DownsampleTail


class PlainNormFreeBlock(DownsampleTail, NormFreeBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x)
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
        return self._add_kept_projection(out, shortcut)


swap_rule(NormFreeBlock, PlainNormFreeBlock, 'downsample')
drop_scales(NormFreeBlock, 'alpha', 'beta')
