"""Folding across parallel linear branches, on a traced model, after torch's conv + BN fusion.

torch's fusion folds a BatchNorm only into the one conv that feeds it. Two patterns it leaves computed are exact
linear algebra as well, and both are common once a twin has lost the identity branch that timm's own ``fuse()``
expected (RepViT's ``bn(conv(x) + conv1(x))``), or in mixed-kernel convs (MixNet's ``bn(cat([conv_k(x_k)]))``):

- a BatchNorm, or a product with a per-channel constant (timm's LayerScale2d), whose input is a sum, difference or
  channel concatenation of conv outputs is folded into every one of those convs (its scale per output channel, its
  shift once per channel);
- convs on the same input whose outputs are added or subtracted, with the same stride, dilation, groups and
  centred zero padding, become one conv with the larger kernel (the smaller one zero-padded to it): RepVGG's
  structural re-parameterisation, for any block.

Only intermediate values nothing else reads are rewritten; a conv module called more than once, with hooks, or whose
parameters the graph reads elsewhere is left alone, and two convs are not merged where their input may be changed in
place between them; so the model computes what it computed (up to float rounding). The graph carries no shapes: the
patterns assume batched NCHW tensors (channel dimension 1), what a timm image model computes.
"""
import operator
from collections import Counter
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

__all__ = ['fold_parallel_branches']

_ADD = (operator.add, operator.iadd, torch.add, 'add', 'add_')
_SUB = (operator.sub, operator.isub, torch.sub, 'sub', 'sub_')
_IN_PLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow)

# (conv node, sign of its output in the sum, first output channel it feeds in the normalised tensor)
Branch = Tuple[fx.Node, int, int]


def _convs(graph_module: fx.GraphModule) -> Dict[str, nn.Module]:
    """The convs whose weight is used as stored (a weight-standardised conv would undo a folded scale), called once,
    without hooks (weight norm computes the weight in one), whose parameters nothing else in the graph reads."""
    from timm.layers import Conv2dSame
    calls = Counter(n.target for n in graph_module.graph.nodes if n.op == 'call_module')
    read = {n.target.rpartition('.')[0] for n in graph_module.graph.nodes if n.op == 'get_attr'}
    return {name: m for name, m in graph_module.named_modules()
            if type(m) in (nn.Conv2d, Conv2dSame) and calls[name] == 1 and name not in read
            and not (m._forward_pre_hooks or m._forward_hooks)}


def _in_place(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Whether ``node`` may overwrite its inputs: a module built with inplace=True, ``inplace=True`` given, an in-place
    operator (``+=``) or method / function (``add_``, ``torch.relu_``)."""
    if node.op == 'call_module':
        return bool(getattr(modules.get(node.target), 'inplace', False))
    if node.kwargs.get('inplace') is True or node.target in _IN_PLACE_OPERATORS:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, '__name__', '')
    return name.endswith('_') and not name.endswith('__')


def _binary(node: fx.Node) -> Optional[int]:
    """+1 for an addition of two nodes, -1 for a subtraction, None for anything else (an ``alpha``, a constant)."""
    if node.op not in ('call_function', 'call_method') or len(node.args) != 2 or node.kwargs \
            or not all(isinstance(a, fx.Node) for a in node.args) or node.args[0] is node.args[1]:
        return None
    return 1 if node.target in _ADD else -1 if node.target in _SUB else None


def _cat_parts(node: fx.Node) -> Optional[List[fx.Node]]:
    """The parts of a channel concatenation (dim 1), else None."""
    if node.op != 'call_function' or node.target not in (torch.cat, torch.concat, torch.concatenate):
        return None
    parts = node.args[0] if node.args else node.kwargs.get('tensors')
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim', 0)
    if dim not in (1, -3) or not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
        return None
    return list(parts)


def _branches(node: fx.Node, convs: Dict[str, nn.Module]) -> Optional[Tuple[List[Branch], int]]:
    """The convs whose outputs ``node`` is a signed sum / concatenation of, and its number of channels; None unless
    every value on the way is read by its consumer alone."""
    if len(node.users) != 1:
        return None
    if node.op == 'call_module' and node.target in convs:
        return [(node, 1, 0)], convs[node.target].out_channels
    sign = _binary(node)
    if sign is not None:
        left, right = (_branches(a, convs) for a in node.args)
        if left is None or right is None or left[1] != right[1]:
            return None
        return left[0] + [(n, s * sign, o) for n, s, o in right[0]], left[1]
    parts = _cat_parts(node)
    if parts is None or len(set(parts)) != len(parts):
        return None
    found, offset = [], 0
    for part in parts:
        inner = _branches(part, convs)
        if inner is None:
            return None
        found += [(n, s, o + offset) for n, s, o in inner[0]]
        offset += inner[1]
    return found, offset


def _set_bias(conv: nn.Module, bias: torch.Tensor) -> None:
    conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=conv.weight.requires_grad)


def _constant(node, graph_module: fx.GraphModule) -> Optional[torch.Tensor]:
    """The tensor a ``get_attr`` node reads (through one ``view`` / ``reshape``), else None."""
    shape = None
    if isinstance(node, fx.Node) and node.op == 'call_method' and node.target in ('view', 'reshape') \
            and not node.kwargs and all(isinstance(d, int) for d in node.args[1:]):
        node, shape = node.args[0], node.args[1:]
    if not isinstance(node, fx.Node) or node.op != 'get_attr':
        return None
    value = graph_module
    for part in node.target.split('.'):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.reshape(shape) if shape else value
    except RuntimeError:
        return None


def _affine(node: fx.Node, graph_module: fx.GraphModule, modules: Dict[str, nn.Module]) \
        -> Optional[Tuple[fx.Node, torch.Tensor, torch.Tensor]]:
    """(input, scale, shift) per channel of ``node`` where it is an eval-mode BatchNorm2d or a product with a
    per-channel constant (timm's LayerScale2d: ``x * gamma``), else None."""
    bn = modules.get(node.target) if node.op == 'call_module' else None
    if bn is not None:
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or bn.training or len(node.args) != 1 \
                or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        return node.args[0], scale, (bn.bias if bn.affine else 0) - bn.running_mean * scale
    is_mul = (node.op == 'call_function' and node.target in (operator.mul, torch.mul)) \
        or (node.op == 'call_method' and node.target == 'mul')
    if not is_mul or len(node.args) != 2 or node.kwargs:
        return None
    for x, c in (node.args, node.args[::-1]):
        value = _constant(c, graph_module)
        if isinstance(x, fx.Node) and value is not None and value.dim() in (3, 4) \
                and value.shape[-2:] == (1, 1) and (value.dim() == 3 or value.shape[0] == 1):
            scale = value.reshape(-1)
            return x, scale, torch.zeros_like(scale)
    return None


@torch.no_grad()
def _fold_norms(graph_module: fx.GraphModule) -> int:
    modules = dict(graph_module.named_modules())
    convs = _convs(graph_module)
    folded = 0
    for node in list(graph_module.graph.nodes):
        affine = _affine(node, graph_module, modules)
        if affine is None:
            continue
        source, scale, shift = affine
        found = _branches(source, convs)
        if found is None or found[1] != scale.numel() \
                or any(convs[n.target].weight.dtype != scale.dtype for n, _, _ in found[0]):
            continue
        unshifted = torch.ones_like(shift)
        for conv_node, sign, offset in found[0]:
            conv = convs[conv_node.target]
            channels = slice(offset, offset + conv.out_channels)
            weight = conv.weight * scale[channels].view(-1, 1, 1, 1)
            conv.weight = nn.Parameter(weight.detach(), requires_grad=conv.weight.requires_grad)
            bias = conv.bias * scale[channels] if conv.bias is not None else torch.zeros_like(scale[channels])
            # each channel's shift once, through the sign of the first conv that feeds it
            _set_bias(conv, bias + sign * shift[channels] * unshifted[channels])
            unshifted[channels] = 0
        node.replace_all_uses_with(source)
        graph_module.graph.erase_node(node)
        folded += 1
    return folded


def _skip_identities(graph_module: fx.GraphModule) -> None:
    """``nn.Identity`` calls (timm's absent SE / activation / dropout slots) replaced by their input."""
    modules = dict(graph_module.named_modules())
    for node in list(graph_module.graph.nodes):
        if node.op == 'call_module' and type(modules.get(node.target)) is nn.Identity and len(node.args) == 1 \
                and not node.kwargs and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            graph_module.graph.erase_node(node)


def _centred(conv: nn.Conv2d) -> bool:
    """Zero padding of (k - 1) / 2 dilated taps on every side: the output grid is the same for any odd kernel."""
    return conv.padding_mode == 'zeros' and isinstance(conv.padding, tuple) and all(
        k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation))


def _mergeable(a: nn.Module, b: nn.Module) -> bool:
    same = ('in_channels', 'out_channels', 'stride', 'dilation', 'groups')
    return type(a) is nn.Conv2d and type(b) is nn.Conv2d and _centred(a) and _centred(b) \
        and all(getattr(a, f) == getattr(b, f) for f in same)


def _padded(weight: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    dh, dw = size[0] - weight.shape[2], size[1] - weight.shape[3]
    return F.pad(weight, [dw // 2, dw // 2, dh // 2, dh // 2])


@torch.no_grad()
def _merge_convs(graph_module: fx.GraphModule) -> int:
    convs = _convs(graph_module)
    modules = dict(graph_module.named_modules())
    merged = 0
    for node in list(graph_module.graph.nodes):
        sign = _binary(node)
        if sign is None:
            continue
        left, right = node.args
        if not all(a.op == 'call_module' and a.target in convs and len(a.users) == 1 and a.args
                   and len(a.args) == 1 and not a.kwargs for a in (left, right)) or left.args[0] is not right.args[0] \
                or any(_in_place(user, modules) for user in left.args[0].users):
            continue  # one call of the merged conv would read the input as one of them read it
        a, b = convs[left.target], convs[right.target]
        if not _mergeable(a, b):
            continue
        keep, keep_sign, other, other_sign = (a, 1, b, sign) if a.kernel_size >= b.kernel_size else (b, sign, a, 1)
        size = tuple(max(x, y) for x, y in zip(a.kernel_size, b.kernel_size))
        dilated = tuple(d * (k - 1) // 2 for k, d in zip(size, a.dilation))
        weight = keep_sign * _padded(keep.weight, size) + other_sign * _padded(other.weight, size)
        bias = sum(s * c.bias for c, s in ((keep, keep_sign), (other, other_sign)) if c.bias is not None)
        keep.weight = nn.Parameter(weight, requires_grad=keep.weight.requires_grad)
        keep.kernel_size, keep.padding = size, dilated
        if isinstance(bias, torch.Tensor):
            _set_bias(keep, bias)
        kept_node = left if keep is a else right
        node.replace_all_uses_with(kept_node)
        graph_module.graph.erase_node(node)
        graph_module.graph.erase_node(right if keep is a else left)
        del convs[(right if keep is a else left).target]
        merged += 1
    return merged


def fold_parallel_branches(graph_module: fx.GraphModule) -> Dict[str, int]:
    """Both folds on ``graph_module`` (an eval-mode traced model), in place, until nothing changes; how many norms and
    per-channel scales were folded into convs, and how many conv pairs merged."""
    done = dict(folded_into_convs=0, convs_merged=0)
    _skip_identities(graph_module)
    while True:
        norms, pairs = _fold_norms(graph_module), _merge_convs(graph_module)
        if not norms and not pairs:
            break
        done['folded_into_convs'] += norms
        done['convs_merged'] += pairs
    graph_module.graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return done
