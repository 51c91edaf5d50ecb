"""Cutting a timm model (or any chain-like model) into stages at its ``feature_info`` taps, for JointRD's tails.

A timm model's ``forward_features`` applies its children in order (ResNet: conv1, bn1, act1, maxpool,
layer1..4; EfficientNet: conv_stem, bn1, blocks.0..6, conv_head, bn2; ConvNeXt: stem, stages.0..3, norm_pre).
The split walks the children in that order, descending into the containers that hold a tap, and cuts after
each tap; a segment without any residual (or plain) block is merged into the next one, so a ResNet gives
stem+layer1, layer2, layer3, layer4. Modules after the last tap that ``forward_features`` applies form the "neck"
(EfficientNet's ``conv_head``); the others are ``forward_head``'s (MobileNetV3's ``conv_head``, after pooling).
A model without timm's interface (a torchvision model, a user's own) is read from one probe forward instead
(:class:`_ChainLayout`): its taps are where the feature maps change size (where that gives fewer than two stages,
where its containers of blocks end), its head what follows them.
The split is checked once numerically against ``model(x)``: a model whose forward is not such a chain is refused.
"""
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import JointRDError
from ..twins.rules import get_rule

__all__ = ['StageSplit', 'StageLayoutError', 'final_preactivation']

_INTERFACE = ('feature_info', 'forward_features', 'forward_head')
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish)


class StageLayoutError(JointRDError, ValueError):
    """Teacher and student cannot be paired stage by stage, or a model cannot be cut into stages."""


def _tap_names(model: nn.Module) -> List[str]:
    info = model.feature_info
    return [i['module'] for i in info] if isinstance(info, list) else list(info.module_name())


def _tap_channels(model: nn.Module) -> List[Tuple[str, int, int]]:
    info = model.feature_info
    items = info if isinstance(info, list) else info.info
    return [(i['module'], i['num_chs'], i['reduction']) for i in items]


def _flatten(module: nn.Module, prefix: str, taps: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        path = f'{prefix}{name}'
        if path in taps or not any(t.startswith(path + '.') for t in taps):
            out.append((path, child))
        elif isinstance(child, nn.Sequential):
            out.extend(_flatten(child, path + '.', taps))
        else:
            raise StageLayoutError(
                f'{type(module).__name__}: feature tap inside `{path}` ({type(child).__name__}), which is not a '
                'sequential container, so the model cannot be cut there into stages for JointRD.')
    return out


def _has_block(modules: Sequence[nn.Module]) -> bool:
    return any(get_rule(m) is not None for top in modules for m in top.modules())


# modules that end a model's feature maps and start its head: global pooling, flattening, the classifier (a dropout
# is no sign: torchvision's classifiers start with one on vectors, and a model may drop feature maps between stages)
_HEAD_TYPES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)
_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _block_chain(module: nn.Module, prefix: str = '') -> List[Tuple[str, nn.Module]]:
    """``module``'s children in order, descending into the containers that hold residual blocks without being one (a
    ResNet's ``layer1``, MobileNetV2's ``features``, RegNet's ``trunk_output`` and its stages, a ``ModuleList`` of
    stages that the forward loops over)."""
    out = []
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and get_rule(child) is None and _has_block([child]):
            out.extend(_block_chain(child, path + '.'))
        else:
            out.append((path, child))
    return out


class _ChainHead:
    """The head of a model whose forward runs its children in order: the modules after its feature maps, and the
    flattening its forward does in code before a module that takes vectors: a flatten of 1x1 maps, else a global
    average (MobileNetV2's and MNASNet's forwards average in code). A plain object, not a module: the modules are
    the model's own, registered by the :class:`StageSplit` that holds this."""

    def __init__(self, modules: Sequence[nn.Module], input_ranks: Sequence[int]):
        self.modules, self.input_ranks = list(modules), list(input_ranks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for module, rank in zip(self.modules, self.input_ranks):
            if x.dim() > rank == 2:
                x = x.flatten(1) if x.shape[2:].numel() == 1 else x.mean(tuple(range(2, x.dim())))
            x = module(x)
        return x.flatten(1) if x.dim() > 2 else x


class _ChainLayout:
    """Stages of a model without timm's model interface (a torchvision model, a user's own), read from one probe
    forward: its children (see :func:`_block_chain`) must each run at most once, and form the chain in the order
    they ran (children that do not run are left out); the head starts at the first that pools globally, flattens or
    takes vectors; a stage ends where the next child's feature map changes size (the taps timm's ``feature_info``
    lists, at every reduction), or, where that gives fewer than two stages with blocks (maps of one size all
    through, or shrinking only before the first block), where its containers of blocks end
    (:func:`_container_taps`). :class:`StageSplit` then checks the split numerically against ``model(x)``, as for a
    timm model, and in train mode and at a larger input too (:meth:`StageSplit.check`)."""

    def __init__(self, model: nn.Module, probe: Optional[torch.Tensor], lacks: Sequence[str]):
        from ..io import input_channels
        self.name = type(model).__name__
        self.advice = (
            f' {self.name} lacks {", ".join(lacks)} of timm\'s model interface, so JointRD cut it into stages where '
            'the feature maps of its forward shrink (where they keep one size: where its containers of blocks end). '
            'Give your model forward_features(x) (the body), '
            'forward_head(x, pre_logits=False) (pooling and classifier) and feature_info, a list with one '
            "dict(module='stage name', num_chs=channels, reduction=stride) per stage output, in order.")
        if isinstance(model, _WRAPPERS) or hasattr(model, '_orig_mod'):
            raise StageLayoutError(f'{self.name} is a wrapper ({type(model).__name__}) around the model: give JointRD '
                                   'the model itself (and wrap the JointRD module, if at all).')
        if probe is None:
            device = next(model.parameters()).device
            probe = torch.randn(2, input_channels(model) or 3, 64, 64, device=device)
        self.probe = probe
        chain = _block_chain(model)
        calls = []

        def record(index, module, args, output):
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in (args[0] if args else None,
                                                                                       output)]
            calls.append((index, *shapes))

        hooks = [m.register_forward_hook(partial(record, i)) for i, (_, m) in enumerate(chain)]
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()
                run_on_probe(self.name, lambda: model(probe), probe, self.advice)
        finally:
            model.train(was_training)
            for hook in hooks:
                hook.remove()
        order = [i for i, _, _ in calls]
        if len(order) != len(set(order)):
            raise StageLayoutError(
                f'{self.name}: its forward runs a child more than once (it ran {[chain[i][0] for i in order]}), so '
                'JointRD cannot run its children as a chain of stages.' + self.advice)
        if any(None in shapes for _, *shapes in calls):
            raise StageLayoutError(f'{self.name}: a child of its forward takes or returns something other than one '
                                   'tensor, so it is not a chain of stages.' + self.advice)
        first = next((k for k, (i, shape_in, shape_out) in enumerate(calls)
                      if isinstance(chain[i][1], _HEAD_TYPES) or len(shape_in) != 4 or len(shape_out) != 4),
                     len(calls))
        if first == 0 or first == len(calls):
            raise StageLayoutError(f'{self.name}: found no feature maps followed by a classifier among its children '
                                   f'{[n for n, _ in chain]}.' + self.advice)
        self.body = [chain[i] for i, _, _ in calls[:first]]
        self.head_modules = [chain[i][1] for i, _, _ in calls[first:]]
        self.head = _ChainHead(self.head_modules, [len(shape_in) for _, shape_in, _ in calls[first:]])
        sizes = [shape_out[2:] for _, _, shape_out in calls[:first]]
        self.tap_info = {name: (shape[1], probe.shape[-1] // max(1, shape[-1]))
                         for (name, _), (_, _, shape) in zip(self.body, calls)}
        self.taps = [name for k, (name, _) in enumerate(self.body) if k + 1 == first or sizes[k + 1] != sizes[k]]
        if len(_cut(self.body, self.taps)[0]) < 2:  # its maps keep their size: cut where its containers end
            self.taps = _container_taps(self.body)


def _cut(chain: Sequence[Tuple[str, nn.Module]],
         taps: Sequence[str]) -> Tuple[List[Tuple[str, List[nn.Module]]], List[nn.Module]]:
    """``chain`` cut after each of ``taps`` where the modules since the last cut hold a block (a segment without one
    joins the next): (tap, modules) of each stage, and the modules after the last cut."""
    stages, current = [], []
    for name, module in chain:
        current.append(module)
        if name in taps and _has_block(current):
            stages.append((name, current))
            current = []
    return stages, current


# DECISION: a split read from containers of blocks (maps of one size) has at most this many stages, the stage count
# of the ResNets JointRD was designed on: each stage adds a teacher tail to every step, and the recipes' weights
# were measured on three and four stages. More containers (or blocks) are grouped into this many runs, in order.
MAX_CONTAINER_STAGES = 4


def _container_taps(chain: Sequence[Tuple[str, nn.Module]]) -> List[str]:
    """Taps for a chain whose size changes give fewer than two stages with blocks (maps of one size all through, or
    shrinking only before the first block): the last child of each container that holds blocks, at the outermost
    level of the module tree where there are two such containers (a user's ``stage1``, ``stage2``; the stages of a
    ``ModuleList``), else after every block; more than :data:`MAX_CONTAINER_STAGES` are grouped evenly into that
    many. The last child always ends a stage."""
    names = [name for name, _ in chain]
    depth = max(len(name.split('.')) for name in names)
    ends: List[int] = []
    for level in range(1, depth + 1):
        groups: List[Tuple[str, List[int]]] = []
        for index, name in enumerate(names):
            key = '.'.join(name.split('.')[:level])
            if groups and groups[-1][0] == key:
                groups[-1][1].append(index)
            else:
                groups.append((key, [index]))
        ends = [members[-1] for _, members in groups if _has_block([chain[i][1] for i in members])]
        if len(ends) >= 2:
            break
    if len(ends) > MAX_CONTAINER_STAGES:
        ends = [ends[(k + 1) * len(ends) // MAX_CONTAINER_STAGES - 1] for k in range(MAX_CONTAINER_STAGES)]
    return sorted({names[i] for i in ends} | {names[-1]}, key=names.index)


def run_on_probe(name: str, forward: Callable[[], torch.Tensor], probe: torch.Tensor, advice: str,
                 split: bool = False) -> torch.Tensor:
    """``forward()``, its failure on the probe input turned into a StageLayoutError that names the input: the
    model's own forward, or (``split``) its stages and head run in order."""
    try:
        return forward()
    except (RuntimeError, ValueError, TypeError) as e:
        what = ('running its stages and then its head in order fails' + (
            ' (before a module that takes vectors the head averages a feature map larger than 1x1: a head that '
            'flattens a whole map is not read)' if advice else '') if split else 'its forward fails')
        fix = '' if split else ' give JointRD a probe of the size the model takes (probe=a batch of your data).'
        raise StageLayoutError(f'{name}: {what} on the probe input of shape {tuple(probe.shape)} '
                               f'({type(e).__name__}: {e});{fix}' + advice) from e


class StageSplit(nn.Module):
    """Stages of ``model`` as module lists, plus its head. ``stages[k]`` maps stage k-1's output to stage k's.

    Holds references to the model's own submodules (no copies): running ``stages[k:]`` and then ``head`` on a
    stage output is the model's "tail" from stage k on.
    """

    def __init__(self, model: nn.Module, probe: Optional[torch.Tensor] = None):
        super().__init__()
        self.model_name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
        from timm.models import (EfficientNetFeatures, FeatureDictNet, FeatureGraphNet, FeatureHookNet,
                                 MobileNetV3Features)  # timm's public feature extractors (FeatureListNet: a Dict one)
        if isinstance(model, (FeatureDictNet, FeatureGraphNet, FeatureHookNet, EfficientNetFeatures,
                              MobileNetV3Features)):
            raise StageLayoutError(
                f'{self.model_name} is a timm feature extractor (features_only=True): it has no classifier, and '
                'JointRD trains on class logits through the teacher\'s later stages and head. Create teacher and twin '
                'without features_only (timm.create_model(name, num_classes=...)).')
        lacks = [name for name in _INTERFACE if not hasattr(model, name)]
        if lacks:  # a torchvision model, or a user's own: cut where its forward's feature maps shrink
            layout = _ChainLayout(model, probe, lacks)
            chain, taps, tap_info = layout.body, layout.taps, layout.tap_info
            self._forward_head, neck, head = layout.head, [], layout.head_modules
            probe, self._advice = layout.probe, layout.advice
        else:
            self._advice = ''
            taps = _tap_names(model)
            chain = _flatten(model, '', taps)
            tap_info = {name: (chs, red) for name, chs, red in _tap_channels(model)}
        names = [n for n, _ in chain]
        missing = [t for t in taps if t not in names]
        if missing:
            raise StageLayoutError(f'{self.model_name}: feature taps {missing} are not in its module chain.')
        last_tap = max(names.index(t) for t in taps)
        cuts, rest = _cut(chain[:last_tap + 1], taps)
        segments = [nn.Sequential(*modules) for _, modules in cuts]
        boundaries = [name for name, _ in cuts]
        if rest and segments:  # the last tap ends in modules without a block (e.g. a final 1x1 conv): merge them
            segments[-1] = nn.Sequential(*segments[-1], *rest)
            boundaries[-1] = names[last_tap]
        self.stages = nn.ModuleList(segments)
        self.boundaries = boundaries
        self.stage_channels = [tap_info[b][0] for b in boundaries]
        self.stage_reductions = [tap_info[b][1] for b in boundaries]
        if not lacks:
            after = [m for _, m in chain[last_tap + 1:]]
            in_features = _run_by_forward_features(model, after, probe)
            neck = [m for m in after if in_features(m)]
            self._forward_head, head = model.forward_head, [m for m in after if not in_features(m)]
        self.neck = nn.Sequential(*neck)
        self.head_modules = nn.ModuleList(head)
        if len(self.stages) < 2:
            raise StageLayoutError(f'{self.model_name} has {len(self.stages)} stage(s) with residual blocks; '
                                   'JointRD needs at least 2.' + self._advice)
        self.num_logits = None  # set by check
        if probe is not None:
            self.check(model, probe)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def features(self, x: torch.Tensor,
                 carry: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> List[torch.Tensor]:
        """Outputs h_1..h_n of every stage. ``carry(j, h_j)``, if given, is what enters stage j+1 instead of h_j
        (1-based j < n; e.g. a gradient scaling); the returned outputs are the h_j themselves."""
        outs = []
        for j, stage in enumerate(self.stages):
            if outs and carry is not None:
                x = carry(j, outs[-1])
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, h: torch.Tensor, after: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the model from the output of stage ``after`` (1-based; 0: ``h`` is the input image) through its
        later stages and head. Returns (logits, final feature map fed to the head)."""
        for stage in self.stages[after:]:
            h = stage(h)
        neck = self.neck(h)
        return self._forward_head(neck), neck

    @torch.no_grad()
    def check(self, model: nn.Module, probe: torch.Tensor, grown: bool = False) -> None:
        """The stages and head, run in order, compute ``model(probe)`` (eval mode). For a split read from the forward
        (no timm interface) also in train mode with the same random draws (a dropout the forward does in code
        would be lost), and at twice the probe's size when the last feature map is 1x1 (its head's pooling in code
        cannot be told there). Sets ``num_logits``, the width of the logits."""
        was_training = model.training
        model.eval()
        try:
            expected = self._model_on_grown_probe(model, probe) if grown else model(probe)
            outputs = run_on_probe(self.model_name, lambda: self.features(probe), probe, self._advice, split=True)
            got = run_on_probe(self.model_name, lambda: self(outputs[-1], self.num_stages)[0], probe, self._advice,
                               split=True)
        finally:
            model.train(was_training)
        self._compare(expected, got, '')
        self.num_logits = expected.shape[-1]
        if not self._advice:
            return
        from .base import call_on_buffer_copies
        model.train()
        try:
            with torch.random.fork_rng(devices=[probe.device] if probe.is_cuda else []):
                torch.manual_seed(0)
                expected = call_on_buffer_copies(model, (probe,))
                torch.manual_seed(0)
                got = call_on_buffer_copies(self, (probe,))[0]
        finally:
            model.train(was_training)
        self._compare(expected, got, ' in train mode (a dropout or another random step its forward does in code, '
                                     'which the stages do not hold?)')
        if not grown and outputs[-1].shape[2:].numel() == 1:
            shape = (*probe.shape[:2], *(2 * size for size in probe.shape[2:]))
            self.check(model, torch.randn(shape, device=probe.device, dtype=probe.dtype), grown=True)

    def _model_on_grown_probe(self, model: nn.Module, probe: torch.Tensor) -> torch.Tensor:
        try:
            return model(probe)
        except (RuntimeError, ValueError, TypeError) as e:
            raise StageLayoutError(
                f'{self.model_name}: its last feature map is 1x1 at the probe\'s size, where the pooling its head does '
                f'in code cannot be told from a flatten or another pooling, and its forward fails at twice that size, '
                f'{tuple(probe.shape)} ({type(e).__name__}: {e}). Give JointRD a probe at which the last map is '
                'larger than 1x1.' + self._advice) from e

    def _compare(self, expected: torch.Tensor, got: torch.Tensor, where: str) -> None:
        if expected.shape != got.shape or not torch.allclose(expected, got, atol=1e-4, rtol=1e-3):
            raise StageLayoutError(
                f'{self.model_name}: running its stages in order does not reproduce model(x){where}, so its forward '
                'is not a chain of its children and JointRD cannot route student features through it.' + self._advice)


def _run_by_forward_features(model: nn.Module, modules: Sequence[nn.Module],
                             probe: Optional[torch.Tensor]) -> Callable[[nn.Module], bool]:
    """Which of ``modules`` (the children after the last tap) ``forward_features`` applies: those form the neck,
    the others belong to ``forward_head``. Observed with forward hooks on one probe forward, because a child's
    name does not tell (MobileNetV3's and GhostNet's ``conv_head`` run in ``forward_head``, after the pooling;
    EfficientNet's in ``forward_features``). Without a probe, the head's usual names decide."""
    if probe is None or not modules:
        return lambda m: not _is_head(model, m)
    ran = set()
    hooks = [m.register_forward_hook(lambda m, i, o: ran.add(id(m))) for m in modules]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()
            model.forward_features(probe)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return lambda m: id(m) in ran


def _is_head(model: nn.Module, module: nn.Module) -> bool:
    """Children that forward_head uses (pooling, classifier, head containers)."""
    head_names = ('global_pool', 'fc', 'classifier', 'head', 'head_drop', 'pre_logits')
    return any(getattr(model, n, None) is module for n in head_names)


def final_preactivation(model: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.BatchNorm2d]]:
    """The activation module that ends the model's last residual/plain block and that block's last BN.

    Its input is the pre-activation final feature of Heo et al. (None, None) when the family has no such
    activation (e.g. ConvNeXt, EfficientNet's fused BN-act): the feature loss then falls back to MSE."""
    last_block = None
    for module in model.modules():
        if get_rule(module) is not None:
            last_block = module
    if last_block is None:
        return None, None
    acts = [c for c in last_block.children() if isinstance(c, _ACTIVATIONS)]
    bns = [m for m in last_block.modules() if type(m) is nn.BatchNorm2d]
    if not acts or not bns:
        return None, None
    return acts[-1], bns[-1]
