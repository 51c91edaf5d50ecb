"""Families whose blocks add their shortcut in plain code: one graph rule per block class
(:func:`jointrd_timm.twins.graph_rule.graph_rule`). Each class below was checked to trace faithfully on real
inputs (tests/test_graph_rules.py); the shortcut additions are found on the traced graph and cut there.

Notes per family, where the cut is more than "drop ``+ shortcut``":
* dpn: the residual half of the dual path loses its addition; the densely connected half (concatenation) is
  the architecture and stays.
* vovnet (ESE/eSE-VoVNet-B): the OSA block's optional identity addition (``residual=True`` blocks) goes.
* repvit / repghost / lcnetv2 / fastvit: the re-parameterisable blocks' identity (BN) branches are shortcuts too
  (as for RepVGG in byobnet) and go with the outer block shortcuts.
* nasnet / pnasnet: the cells' identity combinations (``op(x) + x``) become ``op(x)``; the additions of two
  operations of equal depth are the cell's design and stay.
* inception_resnet_v2: ``x * scale + shortcut`` keeps its scaled branch; the Block8 without activation too.
* metaformer (PoolFormer, ConvFormer; CAFormer has self-attention and is refused), mambaout (gated CNN, no SSM), inception_next, starnet, fasternet, convmixer, cpubone, ghostnet
  (v1-v3), hgnet (v1/v2 aggregation blocks' identity), rexnet, tresnet, xception (legacy and aligned), cspnext,
  BAT-ResNeXt's non-local attention (its ``x + attn(x)``).

Refused instead (token mixers, see ``derive.token_mixers``): FocalNet, whose focal modulation replaces self-attention
by a product of two projections; its twin derives but is dead at init (its activations vanish block after block and no
gradient reaches the weights), so it is classed with the transformers.
"""
from importlib import import_module

from ..graph_rule import graph_rule

# timm module -> block classes (module names, not ``from timm.models import x``: timm also exports model
# functions under some of these names)
GRAPH_RULE_CLASSES = {
    'timm.layers.non_local_attn': ['BatNonLocalAttn'],
    'timm.models.convmixer': ['Residual'],
    'timm.models.cpubone': ['ResidualBlock'],
    'timm.models.cspnext': ['CspNextBlock'],
    'timm.models.dpn': ['DualPathBlock'],
    'timm.models.fasternet': ['MLPBlock'],
    'timm.models.fastvit': ['RepMixer', 'RepMixerBlock'],
    'timm.models.ghostnet': ['GhostBottleneck', 'GhostBottleneckV3'],
    'timm.models.hgnet': ['HighPerfGpuBlock'],
    'timm.models.inception_next': ['MetaNeXtBlock'],
    'timm.models.inception_resnet_v2': ['Block35', 'Block17', 'Block8'],
    'timm.models.lcnetv2': ['RepDepthwiseSeparable'],
    'timm.models.lowformer': ['ResidualBlock'],  # LowFormer-E (no attention); the other LowFormers are refused
    'timm.models.mambaout': ['GatedConvBlock'],
    'timm.models.metaformer': ['MetaFormerBlock'],
    'timm.models.nasnet': ['CellStem0', 'CellStem1', 'FirstCell', 'NormalCell', 'ReductionCell0', 'ReductionCell1'],
    'timm.models.pnasnet': ['CellStem0', 'Cell'],
    'timm.models.repghost': ['RepGhostBottleneck', 'RepGhostModule'],
    'timm.models.repvit': ['RepViTBlock', 'RepVggDw', 'RepVitDownsample'],
    'timm.models.rexnet': ['LinearBottleneck'],
    'timm.models.starnet': ['Block'],
    'timm.models.tresnet': ['BasicBlock', 'Bottleneck'],
    'timm.models.vovnet': ['OsaBlock'],
    'timm.models.xception': ['Block'],
    'timm.models.xception_aligned': ['XceptionModule', 'PreXceptionModule'],
}

for _module, _names in GRAPH_RULE_CLASSES.items():
    for _name in _names:
        graph_rule(getattr(import_module(_module), _name))
