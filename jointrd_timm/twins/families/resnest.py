"""timm.models.resnest (Zhang et al., "ResNeSt: Split-Attention Networks", 2020)."""
import torch
from timm.models.resnest import ResNestBottleneck

from ..rules import swap_rule
from ._tails import DownsampleTail


class PlainResNestBottleneck(DownsampleTail, ResNestBottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        if self.avd_first is not None:
            out = self.avd_first(out)
        out = self.act2(self.drop_block(self.bn2(self.conv2(out))))
        if self.avd_last is not None:
            out = self.avd_last(out)
        out = self.bn3(self.conv3(out))
        return self.act3(self._add_kept_projection(out, x))


swap_rule(ResNestBottleneck, PlainResNestBottleneck, 'downsample')
