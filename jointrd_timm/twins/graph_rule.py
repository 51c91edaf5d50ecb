"""Rules written once for every block whose shortcut is a plain addition in its forward: :func:`graph_rule`.

Many timm blocks end in ``x = shortcut + branch`` (or ``branch + self.shortcut(x)``) with nothing in the class
to switch it off. Instead of a hand-copied forward per class, the block's own forward is traced with torch.fx
(its submodules kept as opaque calls, so they stay the very same module objects), each *shortcut addition*
(see :mod:`jointrd_timm.twins.verify`) is replaced by its branch operand, and the code that only fed the
shortcut is removed with the projection modules it used. The block becomes a ``torch.fx.GraphModule``
(class ``PlainGraph<Block>``) under the same name in its parent: same parameter names minus the removed
branch, TorchScript-able, deep-copyable.

A class is registered only after checking that tracing it is faithful: a block that inspects its input's
Python type or shape would be traced down one branch only. ``tests/test_graph_rules.py`` runs every
registered class on real inputs captured from a model of its family and requires the traced (still residual)
graph to reproduce the block exactly before the shortcut is cut.
"""
import copy
from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple, Type

import torch

import torch.fx as fx
from torch import nn

from ..errors import JointRDError
from .rules import ShortcutRule, get_rule, register_rule
from .verify import checked_shortcut_names, find_shortcut_additions, is_addition, name_shortcuts, trace_block

__all__ = ['graph_rule', 'register_graph_rule', 'check_graph_rule', 'UnfaithfulTraceError', 'graph_block',
           'TwinGraphBlock', 'PlainGraphBlock', 'plain_class', 'plain_graph_module', 'faithful_trace', 'is_projection']

_HOOK_DICTS = ('_forward_hooks', '_forward_hooks_with_kwargs', '_forward_hooks_always_called', '_forward_pre_hooks',
               '_forward_pre_hooks_with_kwargs', '_backward_hooks', '_backward_pre_hooks')


class TwinGraphBlock(fx.GraphModule):
    """Base class of the blocks a twin rewrites as GraphModules, one class per block class
    (``jointrd_block_class``).

    torch.fx pickles a GraphModule as its generated code and unpickles it as a bare ``GraphModule`` traced again
    from that code. A twin's blocks keep their class instead (what the fade, ``deployable`` and the probes
    recognise them by), so a twin survives ``pickle``, ``torch.save`` of the whole model and a spawned process."""
    jointrd_block_class: Optional[Type[nn.Module]] = None

    def _class_factory(self) -> Callable[[Type[nn.Module]], type]:
        raise NotImplementedError

    def __reduce__(self):
        rebuild, args = super().__reduce__()
        # torch.fx's rebuilt module is in train mode and without hooks whatever this one had: both travel here
        hooks = {name: getattr(self, name) for name in _HOOK_DICTS if getattr(self, name, None)}
        return _rebuilt_block, (self._class_factory(), self.jointrd_block_class, rebuild, args, self.training, hooks)


def _rebuilt_block(factory: Callable[[Type[nn.Module]], type], block_class: Type[nn.Module], rebuild, args,
                   training: bool = True, hooks: Optional[dict] = None) -> nn.Module:
    """Unpickling of a :class:`TwinGraphBlock`: torch.fx's bare GraphModule, re-made as the class it was, in the
    mode and with the hooks it had."""
    bare = rebuild(*args)
    for name, value in (hooks or {}).items():
        setattr(bare, name, value)
    module = graph_block(factory(block_class), bare, bare.graph)
    module.training = training
    return module


class PlainGraphBlock(TwinGraphBlock):
    """Base class of the blocks made plain by a graph rule; ``jointrd_plain_rule`` names the rule."""
    jointrd_plain_rule = None

    def _class_factory(self):
        return plain_class


@lru_cache(maxsize=None)
def plain_class(block_class: Type[nn.Module]) -> type:
    return type(f'PlainGraph{block_class.__name__}', (PlainGraphBlock,), dict(jointrd_block_class=block_class))


_RESAMPLING = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.MaxPool2d)


def is_projection(node: fx.Node, root: nn.Module) -> bool:
    """The shortcut operand changes stride or width: a conv, linear or pooling lies on its path (a norm alone, as
    in a re-parameterisable block's identity-BN branch, does not make a projection)."""
    while node.op != 'placeholder':
        if node.op == 'call_module':
            if any(isinstance(m, _RESAMPLING) for m in root.get_submodule(node.target).modules()):
                return True
        elif node.op == 'call_function' and getattr(node.target, '__name__', '') in (
                'avg_pool2d', 'max_pool2d', 'adaptive_avg_pool2d', 'interpolate', 'conv2d', 'linear'):
            return True
        inputs = node.all_input_nodes
        if not inputs:
            return False
        node = inputs[0]
    return False


def plain_graph_module(block: nn.Module, keep_projection: bool = False) -> Tuple[nn.Module, bool]:
    """The shortcut-free version of ``block`` as a GraphModule, and whether a projection shortcut was kept."""
    traced = trace_block(block)
    if traced is None:
        raise ValueError(f'{type(block).__qualname__} cannot be traced by torch.fx, so no graph rule applies to it.')
    graph, concrete = traced
    kept = False
    replaced = {}  # an addition already replaced can be an operand of a later one (NASNet's cells)
    for add, shortcut, branch in find_shortcut_additions(graph, concrete, root=block):
        shortcut, branch = replaced.get(shortcut, shortcut), replaced.get(branch, branch)
        if keep_projection and is_projection(shortcut, block):
            kept = True
            continue
        add.replace_all_uses_with(branch)
        graph.erase_node(add)
        replaced[add] = branch
    return graph_block(plain_class(type(block)), block, graph), kept


def graph_block(cls: type, block: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` (edited from ``block``'s trace) as a GraphModule of class ``cls``: the hooks on the block (e.g.
    timm's FeatureHookNet taps) stay with it, dead code and the submodules it alone used are dropped."""
    module = cls(block, graph, class_name=cls.__name__)
    keep_non_persistent(module, block)
    for hooks in _HOOK_DICTS:
        if getattr(block, hooks, None):
            setattr(module, hooks, copy.copy(getattr(block, hooks)))
    module.graph.eliminate_dead_code()
    module.delete_all_unused_submodules()
    module.recompile()
    return module


def keep_non_persistent(module: nn.Module, source: nn.Module) -> None:
    """Buffers that ``source`` keeps out of its state dict (``persistent=False``) stay out of ``module``'s, its
    GraphModule: torch.fx before torch 2.12 copies a buffer that the graph reads (``get_attr``) as a persistent one,
    which would put e.g. the fade's shortcut scale into a twin's state dict."""
    for path, sub in source.named_modules():
        for name in sub._non_persistent_buffers_set:
            try:
                target = module.get_submodule(path) if path else module
            except AttributeError:  # a submodule the graph does not use
                continue
            if name in target._buffers:
                target._non_persistent_buffers_set.add(name)


def faithful_trace(block: nn.Module) -> fx.GraphModule:
    """The block's traced forward, unchanged (for checking that tracing reproduces the block)."""
    traced = trace_block(block)
    if traced is None:
        raise ValueError(f'{type(block).__qualname__} cannot be traced by torch.fx.')
    return fx.GraphModule(block, traced[0])


def graph_rule(block_class: Type[nn.Module], why: str = '', shortcut_names: Tuple[str, ...] = ()) -> ShortcutRule:
    """Register the graph rule for ``block_class`` (see the module docstring). ``shortcut_names``: the submodule
    names that mark the shortcut where both operands of an addition are one submodule call
    (:func:`~jointrd_timm.twins.verify.name_shortcuts`)."""
    names = checked_shortcut_names(shortcut_names)  # before anything is registered: a bad name changes nothing
    rule = register_rule(ShortcutRule(
        block_class, plain_graph_module,
        'forward traced with torch.fx; each shortcut addition replaced by its branch, the projection removed '
        '(kept if a projection and keep_projection_shortcuts)' + (f'; {why}' if why else ''), replaces=True))
    if names:  # once the class is registered (a refused registration leaves the class's names as they were)
        name_shortcuts(block_class, names)
    plain_class(block_class).jointrd_plain_rule = rule
    return rule


class UnfaithfulTraceError(JointRDError, ValueError):
    """A block's forward traced by torch.fx does not compute what the block computes (:func:`check_graph_rule`)."""


def register_graph_rule(block_class: Type[nn.Module], shortcut_names: Tuple[str, ...] = ()) -> Type[nn.Module]:
    """Let :func:`~jointrd_timm.make_plain` derive twins of a model built from your own residual block class: the
    graph rule (the module docstring) is registered for ``block_class`` and the class is returned, so this works as
    a class decorator too::

        @jointrd_timm.register_graph_rule
        class MyBlock(nn.Module):
            def forward(self, x):
                return self.act(x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x))))))

    The rule needs a forward that torch.fx traces faithfully: no branching on the input's values, shape or Python
    type (tracing would follow one branch only). :func:`check_graph_rule` tests that on real inputs; run it once
    per class. A class that already has a rule (timm's, or one registered before) is refused.

    The shortcut of an addition is the operand with less computation on its path from the block's input. Where
    both are one submodule call (``self.proj(x) + self.body(x)``), name the shortcut's submodule:
    ``register_graph_rule(MyBlock, shortcut_names=('proj',))`` (``shortcut``, ``downsample`` and ``skip`` are
    known already)."""
    if not (isinstance(block_class, type) and issubclass(block_class, nn.Module)):
        raise TypeError(f'register_graph_rule takes an nn.Module subclass (the block class), got {block_class!r}.')
    graph_rule(block_class, 'registered by the user (register_graph_rule)', shortcut_names)
    return block_class


def check_graph_rule(model: nn.Module, *args, **kwargs) -> Dict[str, int]:
    """Run ``model(*args, **kwargs)`` (eval mode, no gradients) and check, for every block whose class has a graph
    rule, that its traced forward computes exactly what the block computed on the input it received there, and that
    the rule finds the shortcut to cut in it: a block whose forward adds two computed tensors without one being
    found as the shortcut is refused, one without any addition (a block of the class built without a shortcut)
    passes, and a class must show a shortcut in at least one of its blocks. Raises :class:`UnfaithfulTraceError`
    naming the first block that fails; returns the number of blocks checked per class (``'module.Class': n``).
    ``model`` is the residual model, before :func:`~jointrd_timm.make_plain`."""
    blocks = [(name, m) for name, m in model.named_modules()
              if getattr(get_rule(m), 'apply', None) is plain_graph_module and not isinstance(m, fx.GraphModule)]
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no block whose class has a graph rule: register the block '
                         'class first (register_graph_rule).')
    captured, hooks = {}, []
    for name, block in blocks:
        def hook(module, a, kw, name=name):  # a copy: a block may change its input in place
            captured.setdefault(name, (module, _cloned(a), _cloned(kw)))
        hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()  # through the comparisons too: dropout off, BN statistics untouched
    try:
        with torch.no_grad():
            model(*args, **kwargs)
        for h in hooks:
            h.remove()
        if not captured:
            raise ValueError(f'None of the {len(blocks)} block(s) of a graph-rule class in {type(model).__name__} ran '
                             'on this input, so none was checked: give an input that reaches them.')
        return _compare(captured)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _additions(graph: fx.Graph) -> int:
    """The additions of two computed tensors in a traced forward (shortcut or not)."""
    return sum(1 for node in graph.nodes
               if is_addition(node) and sum(isinstance(a, fx.Node) for a in node.args[:2]) == 2)


def _compare(captured: Dict) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    with_shortcut = set()  # the classes with a shortcut found in at least one block
    for name, (block, a, kw) in captured.items():
        qualname = f'{type(block).__module__}.{type(block).__qualname__}'
        try:
            traced = faithful_trace(block)
        except ValueError as e:
            raise UnfaithfulTraceError(f'`{name}` ({qualname}): {e} Its class cannot take the graph rule.') from e
        with torch.no_grad():
            expected = block(*_cloned(a), **_cloned(kw))
            try:
                got = traced(*_cloned(a), **_cloned(kw))
            except Exception as e:  # the trace took a branch the real input does not fit
                raise UnfaithfulTraceError(f'`{name}` ({qualname}): its forward traced by torch.fx fails on the input '
                                           f'the block received ({type(e).__name__}: {e}).') from e
        if not _same(expected, got):
            raise UnfaithfulTraceError(
                f'`{name}` ({qualname}): its forward traced by torch.fx computes something else than the block '
                'on the input it received (does the forward branch on the input\'s values, shape or type?). The '
                'graph rule cannot derive its twin: write a rule for the class (docs/design.md).')
        graph, concrete = trace_block(block)
        if find_shortcut_additions(graph, concrete, root=block):
            with_shortcut.add(qualname)
        elif _additions(graph):
            raise UnfaithfulTraceError(
                f'`{name}` ({qualname}): its forward adds two computed tensors, and the graph rule finds no shortcut '
                'among them (where both operands are equally deep it cannot tell which one is). If one operand is '
                "the shortcut, a submodule called on the block's input, name that submodule: "
                "register_graph_rule(TheClass, shortcut_names=('proj',)). If neither is (parallel branches that are "
                "the block's own design), the graph rule does not fit the class: write a rule for it "
                '(docs/design.md).')
        # else a block of the class without a shortcut (one that changes stride or width, say): nothing to cut
        counts[qualname] = counts.get(qualname, 0) + 1
    for qualname in counts.keys() - with_shortcut:
        raise UnfaithfulTraceError(
            f'{qualname}: the graph rule finds no shortcut addition in the forward of any of its {counts[qualname]} '
            'block(s) here, so a twin would keep whatever residual path they have (an addition the trace cannot '
            'see, inside a function torch.fx does not enter?).')
    return counts


def _cloned(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    return value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
