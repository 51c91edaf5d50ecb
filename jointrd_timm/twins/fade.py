"""Shortcut fading: train the twin as its teacher's residual net whose shortcuts fade out, then remove them.

Monti, Tootoonian & Cao, "Avoiding Degradation in Deep Feed-Forward Networks by Phasing Out Skip-Connections"
(ICANN 2018): a residual net whose skip connections are phased out during training ends as a plain net that
trains as well as the residual one. Here every shortcut addition that :func:`make_plain` removes becomes

    y = branch + s * shortcut          (one fused op, torch.addcmul)

with one scale ``s`` shared by all blocks (a non-persistent buffer, so the state dict is the teacher's). ``s = 1``
is the residual network exactly (a teacher's weights load strictly and give its outputs bit for bit); ``s = 0`` is
the shortcut-free twin exactly. Training lowers ``s`` from 1 to 0 (the schedule lives with eta's: :mod:`jointrd_timm.methods.fading`); then
:func:`finish_fade` deletes the scaled shortcuts and the projection modules that fed only them, and the model is
the twin: the same parameter names as ``timm.create_model('plain_<arch>')``, whose weights it loads strictly.

Built on the same torch.fx analysis as the graph rules (:mod:`jointrd_timm.twins.graph_rule`): each rule-known
block's own forward is traced and its shortcut additions rewritten, so every family whose blocks trace works,
whatever kind of rule makes its twin.

``timm.create_model('plain_<arch>', shortcut_fade=True)`` builds a fading twin; ``JointRDConfig.shortcut_fade``
(or ``methods.FadingStudent`` for the twin trained alone) drives ``s``; the runner and ``save_trained_model``
deploy :func:`deployable` (fade finished, Dirac folded). This module is model surgery only: it sets and reads
``s``, never decides it.
"""
import copy
import inspect
import numbers
import operator
from functools import lru_cache, wraps
from typing import Optional, Sequence, Type, Union

import torch
import torch.fx as fx
from torch import nn

from .derive import (NotResidualError, PlainReport, UnsupportedBlockError, label_as_twin, make_trainable,
                     refused_by_design, token_mixers)
from .dirac import fold_dirac, has_dirac
from .graph_rule import TwinGraphBlock, is_projection, graph_block, plain_class
from .leak import restore_relus
from .rules import dropped_scales, get_rule, handed_projections, record_model_args, rules
from .verify import _ShallowTracer, find_shortcut_additions, find_unhandled_residual_blocks, trace_block

__all__ = ['FadingGraphBlock', 'make_fading', 'finish_fade', 'is_fading', 'set_shortcut_scale', 'shortcut_scale',
           'fading_block_count', 'shortcut_scales', 'deployable', 'ShareGain', 'pin_shortcut_share', 'FADE_MODES']

FADE_MODES = ('scale', 'share')

SCALE = 'jointrd_shortcut_scale'


class FadingGraphBlock(TwinGraphBlock):
    """Base class of blocks whose shortcuts are scaled by the buffer ``jointrd_shortcut_scale``."""
    jointrd_plain_rule = None

    def _class_factory(self):
        return _fading_class


@lru_cache(maxsize=None)
def _fading_class(block_class: Type[nn.Module]) -> type:
    return type(f'FadingGraph{block_class.__name__}', (FadingGraphBlock,),
                dict(jointrd_plain_rule=rules().get(block_class), jointrd_block_class=block_class))


def _graph_function(function):
    """``function`` stays one node of a graph traced again from a block's code (torch.fx's unpickling traces the
    generated code with Proxies as arguments, where a Python branch on an argument would be fixed one way)."""
    @wraps(function)
    def call(*args):
        proxy = next((a for a in args if isinstance(a, fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy('call_function', call, args, {})
        return function(*args)
    return call


@_graph_function
def given_or(given: Optional[torch.Tensor], default: torch.Tensor) -> torch.Tensor:
    """The shortcut a caller handed the block, else the block's own default shortcut."""
    return default if given is None else given


def _module_calls(graph: fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == 'call_module']


def _copy_operand(node: fx.Node, into: fx.Graph, before: fx.Node, inputs: dict) -> fx.Node:
    """Copy ``node`` and what it is computed from (down to the placeholders, mapped by ``inputs``) into
    ``into``, before ``before``."""
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in needed or n in inputs:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    copies = dict(inputs)
    with into.inserting_before(before):
        for n in node.graph.nodes:  # graph order is a topological order
            if n in needed:
                copies[n] = into.node_copy(n, lambda a: copies[a])
    return copies[node]


def _with_given_shortcuts(block: nn.Module, graph: fx.Graph, concrete: dict):
    """The block's trace, extended to shortcuts that a caller may hand it as an optional argument.

    :func:`trace_block` specialises every argument that defaults to None to None. Some blocks take their
    shortcut that way (DLA: ``tree1(x, shortcut)`` passes the tree's projection, ``tree2(x1)`` none, and the block
    falls back to its input). Traced with that argument given, such a block adds the argument itself; the merged
    graph adds ``given_or(argument, default)`` instead, where ``default`` is what the None trace adds, so one graph
    serves both calls. Only merged when both traces call the same modules in the same order (the argument changes
    the shortcut, nothing else) and the argument is added as it is; otherwise the None trace is kept."""
    names = [p for p in inspect.signature(block.forward).parameters]
    for name in [n for n in names if n in concrete]:
        given_concrete = {k: v for k, v in concrete.items() if k != name}
        try:
            given = _ShallowTracer().trace(block, concrete_args=given_concrete)
        except Exception:  # the argument is not traceable as a tensor (e.g. a list): nothing to merge
            continue
        given_inputs = [n for n in given.nodes if n.op == 'placeholder']
        argument = given_inputs[names.index(name)]
        found = find_shortcut_additions(given, given_concrete, root=block)
        found_before = find_shortcut_additions(graph, concrete, root=block)
        if not any(shortcut is argument for _, shortcut, _ in found) or len(found) != len(found_before) \
                or _module_calls(given) != _module_calls(graph):
            continue
        inputs = dict(zip([n for n in graph.nodes if n.op == 'placeholder'], given_inputs))
        for (add, shortcut, _), (_, default, _) in zip(found, found_before):
            if shortcut is argument:
                default = _copy_operand(default, given, add, inputs)
                with given.inserting_before(add):
                    chosen = given.call_function(given_or, (argument, default))
                add.replace_input_with(argument, chosen)
        graph, concrete = given, given_concrete
    return graph, concrete


@_graph_function
def faded_scale(tensor: torch.Tensor, value: float, scale: torch.Tensor) -> torch.Tensor:
    """``tensor`` times a number that the plain twin drops (:func:`~jointrd_timm.twins.rules.drop_scales`), faded
    with the shortcuts: ``value`` at s = 1 (the teacher, bit for bit), 1 at s = 0 (the plain twin)."""
    return tensor * (value * scale + (1 - scale))


def _trace_with_dropped_scales(block: nn.Module):
    """The block's trace, with each ``tensor * self.<name>`` of its dropped scales as a ``get_attr`` node (a number
    attribute is otherwise baked into the graph as a constant): returns ``(graph, concrete, {node: value})``."""
    names = dropped_scales(block)
    values = {name: getattr(block, name) for name in names}
    for name, value in values.items():
        if not isinstance(value, (int, float)):
            raise UnsupportedBlockError(f'{type(block).__qualname__}.{name} is {value!r}, not a number: its fading '
                                        'twin cannot move it to 1 with the shortcuts.')
        delattr(block, name)
        block.register_buffer(name, torch.tensor(float(value)), persistent=False)
    try:
        traced = trace_block(block)
    finally:
        for name, value in values.items():
            del block._buffers[name]
            setattr(block, name, value)
    if traced is None:
        return None
    graph, concrete = traced
    nodes = {n: float(values[n.target]) for n in graph.nodes if n.op == 'get_attr' and n.target in values}
    return graph, concrete, nodes


def _fade_dropped_scales(block: nn.Module, graph: fx.Graph, nodes: dict, scale: fx.Node) -> None:
    """Rewrite ``tensor * <dropped scale>`` to ``faded_scale(tensor, value, s)``; a scale used any other way is
    refused (the fading twin could not be both the teacher and the plain twin)."""
    for node, value in nodes.items():
        for user in list(node.users):
            others = [a for a in user.args if a is not node]
            if user.op != 'call_function' or user.target not in (operator.mul, torch.mul) or len(user.args) != 2 \
                    or len(others) != 1 or user.kwargs:
                raise UnsupportedBlockError(
                    f'{type(block).__qualname__} uses {node.target} other than as a factor ({user.format_node()}): '
                    'its fading twin cannot move it to 1 with the shortcuts; train its twin without shortcut_fade.')
            with graph.inserting_before(user):
                faded = graph.call_function(faded_scale, (others[0], value, scale))
            user.replace_all_uses_with(faded)
            graph.erase_node(user)
        graph.erase_node(node)


def _is_given(node: fx.Node) -> bool:
    return node.op == 'call_function' and node.target is given_or


def _fading_block(block: nn.Module, keep_projection: bool, keep_given: bool = False):
    """``block`` with each shortcut addition ``a + shortcut`` rewritten to ``a + s * shortcut``; returns the
    fading block, the number of shortcuts scaled and whether a projection shortcut was left as it is.
    ``keep_given``: the caller hands this block a kept projection as its shortcut argument, so the additions of
    that argument stay whole (the plain twin adds it too)."""
    traced = _trace_with_dropped_scales(block)
    if traced is None:
        raise UnsupportedBlockError(
            f'{type(block).__qualname__} cannot be traced by torch.fx, so its shortcuts cannot fade; train its twin '
            'without shortcut_fade.')
    graph, concrete, dropped = traced
    if not dropped:
        graph, concrete = _with_given_shortcuts(block, graph, concrete)
    scale, scaled, kept = None, 0, False
    rewritten = {}  # an addition already rewritten can be an operand of a later one (NASNet's cells)
    for add, shortcut, branch in find_shortcut_additions(graph, concrete, root=block):
        shortcut, branch = rewritten.get(shortcut, shortcut), rewritten.get(branch, branch)
        if (keep_projection and is_projection(shortcut, block)) or (keep_given and _is_given(shortcut)):
            kept = True
            continue
        if scale is None:
            with graph.inserting_after(next(iter(graph.nodes))):
                scale = graph.get_attr(SCALE)
        with graph.inserting_before(add):
            # one fused op, branch + shortcut * s: no tensor for the scaled shortcut, the residual net's cost at
            # s = 1 (where it computes branch + shortcut exactly, as at s = 0 it gives the branch exactly)
            new_add = graph.call_function(torch.addcmul, (branch, shortcut, scale))
        add.replace_all_uses_with(new_add)
        graph.erase_node(add)
        rewritten[add] = new_add
        scaled += 1
    if dropped and scale is not None:
        _fade_dropped_scales(block, graph, dropped, scale)
    block.register_buffer(SCALE, torch.ones((), dtype=torch.float32), persistent=False)
    fading = graph_block(_fading_class(type(block)), block, graph)
    delattr(block, SCALE)
    return fading, scaled, kept


def make_fading(model: nn.Module, *, keep_projection_shortcuts: bool = False) -> nn.Module:
    """Make ``model`` (a residual timm model) a fading twin, in place: every block that a shortcut rule knows gets
    its shortcut additions scaled by ``s`` (start value 1: the model computes exactly what it did).

    The blocks are made trainable as :func:`make_plain` does (stochastic depth removed, zero-initialised last
    norms / layer scales reset), so a fading twin built from scratch ends as a trainable plain net.

    Raises:
        UnsupportedBlockError: a block adds a shortcut no rule knows, a token-mixer block, or an untraceable one.
        NotResidualError: no block adds a shortcut (nothing to fade).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'make_fading takes a model instance, got {type(model).__name__}; for an architecture name '
                        "use timm.create_model('plain_<arch>', shortcut_fade=True).")
    report = PlainReport(keep_projection_shortcuts=keep_projection_shortcuts)
    # blocks whose parent hands them a kept projection as their shortcut argument -> that parent
    handed = handed_projections(model) if keep_projection_shortcuts else {}
    handing = set(handed.values())
    for name, module in list(model.named_modules()):
        rule = get_rule(module)
        if rule is None or not name:
            continue
        if name in handing:
            report.kept_projections.append(name)
        if type(module) is not rule.block_class:
            raise ValueError(f'{type(model).__name__} is already plain or fading (block {name} is a '
                             f'{type(module).__name__}); build the fading twin from the residual model.')
        if token_mixers(module):
            raise UnsupportedBlockError(f'{name} ({type(module).__name__}) mixes tokens with '
                                        f'{", ".join(token_mixers(module))}: transformer blocks are refused by design.')
        fading, scaled, kept = _fading_block(module, keep_projection_shortcuts, keep_given=name in handed)
        kept = kept and name not in handed  # the parent that computes the projection is the one reported
        if scaled:  # blocks without a shortcut to fade (e.g. a strided block with timm's skip off) stay as they are
            parent_name, _, child_name = name.rpartition('.')
            setattr(model.get_submodule(parent_name), child_name, fading)
        else:
            fading = module
        report.shortcuts_removed += scaled
        if kept:
            report.kept_projections.append(name)
        report.blocks_by_rule[rule.name] += 1
        report.rule_descriptions[rule.name] = rule.description
        make_trainable(name, fading, report)
    unhandled = [n for n, m in find_unhandled_residual_blocks(model) if not isinstance(m, FadingGraphBlock)]
    if report.blocks_by_rule and not report.shortcuts_removed and not unhandled:
        # e.g. LCNet, or an EfficientNet whose every block changes width: rule-known blocks, all with the skip off
        raise NotResidualError(
            f'{type(model).__name__} has no shortcut addition to fade (its blocks run with their skip off), so its '
            'twin is the model itself: build plain_<arch> without shortcut_fade.')
    if not report.blocks_by_rule and not unhandled:
        raise NotResidualError(f'{type(model).__name__} has no shortcut addition anywhere, so it has no shortcuts to '
                               'fade (it is plain already). Pass a residual model (e.g. resnet50, regnety_016, '
                               'efficientnet_b0).')
    if unhandled:
        mixers = token_mixers(model)
        why = (refused_by_design('the model', mixers) if mixers else
               ' If it is your own block class, register a rule for it: jointrd_timm.register_graph_rule(TheClass) '
               '(docs/design.md, "Your own blocks").')
        raise UnsupportedBlockError(
            f'{type(model).__name__}: shortcuts can fade only in blocks that a shortcut rule knows; these add a '
            f'shortcut and no rule knows them: {unhandled[:5]}.' + why)
    model.plain_report = report  # load_teacher_weights reads it: nothing removed yet, every teacher key is used
    label_as_twin(model, keep_projection_shortcuts=keep_projection_shortcuts, shortcut_fade=True)
    return model


def is_fading(model: nn.Module) -> bool:
    return any(isinstance(m, FadingGraphBlock) for m in model.modules())


def _fading_blocks(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, FadingGraphBlock)]


def fading_block_count(model: nn.Module) -> int:
    """How many fading blocks ``model`` has (what a per-block scale list must hold)."""
    return len(_fading_blocks(model))


def set_shortcut_scale(model: nn.Module, value: Union[float, Sequence[float]]) -> None:
    """Set ``s`` in the fading blocks of ``model``: one ``value`` for every block, or one per block in forward
    order (a staggered fade, ``methods.schedules.block_scales``)."""
    blocks = _fading_blocks(model)
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no fading shortcuts to scale: build it with '
                         "timm.create_model('plain_<arch>', shortcut_fade=True) or jointrd_timm.make_fading(model).")
    one = isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.dim() == 0)
    values = [float(value)] * len(blocks) if one else [float(v) for v in value]
    if len(values) != len(blocks):
        raise ValueError(f'{len(values)} shortcut scales given for {len(blocks)} fading blocks.')
    bad = [v for v in values if not 0.0 <= v <= 1.0]  # NaN too
    if bad:
        raise ValueError(f'A shortcut scale s weighs the shortcut from 1 (residual) to 0 (removed): got {bad[0]!r}; '
                         'give values in [0, 1].')
    for block, scale in zip(blocks, values):
        getattr(block, SCALE).fill_(scale)


def shortcut_scales(model: nn.Module) -> list:
    """Each fading block's ``s``, in forward order (empty for a model without fading blocks). ``s`` is a
    non-persistent buffer: a copy made from a state dict (a weight average) takes its scales from here."""
    return [float(getattr(b, SCALE)) for b in _fading_blocks(model)]


def shortcut_scale(model: nn.Module) -> Optional[float]:
    """The current ``s``: the mean over the fading blocks (every block's ``s`` when the fade is not staggered);
    None for a model without fading blocks."""
    scales = shortcut_scales(model)
    return sum(scales) / len(scales) if scales else None


def _is_scale(node) -> bool:
    return isinstance(node, fx.Node) and node.op == 'get_attr' and node.target == SCALE


def _is_fade(node: fx.Node) -> bool:
    """``addcmul(branch, shortcut, s)`` as written by :func:`_fading_block` (``s`` the block's scale, or the scale
    times a :class:`ShareGain`'s gain)."""
    if node.op != 'call_function' or node.target is not torch.addcmul or len(node.args) != 3:
        return False
    scale = node.args[2]
    return _is_scale(scale) or (isinstance(scale, fx.Node) and scale.op == 'call_module'
                                and str(scale.target).startswith(_GAIN) and _is_scale(scale.args[2]))


_GAIN = 'jointrd_share_gain'


def rms(t: torch.Tensor) -> torch.Tensor:
    """Root mean square of ``t`` in float32, without gradient (the 'share' fade's and the probes' measure)."""
    return t.detach().float().pow(2).mean().sqrt()


class ShareGain(nn.Module):
    """The 'share' fade of one shortcut: ``s`` times a gain that keeps the shortcut's size relative to the branch
    where the fade puts it, whatever the training does to the sizes of the two.

    With BatchNorm ending the branch, a network can shrink its branches (or grow its block inputs) for free while
    ``s`` falls, so the shortcut keeps carrying the signal until ``s`` is exactly 0, when all of it goes at once.
    Here the shortcut is scaled by ``s * g`` with ``g = r / r0``, ``r = rms(branch) / rms(shortcut)`` measured on the
    batch (no gradient flows through ``g``) and ``r0`` that ratio at the first training step: the shortcut's size
    relative to the branch is ``s`` times its size in the teacher, whatever the two do. At the first step
    ``g = 1`` (the teacher exactly); in eval mode ``g`` is a running average of the training values; at ``s = 0``
    the output is the branch, as in the 'scale' fade.
    """

    def __init__(self, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer('reference', torch.zeros(()))  # r0; 0 until the first training step measures it
        self.register_buffer('gain', torch.ones(()))  # running gain, for eval mode

    def forward(self, branch: torch.Tensor, shortcut: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return scale * self.gain
        with torch.no_grad():
            ratio = rms(branch) / rms(shortcut).clamp_min(1e-12)
            first = self.reference == 0
            self.reference.copy_(torch.where(first, ratio, self.reference))
            gain = ratio / self.reference.clamp_min(1e-12)
            self.gain.copy_(torch.where(first, gain, torch.lerp(self.gain, gain, self.momentum)))
        return scale * gain.to(scale.dtype)


def pin_shortcut_share(model: nn.Module) -> nn.Module:
    """Give every fade of ``model`` (a fading twin) a :class:`ShareGain`, in place: the fade then sets the
    shortcuts' share of each block's output instead of their scale ('share' fade mode). Idempotent; the gains'
    state (``reference``, ``gain``) is in the state dict, so a checkpoint resumes them; :func:`finish_fade` removes
    them with the shortcuts."""
    for block in _fading_blocks(model):
        if any(n.op == 'call_module' and str(n.target).startswith(_GAIN) for n in block.graph.nodes):
            continue
        count = 0
        for node in list(block.graph.nodes):
            if _is_fade(node):
                name = f'{_GAIN}{count}' if count else _GAIN
                block.add_module(name, ShareGain())
                with block.graph.inserting_before(node):
                    gain = block.graph.call_module(name, tuple(node.args))
                node.args = (node.args[0], node.args[1], gain)
                count += 1
        block.recompile()
    return model


def finish_fade(model: nn.Module, force: bool = False) -> nn.Module:
    """Remove the faded shortcuts, in place: each fading block becomes a ``PlainGraph<Block>`` without the
    shortcut code and the projection modules only it used. The model is then its shortcut-free twin.

    Leaky activations of the fade (:mod:`.leak`) become ReLUs again.

    Raises:
        ValueError: ``s`` is not 0 (removing the shortcuts would change the outputs), or an activation still leaks,
            unless ``force``.
    """
    if not is_fading(model):
        return restore_relus(model, force)
    s = next((v for v in shortcut_scales(model) if v != 0.0), 0.0)  # any block, a NaN too
    if s != 0.0 and not force:
        raise ValueError(f'The shortcuts have not faded out (scale s = {s:.4g}, not 0): removing them would change '
                         'the outputs. Train until the fade ends (JointRDConfig.shortcut_fade <= 1) or pass force=True.')
    restore_relus(model, force)  # checks its slopes before it changes anything
    report = getattr(model, 'plain_report', None) or PlainReport()
    for name, block in list(model.named_modules()):
        if not isinstance(block, FadingGraphBlock):
            continue
        graph = block.graph
        for node in list(graph.nodes):
            if _is_fade(node) or (node.op == 'call_function' and node.target is faded_scale):
                node.replace_all_uses_with(node.args[0])  # the branch; the tensor a dropped scale multiplied
                graph.erase_node(node)
        before = {n for n, _ in block.named_children()}
        cls = plain_class(block.jointrd_block_class)
        cls.jointrd_plain_rule = cls.jointrd_plain_rule or block.jointrd_plain_rule
        plain = graph_block(cls, block, graph)
        if SCALE in plain._buffers:
            del plain._buffers[SCALE]
        report.removed_modules.extend(f'{name}.{n}' for n in sorted(before - {n for n, _ in plain.named_children()}))
        parent_name, _, child_name = name.rpartition('.')
        setattr(model.get_submodule(parent_name), child_name, plain)
    _finish_unfaded_blocks(model, report)
    model.plain_report = report
    record_model_args(model, shortcut_fade=False)
    return model


def _finish_unfaded_blocks(model: nn.Module, report: PlainReport) -> None:
    """Apply the plain twin's rule to the rule-known blocks that had no shortcut addition of their own to fade
    but still hold shortcut modules: a block that computes a projection and hands it to a child as its shortcut
    (DLA's tree: ``tree1(x, project(bottom))``). The child's faded shortcut no longer reads it (s = 0), so the
    rule drops only dead code, and the model gets exactly the plain twin's modules and parameter names."""
    for name, module in list(model.named_modules()):
        rule = get_rule(module)
        if rule is None or not name or type(module) is not rule.block_class:
            continue
        before = {n for n, c in module.named_children() if c is not None}
        if rule.replaces:
            module, _ = rule.apply(module, report.keep_projection_shortcuts)
            parent_name, _, child_name = name.rpartition('.')
            setattr(model.get_submodule(parent_name), child_name, module)
        else:
            rule.apply(module, report.keep_projection_shortcuts)
        after = {n for n, c in module.named_children() if c is not None}
        report.removed_modules.extend(f'{name}.{n}' for n in sorted(before - after))


def deployable(model: nn.Module) -> nn.Module:
    """What is deployed and saved: a copy with the fade finished and the Dirac parametrisation folded (the
    model itself when there is neither)."""
    if not is_fading(model) and not has_dirac(model):
        return model
    model = copy.deepcopy(model)
    return fold_dirac(finish_fade(model))
