"""timm.models.byobnet / byoanet (GerNet, RepVGG, MobileOne, ResNet-like ByoB nets, BoTNet/HaloNet blocks):
``shortcut=None`` switches the shortcut off; RepVGG and MobileOne lose their identity-BN branch
(``identity=None``) and keep their parallel conv branches, which fold into one conv at deployment."""
from timm.models.byobnet import (
    BasicBlock, BottleneckBlock, DarkBlock, EdgeBlock, MobileOneBlock, RepVggBlock, SelfAttnBlock)

from ..rules import switch_rule

for _block in (BasicBlock, BottleneckBlock, DarkBlock, EdgeBlock, SelfAttnBlock):
    switch_rule(_block, 'shortcut', None, projection_attr='shortcut')
for _block in (RepVggBlock, MobileOneBlock):
    switch_rule(_block, 'identity', None)
