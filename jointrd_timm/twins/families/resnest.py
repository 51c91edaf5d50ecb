"""timm.models.resnest (Zhang et al., "ResNeSt: Split-Attention Networks", 2020)."""
import torch
from timm.models.resnest import ResNestBottleneck

from ..rules import swap_rule


class PlainResNestBottleneck(ResNestBottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.act1(out)
        if self.avd_first is not None:
            out = self.avd_first(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.drop_block(out)
        out = self.act2(out)
        if self.avd_last is not None:
            out = self.avd_last(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            out = out + self.downsample(x)
        return self.act3(out)


swap_rule(ResNestBottleneck, PlainResNestBottleneck, 'downsample')
