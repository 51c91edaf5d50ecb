"""``plain_<arch>``: the shortcut-free twin of every residual timm architecture, as a timm model.

Registration is cheap: one small entrypoint per teacher architecture and a pretrained cfg copied from the
teacher's (input size, mean/std, classifier...) without its weight source; no model is built at import. The twin
is derived when created: ``timm.create_model('plain_resnet50')`` builds ``resnet50`` (no weights) and runs
:func:`jointrd_timm.make_plain` on it. Everything else (num_classes, drop_rate, in_chans, pretrained cfgs and
tags, ``features_only``, ``pretrained_cfg_overlay=dict(file=...)``) goes through timm's own builder.

Extra kwargs of every ``plain_*`` model:
    keep_projection_shortcuts (bool, default False): the paper's plain-CNN variant.
    dirac (bool, default False): Dirac-parametrised convs (see :mod:`jointrd_timm.twins.dirac`).
    dirac_init ((alpha, beta), default (1.0, 0.1)): their initial identity and weight scales (with ``dirac``):
        DiracNets' (1, 0.1) starts every conv close to an identity map; (0, 1) starts it as its plain weight (from
        a teacher: the teacher's conv exactly, at the plain conv's learning rate) with a learnable identity scale.
    shortcut_fade (bool, default False): a *fading* twin for training: the residual net with every shortcut the
        twin drops scaled by ``s`` (1 at creation), removed by ``finish_fade`` once ``s`` reached 0 (see
        :mod:`jointrd_timm.twins.fade`).

Pretrained tags: the published twins of ``registry/`` first, then every pretrained tag of the teacher
(``plain_resnet50.a1_in1k``): those load the teacher's weights through timm's own machinery (hf-hub, url, a
``pretrained_cfg_overlay=dict(file=...)``) and :func:`~jointrd_timm.twins.transfer.pretrained_teacher_filter`
(strict but for the removed shortcut branches); with ``shortcut_fade=True`` the twin starts as the pretrained
teacher itself (s = 1), the recipe's start point.
"""
import json
import re
from copy import deepcopy
from difflib import get_close_matches
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import timm
import torch
from timm.models import (
    PretrainedCfg, build_model_with_cfg, generate_default_cfgs, get_arch_pretrained_cfgs,
    register_model, resolve_pretrained_cfg)

from ..twins import make_plain
from ..twins.derive import TWIN_PREFIX
from .catalogue import tag_cfgs, weightless_cfg
from ..twins.dirac import DIRAC_INIT, apply_dirac
from ..twins.fade import make_fading
from ..twins.transfer import pretrained_teacher_filter

__all__ = ['TWIN_MODULES', 'create_twin', 'teacher_of', 'twin_name', 'twin_refusal', 'underivable_reason',
           'name_problem', 'residual_arch']

PREFIX = TWIN_PREFIX  # plain_<teacher architecture>
# timm modules whose architectures are built from blocks that a rule in jointrd_timm.twins.families knows
TWIN_MODULES = (
    'resnet', 'cifar_resnet', 'resnetv2', 'regnet', 'efficientnet', 'mobilenetv3', 'hardcorenas', 'convnext',
    'byobnet', 'byoanet', 'cspnet', 'res2net', 'resnest', 'sknet', 'nfnet', 'dla', 'senet', 'hrnet',
    # families made plain by graph rules (jointrd_timm/twins/families/graph.py)
    'convmixer', 'cpubone', 'cspnext', 'dpn', 'fasternet', 'fastvit', 'ghostnet', 'hgnet', 'inception_next',
    'inception_resnet_v2', 'lcnetv2', 'lowformer', 'mambaout', 'metaformer', 'nasnet', 'pnasnet', 'repghost', 'repvit', 'rexnet',
    'starnet', 'tresnet', 'vovnet', 'xception', 'xception_aligned',
)
# architectures of those modules whose twin does not derive, with the reason (kept by the coverage benchmark)
_EXCLUDED: Dict[str, str] = json.loads((Path(__file__).parent / 'underivable.json').read_text())


def underivable_reason(arch: str) -> Optional[str]:
    """Why ``arch`` has no registered ``plain_<arch>`` (underivable.json), or None when it has one."""
    return _EXCLUDED.get(arch)


def twin_name(teacher: str) -> str:
    return PREFIX + teacher


def residual_arch(name: str) -> str:
    """The residual architecture a model name names: ``arch``, ``plain_<arch>``, either with a ``.tag``."""
    base = name.split('.')[0]
    return base[len(PREFIX):] if base.startswith(PREFIX) else base


def name_problem(name: str, need_twin: bool = False) -> Optional[str]:
    """What is wrong with the model name ``name`` (``arch``, ``plain_<arch>``, either with a ``.tag``), in a sentence
    for the user, or None: not a timm architecture (with close names), or a twin asked for (a ``plain_`` name, or
    ``need_twin``) that does not exist (:func:`twin_refusal`)."""
    base, residual = name.split('.')[0], residual_arch(name)
    if not timm.is_model(residual):
        close = timm.list_models(f'*{residual}*')[:5] or get_close_matches(residual, timm.list_models(), n=5)
        if residual != base:
            close = [twin_name(c) for c in close]
        why = (f'a twin is named {PREFIX}<timm model>, and {residual!r} is not a timm model' if residual != base
               else 'not a timm model') + (f'; did you mean one of {close}?' if close else '')
        return f'Unknown model {name!r}: {why} (`jointrd derive --list` lists the models with a twin).'
    return twin_refusal(residual) if need_twin or residual != base else None


def twin_refusal(arch: str) -> Optional[str]:
    """None when the timm architecture ``arch`` has a registered twin, or the torchvision model it names
    (``torchvision:<name>``) a derivable one; else why not, in a sentence for the user (a transformer, no shortcut, a
    block no rule knows, a family not derived). Builds ``arch`` (random weights) only when no recorded reason says it
    already."""
    from ..twins.derive import NotResidualError, UnsupportedBlockError, token_mixers
    from .torchvision_models import create_torchvision_model, torchvision_name
    listed = ' `jointrd derive --list` lists the architectures that have one.'
    torchvision = torchvision_name(arch) is not None
    if torchvision:
        listed = ''
        try:
            model = create_torchvision_model(arch)
        except ValueError as e:
            return str(e)
    else:
        if timm.is_model(twin_name(arch)):
            return None
        reason = underivable_reason(arch)
        if reason:
            return f'{arch} has no shortcut-free twin: {reason}.' + listed
        model = timm.create_model(arch)
    mixers = token_mixers(model)
    if mixers:
        return (f'{arch} is a transformer (or hybrid): it mixes tokens with {", ".join(mixers)}. Such networks are '
                'refused by design: their shortcuts carry the token stream, and without them they do not train. '
                'Choose a residual CNN teacher.' + listed)
    try:
        twin = make_plain(model)
    except (NotResidualError, UnsupportedBlockError) as e:
        return f'{arch} has no shortcut-free twin: {e}' + ('' if 'derive --list' in str(e) else listed)
    if not twin.plain_report.shortcuts_removed:
        return f'{arch} adds no shortcut (its blocks run with their skip off): it is plain already.' + listed
    if torchvision:
        return None
    module = type(model).__module__
    return (f'{arch} has no registered twin {twin_name(arch)}: its timm module {module} is not one that jointrd_timm '
            'derives yet.' + listed)


def teacher_of(twin: str) -> str:
    if not twin.startswith(PREFIX):
        raise ValueError(f'{twin!r} is not a twin name (twins are named {PREFIX}<teacher architecture>).')
    return twin[len(PREFIX):]


# where timm's feature wrappers hold the model they wrap: FeatureHookNet as `body`, FeatureGetterNet as `model`
_WRAPPED_AT = ('body.', 'model.')


def _copy_weights_into_feature_net(full, features) -> None:
    """timm's feature wrappers rename modules (``stages.0`` -> ``stages_0``) or hold the model under a name of
    their own (``body.``, ``model.``); match by the dotted path."""
    source = {key.replace('_', '.'): value for key, value in full.state_dict().items()}

    def source_key(key: str):
        for candidate in (key, *(key[len(p):] for p in _WRAPPED_AT if key.startswith(p))):
            if candidate.replace('_', '.') in source:
                return candidate.replace('_', '.')
        return None

    mapped = {key: source_key(key) for key in features.state_dict()}
    missing = [key for key, src in mapped.items() if src is None]
    if missing:
        raise RuntimeError(f'Cannot map pretrained twin weights onto the feature extractor: {missing[:5]}')
    features.load_state_dict({key: source[src] for key, src in mapped.items()})


def _feature_cfg(pretrained_cfg: dict) -> dict:
    """A feature extractor's pretrained cfg: the model's, less its classifier fields (as timm's builder does)."""
    return {k: deepcopy(v) for k, v in pretrained_cfg.items() if k not in ('num_classes', 'classifier', 'global_pool')}


def create_twin(teacher: str, variant: str, pretrained: bool = False, **kwargs):
    """Build ``variant`` (a ``plain_*`` name) from its ``teacher`` architecture through timm's builder."""
    keep_projection_shortcuts = kwargs.pop('keep_projection_shortcuts', False)
    dirac = kwargs.pop('dirac', False)
    dirac_init = kwargs.pop('dirac_init', None)
    shortcut_fade = kwargs.pop('shortcut_fade', False)
    for name, value in (('keep_projection_shortcuts', keep_projection_shortcuts), ('dirac', dirac),
                        ('shortcut_fade', shortcut_fade)):
        if not isinstance(value, (bool, np.bool_)):  # a 'yes' or a 0.5 is not read as true
            raise ValueError(f'{variant}: {name} must be true or false, got {value!r}.')
    keep_projection_shortcuts, dirac, shortcut_fade = bool(keep_projection_shortcuts), bool(dirac), bool(shortcut_fade)
    if dirac_init is not None and not (isinstance(dirac_init, (tuple, list)) and len(dirac_init) == 2
                                       and all(isinstance(v, (int, float)) for v in dirac_init)):
        raise ValueError(f'{variant}: dirac_init must be two numbers, (alpha, beta), got {dirac_init!r}.')
    if dirac_init is not None and not dirac:
        raise ValueError(f'{variant}: dirac_init={dirac_init!r} sets the Dirac parametrisation\'s start; give dirac=True.')

    def build_twin(**model_kwargs):
        model = timm.create_model(teacher, pretrained=False, **model_kwargs)
        derive = make_fading if shortcut_fade else make_plain
        derive(model, keep_projection_shortcuts=keep_projection_shortcuts)
        if dirac:
            apply_dirac(model, *(DIRAC_INIT if dirac_init is None else dirac_init))
        return model

    twin_args = dict(keep_projection_shortcuts=keep_projection_shortcuts, dirac=dirac)
    if dirac_init is not None:
        twin_args['dirac_init'] = tuple(dirac_init)
    if shortcut_fade:
        twin_args['shortcut_fade'] = True
    if kwargs.get('features_only', False):
        # the teacher's entrypoint knows its feature wrapper settings, so it builds the wrapper
        pretrained_cfg = kwargs.pop('pretrained_cfg', None)
        overlay = kwargs.pop('pretrained_cfg_overlay', None)
        features = build_twin(**kwargs)
        if pretrained:
            model_kwargs = {k: v for k, v in kwargs.items() if k not in ('features_only', 'out_indices',
                                                                        'feature_cls', 'output_stride')}
            full = create_twin(teacher, variant, True, pretrained_cfg=pretrained_cfg,
                               pretrained_cfg_overlay=overlay, **twin_args, **model_kwargs)
            _copy_weights_into_feature_net(full, features)
            features.pretrained_cfg = _feature_cfg(full.pretrained_cfg)
        else:  # the twin's own cfg (its name, the tag asked for), not the teacher's default that build_twin left
            cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
            features.pretrained_cfg = _feature_cfg(cfg.to_dict())
        return features
    try:
        model = build_model_with_cfg(build_twin, variant, pretrained, pretrained_filter_fn=pretrained_teacher_filter,
                                     **kwargs)
    except Exception as e:
        if pretrained:
            note = _teacher_weights_note(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
            if note:
                e.add_note(note)  # timm's own error stays as it is, with one line naming the teacher file
            if shortcut_fade and _only_shortcut_keys_missing(str(e), teacher, keep_projection_shortcuts):
                e.add_note(f'jointrd_timm: a fading {variant} (shortcut_fade=True) starts as its teacher {teacher} '
                           'and needs the teacher\'s shortcut projections; weights saved from a plain twin have none. '
                           'Load those without shortcut_fade, or give the teacher\'s weights.')
        raise
    model.pretrained_model_args = twin_args
    return model


def _only_shortcut_keys_missing(error: str, teacher: str, keep_projection_shortcuts: bool) -> bool:
    """Whether the keys a load_state_dict error lists as missing are all keys the plain twin does not have (its
    teacher's shortcut projections): the file was saved from a plain twin."""
    if 'Missing key(s)' not in error:
        return False
    listed = error.split('Missing key(s) in state_dict:', 1)[1].split('Unexpected key(s)', 1)[0]
    missing = set(re.findall(r'"([^"]+)"', listed))
    try:
        with torch.device('meta'):
            plain = make_plain(timm.create_model(teacher), keep_projection_shortcuts=keep_projection_shortcuts)
    except Exception:  # noqa: BLE001 - the note is a courtesy; timm's error is what the user gets
        return False
    return bool(missing) and not missing & set(plain.state_dict())


def _teacher_weights_note(variant: str, pretrained_cfg, overlay) -> Optional[str]:
    """One line naming the teacher weights a teacher tag wanted (None for other tags)."""
    try:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay)
    except Exception:  # noqa: BLE001 - the note is a courtesy; timm's error is what the user gets
        return None
    teacher = _TEACHER_TAGS.get(f'{variant}.{cfg.tag}')
    if teacher is None:
        return None
    wanted = ([f'file {cfg.file}'] if cfg.file else []) + \
        ([f'Hub {cfg.hf_hub_id}' + (f' ({cfg.hf_hub_filename})' if cfg.hf_hub_filename else '')]
         if cfg.hf_hub_id else []) + ([f'url {cfg.url}'] if cfg.url else [])
    return (f'jointrd_timm: {variant}.{cfg.tag} loads the weights of its teacher {teacher}, wanted from '
            f'{" or ".join(wanted) or "nowhere (no source)"}.')


def _entrypoint(teacher: str):
    def entrypoint(pretrained: bool = False, **kwargs):
        return create_twin(teacher, twin_name(teacher), pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = twin_name(teacher)
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'Shortcut-free twin of timm `{teacher}` (see jointrd_timm.make_plain).'
    return entrypoint


_TEACHERS = sorted(name for module in TWIN_MODULES for name in timm.list_models(module=module)
                   if name not in _EXCLUDED and not name.startswith(PREFIX))
# twin tag -> the teacher tag whose weights it loads ('plain_resnet50.a1_in1k' -> 'resnet50.a1_in1k')
_TEACHER_TAGS: Dict[str, str] = {}


def _teacher_tag_cfgs(teacher: str, published=()) -> Dict[str, PretrainedCfg]:
    """``plain_<teacher>.<tag>`` for each pretrained tag of the teacher: the teacher's cfg with its weight
    source; :func:`pretrained_teacher_filter` maps the teacher's weights onto the twin when they load. A twin
    published under the same name (``published``: a registry entry, e.g. beside its teacher's) keeps the name."""
    cfgs = {}
    for name, cfg in get_arch_pretrained_cfgs(teacher).items():
        if not cfg.has_weights or not cfg.tag:
            continue
        twin_tag = f'{twin_name(teacher)}.{cfg.tag}'
        if twin_tag in published:
            continue
        cfgs[twin_tag] = cfg  # a copy; register_model sets its architecture and tag to the twin's
        _TEACHER_TAGS[twin_tag] = name
    return cfgs


def _cfgs(teacher: str) -> Dict[str, dict]:
    base = weightless_cfg(teacher)
    # published twins first, then the teacher's tags: timm makes the first tag with weights the default of
    # pretrained=True (a published twin, else the teacher's own default weights) and list_pretrained keeps this order
    published = tag_cfgs(twin_name(teacher), base)
    return {**published, **_teacher_tag_cfgs(teacher, published), twin_name(teacher): base}


default_cfgs = generate_default_cfgs({name: cfg for teacher in _TEACHERS for name, cfg in _cfgs(teacher).items()})
for _teacher in _TEACHERS:
    register_model(_entrypoint(_teacher))
