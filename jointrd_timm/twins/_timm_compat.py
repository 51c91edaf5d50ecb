"""The one place jointrd_timm reaches into a private timm module.

timm's EfficientNet block classes (``ConvBnAct``, ``DepthwiseSeparableConv``, ``InvertedResidual``,
``UniversalInvertedResidual``, ``EdgeResidual``, ``CondConvResidual``) live in ``timm.models._efficientnet_blocks``,
and no public module re-exports them (``timm.models``, ``timm.layers`` and ``timm.models.efficientnet`` /
``mobilenetv3`` do not, as of timm 1.0). The shortcut rules are looked up by exact class, so they need the classes
themselves. tests/test_timm_imports.py allows a private timm import in this module only.
"""
from timm.models._efficientnet_blocks import (  # private in timm: no public path to these classes exists
    CondConvResidual, ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual, UniversalInvertedResidual)

__all__ = ['EFFICIENTNET_BLOCKS']

# every block of timm's EfficientNet builder that has a ``has_skip`` switch
EFFICIENTNET_BLOCKS = (ConvBnAct, DepthwiseSeparableConv, InvertedResidual, UniversalInvertedResidual, EdgeResidual,
                       CondConvResidual)
