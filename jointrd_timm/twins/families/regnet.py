"""timm.models.regnet (Radosavovic et al., "Designing Network Design Spaces", CVPR 2020): the blocks already
treat ``downsample=None`` as "no shortcut" (an identity shortcut is an nn.Identity there)."""
from timm.models.regnet import Bottleneck, PreBottleneck

from ..rules import switch_rule

switch_rule(Bottleneck, 'downsample', None, projection_attr='downsample')
switch_rule(PreBottleneck, 'downsample', None, projection_attr='downsample')
