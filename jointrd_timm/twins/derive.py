"""make_plain: derive the shortcut-free twin of any timm model instance.

Li et al., "Residual Distillation: Towards Portable Deep Neural Networks without Shortcuts", NeurIPS 2020.
The twin keeps the teacher's stage layout, widths and parameter names; it loses the shortcut additions and the
projection modules that only fed them. One walk over the modules applies the rule registered for each block
class (see :mod:`jointrd_timm.twins.rules` and the per-family modules), then makes the plain blocks trainable.
"""
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn
from timm.layers import DropPath, LayerScale, LayerScale2d

from ..errors import JointRDError
from . import families  # noqa: F401  (registers the rules)
from .rules import get_rule, handed_projections
from .verify import find_unhandled_residual_blocks, handed_additions, shortcut_additions

__all__ = ['make_plain', 'PlainReport', 'NotResidualError', 'UnsupportedBlockError', 'token_mixers', 'make_trainable',
           'label_as_twin', 'refused_by_design']
TWIN_PREFIX = 'plain_'  # a twin's timm name: plain_<teacher architecture> (jointrd_timm.models.plain_twins)


class NotResidualError(JointRDError, ValueError):
    """The model has no residual block that any rule knows: there is nothing to make plain."""


class UnsupportedBlockError(JointRDError, ValueError):
    """A block adds a shortcut but no rule handles its class (strict mode)."""


@dataclass
class PlainReport:
    """What make_plain did, kept on the twin as ``model.plain_report``."""
    blocks_by_rule: Counter = field(default_factory=Counter)
    shortcuts_removed: int = 0
    removed_modules: List[str] = field(default_factory=list)
    kept_projections: List[str] = field(default_factory=list)
    reinitialised: List[str] = field(default_factory=list)
    rule_descriptions: Dict[str, str] = field(default_factory=dict)
    unhandled: List[str] = field(default_factory=list)
    keep_projection_shortcuts: bool = False
    teacher_keys_dropped: List[str] = field(default_factory=list)  # by a pretrained teacher tag's load



# Token mixers: self-attention (and its linear / multi-query / cascaded / single-head variants), attention
# replacements that mix tokens multiplicatively (focal modulation), recurrent and state-space mixers, MLP token
# mixing. A network built on them is a transformer (or a hybrid) whatever its stem: its shortcuts carry the token
# stream, and it is refused by design. Matched on class names, plus timm modules that are MLP-Mixers throughout.
_TOKEN_MIXER = re.compile(r'attention|attn|gpsa|mhsa|shsa|shma|lstm|ssd|ssm|spatialgating|rotary|litemla|'
                          r'modulation|parallelscaling', re.IGNORECASE)
_TOKEN_MIXER_MODULES = ('timm.models.mlp_mixer',)
# attention inside CNN blocks (squeeze-excite relatives, selective-kernel / split attention, non-local and the
# self-attention bottlenecks of byoanet, whose blocks have their own rules): not token mixers of a transformer
_CNN_ATTENTION = {'SelectiveKernelAttn', 'SplitAttn', 'BatNonLocalAttn', 'BilinearAttnTransform', 'NonLocalAttn',
                  'BottleneckAttn', 'HaloAttn', 'SelfAttnBlock', 'CbamModule', 'LightCbamModule', 'ChannelAttn',
                  'SpatialAttn', 'LightChannelAttn', 'LightSpatialAttn', 'CoordAttn'}


def token_mixers(module: nn.Module) -> List[str]:
    """Class names of the token-mixing modules in ``module`` (itself included); empty for a CNN."""
    found = set()
    for sub in module.modules():
        cls = type(sub)
        if isinstance(sub, nn.MultiheadAttention):  # torch's own (torchvision's ViT, user transformers)
            found.add(cls.__name__)
            continue
        if cls.__name__ in _CNN_ATTENTION or cls.__module__.startswith('torch.'):
            continue
        if _TOKEN_MIXER.search(cls.__name__) or cls.__module__.startswith(_TOKEN_MIXER_MODULES):
            found.add(cls.__name__)
    return sorted(found)


_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d)
_STOCHASTIC_DEPTH = ('DropPath', 'StochasticDepth')  # class names: timm's, torchvision's (torchvision.ops)


def make_trainable(name: str, block: nn.Module, report: PlainReport) -> None:
    """Undo the initialisations that only make sense beside a shortcut, and stochastic depth.

    Stochastic depth (timm's ``DropPath``, torchvision's ``StochasticDepth``, a user's class of either name) drops a
    block's branch for some samples in training: beside a shortcut the sample skips the block, in a twin it loses its
    whole signal. It is replaced by ``nn.Identity`` (what it is in eval mode), at any depth inside the block (a
    user's block may keep it at the end of a branch ``nn.Sequential``).
    Only values still at their residual-friendly init are touched (a zero BN gamma, a zero conv, a layer scale
    below 1e-3 everywhere), so the weights of a trained model are never changed."""
    for sub_name, module in list(block.named_modules()):
        if sub_name and (isinstance(module, DropPath) or type(module).__name__ in _STOCHASTIC_DEPTH):
            parent, _, leaf = sub_name.rpartition('.')
            setattr(block.get_submodule(parent) if parent else block, leaf, nn.Identity())
    for sub_name, module in block.named_modules():
        path = f'{name}.{sub_name}' if sub_name else name
        is_norm = isinstance(module, _NORMS) or 'norm' in type(module).__name__.lower()  # EvoNorm, FRN, ...
        if is_norm and isinstance(getattr(module, 'weight', None), nn.Parameter) and _all_zero(module.weight):
            nn.init.ones_(module.weight)
            report.reinitialised.append(f'{path}.weight (zero-init norm -> 1)')
        elif isinstance(module, nn.Conv2d) and _all_zero(module.weight):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            report.reinitialised.append(f'{path}.weight (zero-init conv -> kaiming)')
        elif isinstance(module, nn.Conv2d) and isinstance(getattr(module, 'gain', None), nn.Parameter) \
                and _all_zero(module.gain):  # NF-Net's scaled weight-standardised conv
            nn.init.ones_(module.gain)
            report.reinitialised.append(f'{path}.gain (zero-init gain -> 1)')
        elif isinstance(module, (LayerScale, LayerScale2d)) and _tiny(module.gamma):
            nn.init.ones_(module.gamma)
            report.reinitialised.append(f'{path}.gamma (layer scale -> 1)')
        else:  # the families' own layer scales: Scale / LayerScale2d modules, gamma_1-style parameters
            scale_module = 'scale' in type(module).__name__.lower()
            for param_name, param in module.named_parameters(recurse=False):
                if (param_name.startswith('gamma') or (scale_module and param_name in ('scale', 'weight'))) \
                        and _tiny(param):
                    nn.init.ones_(param)
                    report.reinitialised.append(f'{path}.{param_name} (layer scale -> 1)')
    for param_name in ('gamma', 'skipinit_gain', 'layer_scale'):  # layer_scale: torchvision's ConvNeXt
        param = getattr(block, param_name, None)
        if isinstance(param, nn.Parameter) and _tiny(param):
            nn.init.ones_(param)
            report.reinitialised.append(f'{name}.{param_name} (-> 1)')


def _all_zero(t: torch.Tensor) -> bool:
    return t.device.type != 'meta' and not bool(t.detach().any())


def _tiny(t: torch.Tensor) -> bool:
    return t.device.type != 'meta' and bool((t.detach().abs() < 1e-3).all())


def make_plain(model: nn.Module, *, keep_projection_shortcuts: bool = False, strict: bool = True) -> nn.Module:
    """Turn ``model`` (a timm model instance) into its shortcut-free twin, in place, and return it.

    Args:
        model: any timm model (or a module built from timm blocks, e.g. a ``features_only`` net).
        keep_projection_shortcuts: keep the stride/width-changing projection shortcuts (the paper's plain-CNN
            variant, which keeps 3 of ResNet-50's 16); by default every shortcut goes.
        strict: raise :class:`UnsupportedBlockError` if a block still adds a shortcut after the rules ran
            (a residual block class no rule knows). With ``strict=False`` such blocks are left as they are and
            listed in ``model.plain_report``.

    Returns:
        The same object, now plain, with ``model.plain_report`` (:class:`PlainReport`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'make_plain takes a model instance, got {type(model).__name__}; for an architecture name use '
                        "timm.create_model('plain_<arch>').")
    model_name = type(model).__name__
    if isinstance(getattr(model, 'plain_report', None), PlainReport):  # a family whose blocks keep their class
        raise ValueError(f'{model_name} is already plain (it has a plain_report: a twin, or a model make_plain or '
                         'make_fading already ran on); make_plain runs once per model.')
    report = PlainReport(keep_projection_shortcuts=keep_projection_shortcuts)
    refused = []
    # blocks whose parent hands them a projection it keeps: their addition of it stays, counted as called with it
    handed = handed_projections(model) if keep_projection_shortcuts else {}
    for name, module in list(model.named_modules()):
        rule = get_rule(module)
        if rule is None:
            continue
        count = handed_additions if name in handed else shortcut_additions
        if type(module) is not rule.block_class:
            raise ValueError(
                f'{model_name} is already plain (block {name} is a {type(module).__name__}); '
                'make_plain runs once per model.')
        if rule.replaces and token_mixers(module):  # e.g. MetaFormerBlock with attention (CAFormer)
            refused.append((name, module))
            continue
        before = {n for n, _ in module.named_children()}
        additions_before = count(module) or 0
        if rule.replaces:
            if not name:
                raise ValueError(f'{model_name} is itself a {rule.name} block; make_plain needs the model around it.')
            module, kept = rule.apply(module, keep_projection_shortcuts)
            parent_name, _, child_name = name.rpartition('.')
            setattr(model.get_submodule(parent_name), child_name, module)
        else:
            kept = rule.apply(module, keep_projection_shortcuts)
        report.shortcuts_removed += additions_before - (count(module) or 0)
        after = {n for n, c in module.named_children() if c is not None}
        report.removed_modules.extend(f'{name}.{n}' for n in sorted(before - after))
        if kept:
            report.kept_projections.append(name)
        report.blocks_by_rule[rule.name] += 1
        report.rule_descriptions[rule.name] = rule.description
        make_trainable(name, module, report)
    unhandled = refused + find_unhandled_residual_blocks(model)
    classes = sorted({f'{type(m).__module__}.{type(m).__qualname__}' for _, m in unhandled})
    if not report.blocks_by_rule and not unhandled:
        raise NotResidualError(
            f'{model_name} has no shortcut addition anywhere, so it has no shortcut-free twin (it is plain '
            f'already). Pass a residual model (e.g. resnet50, regnety_016, efficientnet_b0, convnext_tiny); '
            f'`jointrd derive --list` shows every supported architecture.')
    if unhandled and (strict or not report.blocks_by_rule):
        mixers = token_mixers(model)
        why = (refused_by_design(model_name, mixers) if mixers else
               ' If it is your own block class and its forward adds the shortcut in plain code, register it: '
               'jointrd_timm.register_graph_rule(TheClass), then check it with jointrd_timm.check_graph_rule(model, '
               'example_input) (docs/design.md, "Your own blocks")' + (
                   ', or call make_plain(..., strict=False) to leave those blocks residual.' if strict else
                   '. strict=False leaves such blocks residual only beside blocks a rule makes plain, and no block '
                   'here has a rule: the result would be the model unchanged.'))
        raise UnsupportedBlockError(
            f'{model_name}: {len(unhandled)} block(s) add a shortcut and no rule handles their class: '
            f'{", ".join(classes)} (first at `{unhandled[0][0]}`).' + why)
    report.unhandled = [n for n, _ in unhandled]
    model.plain_report = report
    if not unhandled:
        label_as_twin(model, keep_projection_shortcuts=keep_projection_shortcuts)
    return model


def refused_by_design(subject: str, mixers) -> str:
    """The sentence that says why a network whose blocks mix tokens (``mixers``, :func:`token_mixers`) has no twin."""
    return (f' Transformer (and MLP-Mixer) blocks are refused by design: {subject} mixes tokens with '
            f'{", ".join(mixers)}; the shortcuts of such a network carry the token stream, and without them it does '
            'not train.')


def label_as_twin(model: nn.Module, **twin_args) -> None:
    """Make a model that a rule turned into its twin in place say so: timm's ``pretrained_cfg`` (what
    ``save_for_hf`` writes into config.json, and what a reload builds) names ``plain_<arch>`` instead of the teacher
    architecture, and ``pretrained_model_args`` and timm's ``_model_args`` hold ``twin_args``
    (``keep_projection_shortcuts``, a fading twin's ``shortcut_fade``). Nothing changes when the architecture has no
    registered twin (``save_trained_model`` then refuses the model) or already names one."""
    import timm
    cfg = getattr(model, 'pretrained_cfg', None)
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or arch.startswith(TWIN_PREFIX) or not timm.is_model(TWIN_PREFIX + arch):
        return
    relabelled = dict(cfg, architecture=TWIN_PREFIX + arch)
    if getattr(model, 'default_cfg', None) is cfg:  # timm's alias of the same dict
        model.default_cfg = relabelled
    model.pretrained_cfg = relabelled
    for attr in ('pretrained_model_args', '_model_args'):  # ours (save_trained_model), timm's (save_for_hf)
        setattr(model, attr, {**(getattr(model, attr, None) or {}), **twin_args})
