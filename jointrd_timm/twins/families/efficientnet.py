"""timm's EfficientNet block family (EfficientNet/V2, MobileNetV2/V3/V4, MixNet, MNASNet, FBNet, HardCoReNAS,
LCNet...): every block has ``has_skip``; its shortcut is always an identity (no projections)."""
from timm.models._efficientnet_blocks import (
    CondConvResidual, ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual, UniversalInvertedResidual)

from ..rules import switch_rule

for _block in (ConvBnAct, DepthwiseSeparableConv, InvertedResidual, UniversalInvertedResidual, EdgeResidual,
               CondConvResidual):
    switch_rule(_block, 'has_skip', False)
