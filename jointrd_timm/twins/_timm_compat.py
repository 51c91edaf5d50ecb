"""The one place jointrd_timm reaches into a private timm module.

timm's EfficientNet block classes (``ConvBnAct``, ``DepthwiseSeparableConv``, ``InvertedResidual``,
``UniversalInvertedResidual``, ``EdgeResidual``, ``CondConvResidual``) live in ``timm.models._efficientnet_blocks``,
and no public module re-exports them (``timm.models``, ``timm.layers`` and ``timm.models.efficientnet`` /
``mobilenetv3`` do not, as of timm 1.0). The shortcut rules are looked up by exact class, so they need the classes
themselves.

timm also has no public way to add a pretrained tag to an architecture registered by another module
(``register_model`` reads the tags from the module's own ``default_cfgs``): :func:`append_pretrained_tags` writes them
into ``timm.models._registry``'s tables, as ``register_model`` does. tests/test_timm_imports.py allows a private timm
import in this module only.
"""
from typing import Dict, List

from timm.models import PretrainedCfg, _registry  # _registry is private in timm: the tables register_model writes
from timm.models._efficientnet_blocks import (  # private in timm: no public path to these classes exists
    CondConvResidual, ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual, UniversalInvertedResidual)

__all__ = ['EFFICIENTNET_BLOCKS', 'append_pretrained_tags']

# every block of timm's EfficientNet builder that has a ``has_skip`` switch
EFFICIENTNET_BLOCKS = (ConvBnAct, DepthwiseSeparableConv, InvertedResidual, UniversalInvertedResidual, EdgeResidual,
                       CondConvResidual)


def append_pretrained_tags(architecture: str, cfgs: Dict[str, dict]) -> List[str]:
    """Add ``{'<architecture>.<tag>': cfg}`` to an architecture timm has registered, after its own tags: the
    architecture's default weights (``pretrained=True`` without a tag) stay what they were. A name timm already
    knows is left as it is. Returns the names added."""
    if architecture not in _registry._model_entrypoints:
        return []
    default = _registry._model_default_cfgs.get(architecture)
    added = []
    for name, cfg in cfgs.items():
        arch, tag = _registry.split_model_name_tag(name)
        if arch != architecture or not tag or name in _registry._model_pretrained_cfgs:
            continue
        pretrained_cfg = PretrainedCfg(**dict(cfg, architecture=architecture, tag=tag))
        _registry._model_pretrained_cfgs[name] = pretrained_cfg
        if pretrained_cfg.has_weights:
            _registry._model_has_pretrained.add(name)
        _registry._model_with_tags[architecture].append(name)
        if default is not None:
            default.tags.append(tag)
            default.cfgs[tag] = pretrained_cfg
        added.append(name)
    return added
