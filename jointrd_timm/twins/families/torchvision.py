"""torchvision's residual blocks: graph rules (:func:`jointrd_timm.twins.graph_rule.graph_rule`), so that
:func:`~jointrd_timm.make_plain` derives the twin of a torchvision model instance (ResNet / ResNeXt / Wide ResNet,
MobileNetV2 / V3, EfficientNet V1 / V2, RegNet, ConvNeXt, MNASNet) as it does a timm model's.

Each block adds its shortcut in plain code; the blocks built without one (``use_res_connect`` / ``apply_residual``
false: a change of stride or width) trace without any addition and stay as they are. RegNet's projection shortcut
is ``self.proj(x) + self.f(x)``, two submodule calls of equal depth: ``proj`` is named as its shortcut.
tests/test_torchvision.py checks every class on real inputs (the traced forward is the block's), the count of
shortcuts removed per model, and the folded twins' whole graphs by the second detector.

JointRD needs timm's model interface (``forward_features``, ``forward_head``, ``feature_info``) to cut teacher and
twin into stages: a torchvision model is refused there with that reason (the fade, ``deployable`` and
``load_teacher_weights`` work on it).
"""
from importlib import import_module

from ..graph_rule import graph_rule

# torchvision module -> (block class, shortcut names beyond the usual ones)
TORCHVISION_RULE_CLASSES = {
    'torchvision.models.resnet': [('BasicBlock', ()), ('Bottleneck', ())],
    'torchvision.models.mobilenetv2': [('InvertedResidual', ())],
    'torchvision.models.mobilenetv3': [('InvertedResidual', ())],
    'torchvision.models.efficientnet': [('MBConv', ()), ('FusedMBConv', ())],
    'torchvision.models.regnet': [('ResBottleneckBlock', ('proj',))],
    'torchvision.models.convnext': [('CNBlock', ())],
    'torchvision.models.mnasnet': [('_InvertedResidual', ())],
}


def _register() -> None:
    for module_name, classes in TORCHVISION_RULE_CLASSES.items():
        try:
            module = import_module(module_name)
        except ImportError:  # torchvision is optional (or a version without that module): nothing to register
            continue
        for name, names in classes:
            block_class = getattr(module, name, None)
            if block_class is not None:  # a torchvision without that block: nothing to register for it
                graph_rule(block_class, 'torchvision', shortcut_names=names)


_register()
