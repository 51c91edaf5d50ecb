"""timm's EfficientNet block family (EfficientNet/V2, MobileNetV2/V3/V4, MixNet, MNASNet, FBNet, HardCoReNAS,
LCNet...): every block has ``has_skip``; its shortcut is always an identity (no projections)."""
from .._timm_compat import EFFICIENTNET_BLOCKS
from ..rules import switch_rule

for _block in EFFICIENTNET_BLOCKS:
    switch_rule(_block, 'has_skip', False)
