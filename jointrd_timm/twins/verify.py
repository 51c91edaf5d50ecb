"""Finding shortcut additions in the code a block actually runs.

Each module is traced with torch.fx, its submodules kept opaque, and every addition of two tensors is checked.
An addition is a *shortcut addition* when both operands are computed from the module's inputs, one of them
reaches the input through at most ``SHORT_PATH`` operations (the input itself, an identity, a projection, a
norm) and the other through more operations (additions and indexing do not count as operations). Where both
operands are equally deep (Xception's ``self.stack(x) + self.shortcut(x)``: two opaque calls), the addition counts
only when one of them is a submodule named as a shortcut (``SHORTCUT_NAMES``), which is then the shortcut. That
counts the shortcut of every timm residual block, and leaves alone the additions that fuse parallel branches of equal
depth (RepVGG's and MobileOne's conv branches, NASNet's cell combinations, Res2Net's scale groups) or add constants
and parameters.
Modules whose additions fuse features but are not shortcuts are listed in ``NOT_SHORTCUT_CLASSES``.
"""
import copy
import inspect
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from timm.models import FeatureHookNet
from torch import nn

from .rules import get_rule, handed_projections

__all__ = ['dead_parameters', 'shortcut_additions', 'handed_additions', 'trace_block', 'find_shortcut_additions',
           'count_shortcut_additions', 'find_unhandled_residual_blocks', 'NOT_SHORTCUT_CLASSES',
           'name_shortcuts', 'shortcut_names', 'checked_shortcut_names', 'is_addition']

SHORT_PATH = 3
# submodule names that mark an operand as the shortcut when both operands are equally deep (the last name part)
SHORTCUT_NAMES = frozenset({'shortcut', 'downsample', 'skip'})
# more such names for the blocks of one class (name_shortcuts), e.g. torchvision's RegNet block, whose projection
# shortcut is ``self.proj``: keyed by the block class
_CLASS_SHORTCUT_NAMES: Dict[type, frozenset] = {}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {'add', 'add_'}

# Modules whose additions are part of one layer's definition, not a shortcut around a block: attention that
# broadcasts a pooled context onto the map (GCNet), and normalisation layers with an additive term (ConvNeXt-V2's
# GRN adds its input back by definition; EvoNorm / FRN). They stay in the twin. Keyed by qualified class name.
NOT_SHORTCUT_CLASSES = {
    'timm.layers.global_context.GlobalContext',
    'timm.layers.grn.GlobalResponseNorm',
    'timm.layers.evo_norm.EvoNorm2dB0', 'timm.layers.evo_norm.EvoNorm2dB1', 'timm.layers.evo_norm.EvoNorm2dB2',
    'timm.layers.evo_norm.EvoNorm2dS0', 'timm.layers.evo_norm.EvoNorm2dS0a', 'timm.layers.evo_norm.EvoNorm2dS1',
    'timm.layers.evo_norm.EvoNorm2dS1a', 'timm.layers.evo_norm.EvoNorm2dS2', 'timm.layers.evo_norm.EvoNorm2dS2a',
    'timm.layers.filter_response_norm.FilterResponseNormTlu2d',
    'timm.layers.filter_response_norm.FilterResponseNormAct2d',
}


class _ShallowTracer(fx.Tracer):
    """Traces one module's own forward; every submodule is a single opaque call. In-place tensor methods whose
    result the code does not use (``out.mul_(self.gain)``, then ``out`` read on) become their out-of-place form,
    read by every later use of the tensor: torch.fx records them as calls nothing depends on, so its dead-code
    elimination (which every rewritten block goes through) would drop them."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def trace(self, root, concrete_args=None) -> fx.Graph:
        graph = super().trace(root, concrete_args=concrete_args)
        _out_of_place(graph)
        return graph


def _out_of_place(graph: fx.Graph) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        name = node.target
        if node.op != 'call_method' or node.users or not name.endswith('_') or name.startswith('_') \
                or not hasattr(torch.Tensor, name[:-1]) or not isinstance(node.args[0], fx.Node):
            continue
        tensor = node.args[0]
        with graph.inserting_before(node):
            result = graph.call_method(name[:-1], node.args, node.kwargs)
        for user in list(tensor.users):
            if user in order and order[user] > order[node]:
                user.replace_input_with(tensor, result)
        graph.erase_node(node)


def _concrete_args(module: nn.Module) -> Dict[str, None]:
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    return {p.name: None for p in params if p.default is None}


def trace_block(module: nn.Module) -> Optional[Tuple[fx.Graph, Dict[str, None]]]:
    """``module``'s own forward as an fx graph (submodules opaque), or None if torch.fx cannot trace it.

    timm's FeatureHookNet is not traced: its forward only reads what its hooks collected (hooks do not fire in a
    trace, so the graph would hold nothing of the model), and reading stores a Proxy in the hooks' per-device
    outputs, which would stay in the model and keep it from pickling."""
    if isinstance(module, FeatureHookNet):
        return None
    concrete = _concrete_args(module)
    try:
        return _ShallowTracer().trace(module, concrete_args=concrete), concrete
    except Exception:  # data-dependent control flow etc.: this module cannot be checked this way
        return None


def _cost(node: fx.Node, root: Optional[nn.Module]) -> int:
    """How much computation a node stands for: a submodule call costs 1 plus 2 per convolution / linear layer
    inside it (an opaque ``self.rep(x)`` holding six convs outweighs ``self.skipbn(self.skip(x))``), else 1."""
    if node.op != 'call_module' or root is None:
        return 1
    module = root.get_submodule(node.target)
    return 1 + 2 * sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


def checked_shortcut_names(names) -> frozenset:
    """``names`` (one name or several) as a set, each an attribute name of a submodule; ValueError otherwise."""
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ValueError(f'Shortcut names are the attribute names of submodules (e.g. "proj"), got {names!r}.')
    return frozenset(names)


def name_shortcuts(block_class: type, names) -> None:
    """Submodule ``names`` that mark the shortcut operand of an addition in ``block_class``'s forward where both
    operands are one submodule call (``self.proj(x) + self.f(x)``), beside :data:`SHORTCUT_NAMES`."""
    _CLASS_SHORTCUT_NAMES[block_class] = checked_shortcut_names(names)


def shortcut_names(block: Optional[nn.Module]) -> frozenset:
    """The names that mark a shortcut submodule in ``block`` (a twin's rewritten block counts as its class)."""
    if block is None:
        return SHORTCUT_NAMES
    cls = getattr(type(block), 'jointrd_block_class', None) or type(block)
    return SHORTCUT_NAMES | _CLASS_SHORTCUT_NAMES.get(cls, frozenset())


def is_addition(node: fx.Node) -> bool:
    """Whether ``node`` adds (``+``, ``+=``, ``torch.add``, ``.add`` / ``.add_``), whatever its operands are."""
    return (node.op == 'call_function' and node.target in _ADD_FUNCTIONS) or \
        (node.op == 'call_method' and node.target in _ADD_METHODS)


def _named_shortcut(node: fx.Node, names: frozenset = SHORTCUT_NAMES) -> bool:
    return node.op == 'call_module' and node.target.rsplit('.', 1)[-1] in names


def find_shortcut_additions(graph: fx.Graph, concrete: Dict[str, None],
                            root: Optional[nn.Module] = None) -> List[Tuple[fx.Node, fx.Node, fx.Node]]:
    """Every shortcut addition of a traced block (``root``) as ``(add node, shortcut operand, branch operand)``.

    An addition counts when one operand is at most ``SHORT_PATH`` operations from the input and the other is
    more; the output of a counted addition is an input too for a later addition whose operands both read it (the
    next residual sub-block in the same forward), not for one that merely adds it to a parallel branch. Of
    the two, the shortcut is the one with less computation on its path (convs weigh more than norms and identities),
    so a branch hidden in one opaque submodule call is not mistaken for the shortcut. Of two equally deep operands,
    the shortcut is the one called through a submodule named as one (:func:`shortcut_names` of ``root``); without
    such a name the addition is not counted."""
    names = shortcut_names(root)
    depth: Dict[fx.Node, int] = {}
    cost: Dict[fx.Node, int] = {}
    # depth and cost from each counted sum a node reads (sum -> (depth, cost)): a later addition of the sum and a
    # path that reads it is the next residual sub-block (MetaFormer's token mixer, then its MLP), measured from it
    chained: Dict[fx.Node, Dict[fx.Node, Tuple[int, int]]] = {}
    found = []
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.op == 'placeholder':
            if node.name in concrete:
                continue
            depth[node] = cost[node] = 0
            chained[node] = {}
            continue
        inputs = [a for a in node.all_input_nodes if a in depth]
        if not inputs:
            continue
        is_add = is_addition(node)
        # additions and indexing do not transform a tensor, so they do not deepen a path
        free = is_add or node.op == 'get_attr' or (node.op == 'call_function' and node.target is operator.getitem)
        step, step_cost = (0, 0) if free else (1, _cost(node, root))
        depth[node] = max(depth[a] for a in inputs) + step
        cost[node] = max(cost[a] for a in inputs) + step_cost
        chained[node] = {}
        for a in inputs:
            for root_sum, (d, c) in chained[a].items():
                old = chained[node].get(root_sum, (-1, -1))
                chained[node][root_sum] = (max(old[0], d + step), max(old[1], c + step_cost))
        if is_add and len(node.args) >= 2 and all(isinstance(a, fx.Node) and a in depth for a in node.args[:2]):
            a, b = node.args[:2]
            common = [r for r in chained[a] if r in chained[b]]
            if common:  # both read an earlier counted sum: measured from the latest one
                latest = max(common, key=order.__getitem__)
                measure = {a: chained[a][latest], b: chained[b][latest]}
            else:
                measure = {a: (depth[a], cost[a]), b: (depth[b], cost[b])}
            if min(measure[a][0], measure[b][0]) > SHORT_PATH:
                continue
            if measure[a][0] != measure[b][0]:
                shortcut, branch = sorted((a, b), key=lambda n: (measure[n][1], measure[n][0]))
            elif _named_shortcut(a, names) != _named_shortcut(b, names):
                shortcut, branch = (a, b) if _named_shortcut(a, names) else (b, a)
            else:
                continue
            found.append((node, shortcut, branch))
            chained[node][node] = (0, 0)
    return found


def shortcut_additions(module: nn.Module) -> Optional[int]:
    """Number of shortcut additions in ``module.forward`` (None if torch.fx cannot trace it)."""
    traced = trace_block(module)
    return None if traced is None else len(find_shortcut_additions(*traced, root=module))


def handed_additions(module: nn.Module) -> Optional[int]:
    """Shortcut additions of a block called with its optional shortcut argument given (its parent hands it a
    projection: DLA's first leaf), the argument's addition included; None if torch.fx cannot trace it."""
    traced = trace_block(module)
    if traced is None:
        return None
    graph, concrete = traced
    argument = next((n for n in inspect.signature(module.forward).parameters if n in concrete), None)
    if argument is not None:
        given = {k: v for k, v in concrete.items() if k != argument}
        try:
            graph, concrete = _ShallowTracer().trace(module, concrete_args=given), given
        except Exception:  # the argument is not traceable as a tensor: count the call without it
            pass
    return len(find_shortcut_additions(graph, concrete, root=module))


def count_shortcut_additions(model: nn.Module) -> int:
    """Shortcut additions left in the residual (or plain) blocks of ``model`` that a rule knows; a block whose
    parent hands it a projection as its shortcut is counted as it is called, with that shortcut. A fading twin's
    blocks count their scaled shortcuts (``branch + s * shortcut``, at any ``s``: the addition is computed until
    ``finish_fade`` removes it)."""
    from .fade import FadingGraphBlock, _is_fade  # fade builds on this module
    handed = handed_projections(model)
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, FadingGraphBlock):  # its scaled shortcuts, and any it keeps whole (a projection)
            total += sum(1 for node in module.graph.nodes if _is_fade(node)) + (shortcut_additions(module) or 0)
        elif get_rule(module) is not None:
            total += (handed_additions(module) if name in handed else shortcut_additions(module)) or 0
    return total


def _qualname(cls) -> str:
    return f'{cls.__module__}.{cls.__qualname__}'


def find_unhandled_residual_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Modules outside torch.nn that no rule handles and whose forward still adds a shortcut."""
    found = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.startswith('torch.') or get_rule(module) is not None \
                or _qualname(cls) in NOT_SHORTCUT_CLASSES:
            continue
        if shortcut_additions(module):
            found.append((name, module))
    return found


def dead_parameters(model: nn.Module, x: torch.Tensor, off_init: float = 1e-2) -> List[str]:
    """Parameters that get an all-zero gradient from ``model(x).square().mean()`` in train mode AND in eval mode,
    at the model's weights AND with every weight moved a little off them.

    A bias followed by a BatchNorm gets a zero gradient in train mode (the batch mean cancels it) whatever the
    network; in eval mode, with running statistics, it moves the output, so it is not dead. A parameter can also
    get a zero gradient only because of where the other weights start: a gain multiplied by another gain that
    starts at 0, or poolformerv2's StarReLU ``scale`` while its ``bias`` is 0 (its output then reaches a
    scale-invariant GroupNorm only through a bias-free linear layer). Such a parameter trains as soon as the
    others move, so the zero gradients are checked again on a copy whose floating weights are each moved by
    ``off_init`` times their mean magnitude (``off_init`` itself where that is 0), with a fixed seed. A parameter that
    stays at zero gradient through all of it is unused or cut off: the twin would not train it."""
    dead = _zero_gradients(model, x)
    if dead and off_init:
        moved = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in moved.parameters():
                if p.is_floating_point():
                    size = p.abs().mean().item() or 1.0
                    p.add_(torch.randn(p.shape, generator=gen).to(p) * (off_init * size))
        dead &= _zero_gradients(moved, x)
    return sorted(dead)


def _zero_gradients(model: nn.Module, x: torch.Tensor) -> set:
    """Names of the parameters whose gradient is all zero in train mode and in eval mode (model's mode restored)."""
    was_training = model.training
    dead = None
    for mode in (True, False):
        model.train(mode)
        model.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        zero = {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}
        dead = zero if dead is None else dead & zero
        if not dead:
            break
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    return dead
