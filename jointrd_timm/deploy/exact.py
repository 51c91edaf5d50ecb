"""Exact removal of the shortcuts of a trained post-activation ResNet: the RM operation.

Meng et al., "RMNet: Equivalently Removing Residual Connection from Deep Neural Networks" (repository
fxmeng/RMNet). A post-activation block computes ``y = relu(F(x) + S(x))`` with ``F`` the conv-BN-ReLU branch and
``S`` the shortcut (identity, or a 1x1 conv + BN projection, optionally after a 2x2 average pool). Its input comes
out of a ReLU, so ``x >= 0``. With BN folded into each conv (eval-mode statistics):

* every conv of the branch but the last gets ``C_in`` extra output channels that carry ``x``: a per-channel
  kernel, a Dirac (one tap of weight 1) or, in the strided conv, the shortcut's spatial sampling (a strided Dirac
  on the tap the 1x1 projection reads, or weights 1/4 on the 2x2 taps the average pool reads). The carried values
  are non-negative, so the ReLU after the conv leaves them unchanged;
* the last conv gets ``C_in`` extra input channels holding the shortcut's channel map at its Dirac tap (the
  identity, or the folded 1x1 projection, whose bias joins the conv's), so its output is ``F(x) + S(x)`` and the
  block's final ReLU gives ``y``.

The block becomes conv-ReLU-conv-ReLU (-conv-ReLU) with no addition: the teacher's function up to float rounding,
at the price of wider convs (see docs/exact_conversion.md). A grouped conv (ResNeXt) carries
``x`` in extra groups of its group size. Whatever would break the equality is refused with
:class:`ExactConversionError`, naming the block: pre-activation blocks or blocks without a final ReLU, attention,
anti-aliasing or unknown modules in a block, stochastic depth active in train mode, a block input that can be
negative, norms other than BatchNorm, shortcuts or groupings the carried channels cannot reproduce.

A 2x2 average-pool shortcut reads a full window only when the block input has even height and width (at an odd
edge PyTorch averages the pixels inside the input, which no fixed kernel reproduces): such blocks check the input
size at run time and refuse odd ones.
"""
import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from timm.layers import DropBlock2d, DropPath
from timm.models.resnet import BasicBlock, Bottleneck
from torchvision.models import resnet as tv_resnet

from ..errors import JointRDError
from ..io import input_channels
from ..twins import get_rule, shortcut_additions
from ..twins.summary import count_flops
from ..twins.verify import NOT_SHORTCUT_CLASSES
from .fold import fold_for_deployment

__all__ = ['exact_plain', 'exact_conversion_report', 'ExactPlainBlock', 'ExactConversionError']

# the branch of each supported block: (conv, norm, activation) in forward order; the last activation follows the
# shortcut addition. torchvision's ResNet blocks (ResNet, ResNeXt, Wide ResNet) have timm's layout with one ReLU
# module applied after every conv and after the addition.
BRANCHES = {
    BasicBlock: (('conv1', 'bn1', 'act1'), ('conv2', 'bn2', 'act2')),
    Bottleneck: (('conv1', 'bn1', 'act1'), ('conv2', 'bn2', 'act2'), ('conv3', 'bn3', 'act3')),
    tv_resnet.BasicBlock: (('conv1', 'bn1', 'relu'), ('conv2', 'bn2', 'relu')),
    tv_resnet.Bottleneck: (('conv1', 'bn1', 'relu'), ('conv2', 'bn2', 'relu'), ('conv3', 'bn3', 'relu')),
}
_SUPPORTED = ("timm's and torchvision's post-activation resnet.BasicBlock and resnet.Bottleneck (ResNet, ResNeXt, "
              'Wide ResNet)')
# the other children a supported block may have, and the shortcut
_OPTIONAL_CHILDREN = ('drop_block', 'aa', 'se', 'drop_path', 'downsample')
# modules that keep a non-negative input non-negative
_SIGN_PRESERVING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Identity, nn.Dropout)


class ExactConversionError(JointRDError, ValueError):
    """A model (or one of its blocks) whose shortcuts cannot be removed exactly; the message names the block."""


class ExactPlainBlock(nn.Sequential):
    """A residual block after the RM conversion: ``conv1, act1, conv2, act2[, conv3, act3]``, no addition.

    Args:
        layers: the convs (BN folded, with bias) and ReLUs, in order.
        even_input: the block carries a 2x2 average-pool shortcut, exact only for even input height and width;
            other sizes raise.
        name: the block's path in the original model, for that error.
    """

    def __init__(self, layers: 'OrderedDict[str, nn.Module]', even_input: bool = False, name: str = ''):
        super().__init__(layers)
        self.even_input = even_input
        self.odd_input_message = (
            f'{name}: this block replaces a 2x2 average-pool shortcut, reproduced exactly only for inputs of even '
            'height and width; give an input size that keeps this block\'s input even.')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a trace records no check (ONNX fixes the size; a TorchScript trace does not: docs/exact_conversion.md)
        if self.even_input and not torch.jit.is_tracing():
            torch._assert(x.shape[-2] % 2 == 0, self.odd_input_message)
            torch._assert(x.shape[-1] % 2 == 0, self.odd_input_message)
        for module in self:
            x = module(x)
        return x


@dataclass
class _Shortcut:
    """``S(x) = channel_map @ sample(x) + bias``: ``sample`` reads, per channel, the pixels ``stride * i + offset``
    with weight ``tap_weight`` each."""
    offsets: List[Tuple[int, int]]
    tap_weight: float
    stride: Tuple[int, int]
    channel_map: torch.Tensor
    bias: torch.Tensor
    even_input: bool


def _refuse(path: str, block: nn.Module, reason: str) -> ExactConversionError:
    cls = type(block)
    return ExactConversionError(f'{path or "the model"} ({cls.__module__.split(".")[-1]}.{cls.__qualname__}): {reason}')


def _fold(path: str, block: nn.Module, conv: nn.Module, norm: nn.Module, where: str):
    """(weight, bias) of ``conv`` followed by ``norm`` in eval mode, computed in float64."""
    if type(conv) is not nn.Conv2d or conv.padding_mode != 'zeros' or isinstance(conv.padding, str):
        raise _refuse(path, block, f'{where} is {conv!r}; only nn.Conv2d with numeric zero padding is converted.')
    if not isinstance(norm, nn.BatchNorm2d) or norm.running_mean is None:
        raise _refuse(path, block, f'{where} is followed by {type(norm).__name__}, which cannot be folded into it '
                                   '(only BatchNorm2d with running statistics can).')
    weight, bias = fuse_conv_bn_weights(
        conv.weight.detach().double(), None if conv.bias is None else conv.bias.detach().double(),
        norm.running_mean.double(), norm.running_var.double(), norm.eps,
        None if norm.weight is None else norm.weight.detach().double(),
        None if norm.bias is None else norm.bias.detach().double())
    return weight.detach(), bias.detach()


def _shortcut(path: str, block: nn.Module, in_channels: int) -> _Shortcut:
    downsample = block.downsample
    like = block.conv1.weight.detach().double()
    if downsample is None:
        return _Shortcut([(0, 0)], 1.0, (1, 1), torch.eye(in_channels, dtype=like.dtype, device=like.device),
                         like.new_zeros(in_channels), even_input=False)
    layers = list(downsample.children()) if isinstance(downsample, nn.Sequential) else [downsample]
    structure = ', '.join(type(m).__name__ for m in layers)
    pool = layers.pop(0) if len(layers) == 3 else nn.Identity()
    if len(layers) != 2 or type(pool) not in (nn.Identity, nn.AvgPool2d):
        raise _refuse(path, block, f'its shortcut is ({structure}); the shortcuts converted are the identity, '
                                   '(Conv2d 1x1, BatchNorm2d) and (AvgPool2d 2x2 stride 2, Conv2d 1x1, BatchNorm2d).')
    conv, norm = layers
    weight, bias = _fold(path, block, conv, norm, 'the shortcut conv')
    if weight.shape[-2:] != (1, 1) or conv.groups != 1:
        raise _refuse(path, block, f'its shortcut conv is {conv!r}: a kxk (or grouped) projection mixes space and '
                                   'channels together, and its negative values cannot be carried through a ReLU; '
                                   'only 1x1 projections are converted.')
    channel_map = weight[:, :, 0, 0]
    if type(pool) is nn.Identity:
        (sy, sx), (py, px) = conv.stride, conv.padding
        return _Shortcut([(-py, -px)], 1.0, (sy, sx), channel_map, bias, even_input=False)
    if conv.stride != (1, 1) or conv.padding != (0, 0):
        raise _refuse(path, block, f'its shortcut conv after the average pool is {conv!r}; expected stride 1, no '
                                   'padding (timm\'s downsample_avg).')
    size = tuple(pool.kernel_size) if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,) * 2
    stride = tuple(pool.stride) if isinstance(pool.stride, tuple) else (pool.stride,) * 2
    padding = tuple(pool.padding) if isinstance(pool.padding, tuple) else (pool.padding,) * 2
    if size != (2, 2) or stride != (2, 2) or padding != (0, 0) or pool.divisor_override is not None:
        raise _refuse(path, block, f'its shortcut pool is {pool!r}; only AvgPool2d(2, stride 2, no padding) is '
                                   'converted.')
    return _Shortcut([(0, 0), (0, 1), (1, 0), (1, 1)], 0.25, stride, channel_map, bias, even_input=True)


def _tap(conv: nn.Conv2d, offset: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """The kernel tap of ``conv`` that reads input pixel ``stride * i + offset`` for output pixel ``i``, if any."""
    taps = []
    for o, k, p, d in zip(offset, conv.kernel_size, conv.padding, conv.dilation):
        t, rest = divmod(o + p, d)
        if rest or not 0 <= t < k:
            return None
        taps.append(t)
    return taps[0], taps[1]


def _kernel(conv: nn.Conv2d, offsets: Sequence[Tuple[int, int]], tap_weight: float, like: torch.Tensor):
    """A (kh, kw) kernel holding ``tap_weight`` on the taps of ``conv`` that read ``offsets``, or None."""
    kernel = like.new_zeros(conv.kernel_size)
    for offset in offsets:
        tap = _tap(conv, offset)
        if tap is None:
            return None
        kernel[tap] += tap_weight
    return kernel


def _carry(weight: torch.Tensor, bias: torch.Tensor, groups: int, kernel: torch.Tensor, carried: int,
           extra_inputs: bool):
    """Append ``carried`` output channels, each applying ``kernel`` to one channel: the first ``carried`` inputs,
    or ``carried`` new inputs after the existing ones (``extra_inputs``). A grouped conv gets them as new groups."""
    out, per_group = weight.shape[:2]
    index = torch.arange(carried, device=weight.device)
    if groups == 1:
        first = per_group if extra_inputs else 0
        new = weight.new_zeros(out + carried, per_group + (carried if extra_inputs else 0), *weight.shape[2:])
        new[:out, :per_group] = weight
        new[out + index, first + index] = kernel
    else:
        new = weight.new_zeros(out + carried, per_group, *weight.shape[2:])
        new[:out] = weight
        new[out + index, index % per_group] = kernel
        groups += carried // per_group
    return new, torch.cat([bias, bias.new_zeros(carried)]), groups


def _convert_block(path: str, block: nn.Module) -> ExactPlainBlock:
    stages = BRANCHES[type(block)]
    known = {name for stage in stages for name in stage} | set(_OPTIONAL_CHILDREN)
    unknown = [name for name, _ in block.named_children() if name not in known]
    if unknown:
        raise _refuse(path, block, f'unknown module(s) {unknown}; the conversion knows the blocks\' own layout '
                                   'only.')
    se, aa = getattr(block, 'se', None), getattr(block, 'aa', None)  # timm's; torchvision's blocks have neither
    if se is not None:
        raise _refuse(path, block, f'its attention module `se` ({type(se).__name__}) scales the branch '
                                   'before the addition; carried channels pass convolutions and ReLUs only.')
    if aa is not None and not isinstance(aa, nn.Identity):
        raise _refuse(path, block, f'its anti-aliasing module `aa` ({type(aa).__name__}) would filter the '
                                   'carried channels too; blocks with aa_layer are not converted.')
    for name, kind in (('drop_path', DropPath), ('drop_block', DropBlock2d)):
        module = getattr(block, name, None)
        if module is None or type(module) is nn.Identity:
            continue
        if not isinstance(module, kind):
            raise _refuse(path, block, f'`{name}` is {type(module).__name__}, unknown to the conversion.')
        if block.training and module.drop_prob > 0:
            raise _refuse(path, block, f'`{name}` ({kind.__name__}, drop_prob={module.drop_prob}) is active because '
                                       'the model is in train mode, where the output is random; the conversion '
                                       'reproduces the eval-mode network: call model.eval() first.')
    for _, _, act in stages:
        if not isinstance(getattr(block, act), nn.ReLU):
            last = act == stages[-1][2]
            raise _refuse(path, block, f'`{act}` is {type(getattr(block, act)).__name__}, not ReLU: ' + (
                'the block must end with a ReLU after the addition (post-activation), which the carried '
                'non-negative input passes unchanged.' if last else
                'the carried non-negative input passes a ReLU unchanged, not another activation.'))

    convs = [getattr(block, conv) for conv, _, _ in stages]
    folded = [_fold(path, block, getattr(block, conv), getattr(block, norm), f'`{conv}`') for conv, norm, _ in stages]
    in_channels = convs[0].in_channels
    shortcut = _shortcut(path, block, in_channels)
    strided = [i for i, conv in enumerate(convs) if conv.stride != (1, 1)]
    if shortcut.stride == (1, 1) and not strided:
        sampler = len(convs) - 1
    elif len(strided) == 1 and convs[strided[0]].stride == shortcut.stride:
        sampler = strided[0]
    else:
        raise _refuse(path, block, f'conv strides {[c.stride for c in convs]} do not match the shortcut stride '
                                   f'{shortcut.stride} in a single conv.')
    like = folded[0][0]
    layers = OrderedDict()
    for i, (conv, (weight, bias), (conv_name, _, act_name)) in enumerate(zip(convs, folded, stages)):
        if i == sampler:
            kernel = _kernel(conv, shortcut.offsets, shortcut.tap_weight, like)
            what = f'the pixels its shortcut reads (offsets {shortcut.offsets} from stride x output)'
        else:
            kernel = _kernel(conv, [(0, 0)], 1.0, like)
            what = 'the pixel under each output (a Dirac tap)'
        if kernel is None:
            raise _refuse(path, block, f'`{conv_name}` ({conv!r}) has no kernel tap on {what}.')
        groups = conv.groups
        if i == len(convs) - 1:
            if groups != 1:
                raise _refuse(path, block, f'its last conv `{conv_name}` is grouped; the shortcut must reach every '
                                           'output channel.')
            weight = torch.cat([weight, shortcut.channel_map[:, :, None, None] * kernel], dim=1)
            bias = bias + shortcut.bias
        else:
            if groups != 1:
                per_group = conv.in_channels // groups
                if i == 0 or per_group != conv.out_channels // groups or in_channels % per_group:
                    raise _refuse(path, block, f'`{conv_name}` has {groups} groups of {per_group} input and '
                                               f'{conv.out_channels // groups} output channels; the {in_channels} '
                                               'carried channels fit only as extra groups of equal in/out size '
                                               'after the first conv.')
            weight, bias, groups = _carry(weight, bias, groups, kernel, in_channels, extra_inputs=i > 0)
        new = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            new.bias.copy_(bias)
        layers[conv_name] = new
        layers[act_name if act_name not in layers else f'{act_name}{i + 1}'] = nn.ReLU(inplace=True)  # one per conv
    return ExactPlainBlock(layers, even_input=shortcut.even_input, name=path)


class _BlockTracer(fx.Tracer):
    """Traces a whole model with its supported blocks as single calls."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in BRANCHES or super().is_leaf_module(m, module_qualified_name)


def _sign_source(node: fx.Node, model: nn.Module) -> Tuple[bool, str]:
    """(whether ``node`` is non-negative, what produced it), walking back through sign-preserving ops."""
    while True:
        if node.op == 'call_module':
            module = model.get_submodule(node.target)
            if isinstance(module, (nn.ReLU, nn.ReLU6)) or type(module) in BRANCHES:
                return True, node.target
            if not isinstance(module, _SIGN_PRESERVING):
                return False, f'`{node.target}` ({type(module).__name__})'
        elif node.op == 'call_function':
            if node.target in (F.relu, torch.relu, torch.relu_, F.relu6):
                return True, node.name
            if node.target not in (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
                return False, f'`{node.name}` ({getattr(node.target, "__name__", node.target)})'
        elif node.op == 'call_method' and node.target in ('relu', 'relu_'):
            return True, node.name
        else:
            return False, 'the model input' if node.op == 'placeholder' else f'`{node.name}`'
        node = node.args[0]


def _check_inputs_non_negative(model: nn.Module) -> None:
    try:
        graph = _BlockTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means the check cannot be made
        raise ExactConversionError(
            f'{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {str(e)[:150]}); the '
            'conversion needs its graph to check that every block input is non-negative.') from e
    for node in graph.nodes:
        if node.op == 'call_module' and type(model.get_submodule(node.target)) in BRANCHES:
            non_negative, source = _sign_source(node.args[0], model)
            if not non_negative:
                raise _refuse(node.target, model.get_submodule(node.target),
                              f'its input comes from {source} and can be negative; the carried channels pass the '
                              'ReLUs unchanged only if the input is non-negative (e.g. the output of a ReLU).')


def _check_no_other_shortcuts(model: nn.Module) -> None:
    inside = set()
    for path, module in model.named_modules():
        if type(module) in BRANCHES:
            inside.update(id(m) for m in module.modules())
    for path, module in model.named_modules():
        cls = type(module)
        if id(module) in inside or cls.__module__.startswith('torch.') or \
                f'{cls.__module__}.{cls.__qualname__}' in NOT_SHORTCUT_CLASSES:
            continue
        count = shortcut_additions(module)
        if count or (count is None and get_rule(module) is not None):
            raise _refuse(path, module, f'a residual block the exact conversion does not handle: it converts '
                                        f'{_SUPPORTED} only '
                                        '(pre-activation blocks and linear bottlenecks cannot be: their carried '
                                        'input can be negative, and a ReLU would cut it). Its shortcut-free twin '
                                        '(make_plain) trained with JointRD removes it instead.')


def exact_plain(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose timm or torchvision BasicBlock / Bottleneck blocks are replaced by
    :class:`ExactPlainBlock` (the RM operation, see the module docstring): no shortcut addition left, the same
    output as the eval-mode ``model`` up to float rounding. The stem and head are kept as they are. ``model`` is not
    modified. Raises :class:`ExactConversionError` naming the block when a block cannot be converted exactly."""
    _check_no_other_shortcuts(model)
    blocks = [(path, module) for path, module in model.named_modules() if type(module) in BRANCHES]
    if not blocks:
        raise ExactConversionError(f'{type(model).__name__} has none of {_SUPPORTED}: there is no shortcut the '
                                   'conversion removes.')
    converted = {path: _convert_block(path, block) for path, block in blocks}
    _check_inputs_non_negative(model)
    plain = copy.deepcopy(model)
    for path, block in converted.items():
        parent, _, name = path.rpartition('.')
        setattr(plain.get_submodule(parent), name, block)
    return plain.eval()


def _count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def exact_conversion_report(model: nn.Module, plain: nn.Module, input_size: Optional[int] = None,
                            seed: int = 0) -> Dict:
    """``model`` next to its conversion ``plain``: blocks converted, parameters, FLOPs at batch 1, and the max abs
    difference of their outputs on one random input (``model`` BN-folded, as deployed; the relative error divides
    it by the largest output). ``input_size``: the side of the square input (default: the model's config)."""
    chans, height, width = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))
    chans = input_channels(model) or chans  # a model built with in_chans other than its config's
    if input_size:
        height = width = input_size
    x = torch.randn(2, chans, height, width, generator=torch.Generator().manual_seed(seed))
    teacher = fold_for_deployment(model)[0]
    try:
        with torch.no_grad():
            reference, output = teacher(x), plain.eval()(x)
    except AssertionError as e:  # an average-pool block given an odd input size
        raise ExactConversionError(str(e)) from e
    error = (output - reference).abs().max().item()
    blocks = [(path, m) for path, m in plain.named_modules() if isinstance(m, ExactPlainBlock)]
    return dict(
        blocks=len(blocks), even_input_blocks=[path for path, m in blocks if m.even_input],
        input_size=[chans, height, width],
        params=dict(residual=_count_parameters(model), plain=_count_parameters(plain)),
        flops=dict(residual=count_flops(teacher, (chans, height, width)),
                   plain=count_flops(plain, (chans, height, width))),
        max_abs_error=error, relative_error=error / max(reference.abs().max().item(), 1e-12))
