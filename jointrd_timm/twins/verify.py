"""Finding shortcut additions in the code a block actually runs.

Each module is traced with torch.fx, its submodules kept opaque, and every addition of two tensors is checked.
An addition is a *shortcut addition* when both operands are computed from the module's inputs, one of them
reaches the input through at most ``SHORT_PATH`` operations (the input itself, an identity, a projection, a
norm) and the other through more operations (additions and indexing do not count as operations). That counts
the shortcut of every timm residual block, and leaves alone the additions that fuse parallel branches of equal
depth (RepVGG's and MobileOne's conv branches, Res2Net's scale groups) or add constants and parameters.
Modules whose additions fuse features but are not shortcuts are listed in ``NOT_SHORTCUT_CLASSES``.
"""
import inspect
import operator
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn

from .rules import get_rule

__all__ = ['shortcut_additions', 'count_shortcut_additions', 'find_unhandled_residual_blocks',
           'NOT_SHORTCUT_CLASSES']

SHORT_PATH = 3
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
    """Traces one module's own forward; every submodule is a single opaque call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _concrete_args(module: nn.Module) -> Dict[str, None]:
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    return {p.name: None for p in params if p.default is None}


def shortcut_additions(module: nn.Module) -> Optional[int]:
    """Number of shortcut additions in ``module.forward`` (None if torch.fx cannot trace it)."""
    concrete = _concrete_args(module)
    try:
        graph = _ShallowTracer().trace(module, concrete_args=concrete)
    except Exception:  # data-dependent control flow etc.: this module cannot be checked this way
        return None
    depth: Dict[fx.Node, int] = {}
    count = 0
    for node in graph.nodes:
        if node.op == 'placeholder':
            if node.name in concrete:
                continue
            depth[node] = 0
            continue
        inputs = [a for a in node.all_input_nodes if a in depth]
        if not inputs:
            continue
        is_add = (node.op == 'call_function' and node.target in _ADD_FUNCTIONS) or \
                 (node.op == 'call_method' and node.target in _ADD_METHODS)
        # additions and indexing do not transform a tensor, so they do not deepen a path
        free = is_add or node.op == 'get_attr' or (node.op == 'call_function' and node.target is operator.getitem)
        depth[node] = max(depth[a] for a in inputs) + (0 if free else 1)
        if is_add and len(node.args) >= 2 and all(isinstance(a, fx.Node) and a in depth for a in node.args[:2]):
            shallow, deep = sorted(depth[a] for a in node.args[:2])
            if shallow <= SHORT_PATH and deep > shallow:
                count += 1
    return count


def count_shortcut_additions(model: nn.Module) -> int:
    """Shortcut additions left in the residual (or plain) blocks of ``model`` that a rule knows."""
    total = 0
    for _, module in model.named_modules():
        if get_rule(module) is not None:
            total += shortcut_additions(module) or 0
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
