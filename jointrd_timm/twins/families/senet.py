"""timm.models.senet (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018; the legacy SENet/SE-ResNet(X)
ports). The three bottleneck classes share one forward, so one plain forward serves them all."""
import torch
from timm.models.senet import SEBottleneck, SEResNetBlock, SEResNetBottleneck, SEResNeXtBottleneck

from ..rules import swap_rule
from ._tails import DownsampleTail


class _PlainSEBottleneckForward(DownsampleTail):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se_module(self.bn3(self.conv3(out)))
        return self.relu(self._add_kept_projection(out, x))


class PlainSEBottleneck(_PlainSEBottleneckForward, SEBottleneck):
    pass


class PlainSEResNetBottleneck(_PlainSEBottleneckForward, SEResNetBottleneck):
    pass


class PlainSEResNeXtBottleneck(_PlainSEBottleneckForward, SEResNeXtBottleneck):
    pass


class PlainSEResNetBlock(DownsampleTail, SEResNetBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se_module(self.relu(self.bn2(self.conv2(out))))
        return self.relu(self._add_kept_projection(out, x))


swap_rule(SEBottleneck, PlainSEBottleneck, 'downsample')
swap_rule(SEResNetBottleneck, PlainSEResNetBottleneck, 'downsample')
swap_rule(SEResNeXtBottleneck, PlainSEResNeXtBottleneck, 'downsample')
swap_rule(SEResNetBlock, PlainSEResNetBlock, 'downsample')
