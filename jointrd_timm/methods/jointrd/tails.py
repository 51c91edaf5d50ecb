"""The frozen teacher's tails as the hybrid paths run them (``JointRDConfig.fold_teacher_bn``, docs/jointrd.md): a
copy of the teacher's stages with each BN folded into the conv before it (eval-mode BN is an affine map), whose
convs save nothing for the backward (the input gradient needs the weight, not the input) and whose ReLUs save a
bool mask instead of their output. Also the tap that reads a final pre-activation feature."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

__all__ = ['fold_frozen_stages']


class _InputGradConv(torch.autograd.Function):
    """A frozen conv: its backward returns the input gradient only, which needs the weight, not the input, so
    nothing is saved (aten's convolution saves the input whenever the input needs a gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        ctx.conv, ctx.input_shape = conv, x.shape
        return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # the transposed conv of the gradient (conv2d_input would materialise an input-sized tensor first); the
        # output padding recovers the input sizes the stride rounded away. Under autocast the forward ran in the
        # autocast dtype and the backward runs outside it: the weight follows the gradient
        c = ctx.conv
        spatial = ctx.input_shape[2:]
        padding = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for size, out, s, p, d, k in
                   zip(spatial, grad.shape[2:], c.stride, c.padding, c.dilation, c.kernel_size)]
        return F.conv_transpose2d(grad, c.weight.to(grad.dtype), None, c.stride, c.padding, padding, c.groups,
                                  c.dilation), None


class _MaskReLUFn(torch.autograd.Function):
    """ReLU saving a bool mask (a quarter of the float output it would save) for the backward, which multiplies by
    it: one pass over the gradient, where ``masked_fill`` needs the inverted mask and a copy first."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x)
        ctx.save_for_backward(y > 0)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mask, = ctx.saved_tensors
        return grad * mask


def _zero_padded(conv: nn.Module) -> bool:
    """A plain ``nn.Conv2d`` with explicit zero padding: what :class:`_InputGradConv` computes exactly."""
    return type(conv) is nn.Conv2d and conv.padding_mode == 'zeros' and not isinstance(conv.padding, str)


class _FrozenConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        if not _zero_padded(conv):
            raise ValueError(f'_FrozenConv computes an nn.Conv2d with explicit zero padding; got {conv!r} '
                             f"(padding_mode {conv.padding_mode!r}, padding {conv.padding!r}): leave that conv as it is.")
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return self.conv(x)
        return _InputGradConv.apply(x, self.conv)


class _MaskReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskReLUFn.apply(x) if x.requires_grad else torch.relu(x)


def _lean_frozen(stage: nn.Module) -> nn.Module:
    """``stage`` (a folded copy of frozen teacher modules) with its plain zero-padded convs and ReLUs replaced by
    the variants above, which compute the same and save less for an input-gradient backward."""
    for name, module in list(stage.named_modules()):
        if isinstance(module, nn.Conv2d) and _zero_padded(module) and not module.weight.requires_grad:
            replacement = _FrozenConv(module)
        elif type(module) is nn.ReLU:
            replacement = _MaskReLU()
        else:
            continue
        parent, _, child = name.rpartition('.')
        setattr(stage.get_submodule(parent) if parent else stage, child, replacement)
    return stage


def fold_frozen_stages(stages: nn.Module) -> Optional[List[nn.Module]]:
    """Each of ``stages`` (a frozen teacher's) as a BN-folded copy with lean convs and ReLUs; None where a stage
    cannot be traced by torch.fx (the stages then run as they are)."""
    try:
        return [_lean_frozen(fx_fuse(stage)) for stage in stages]
    except Exception:  # noqa: BLE001 (torch.fx raises many kinds); such a stage runs as it is, unfolded
        return None


class _InputCapture:
    """Forward pre-hook keeping a copy of a module's input (the pre-activation before an in-place ReLU)."""

    def __init__(self, module: nn.Module):
        self.values: List[torch.Tensor] = []
        self.enabled = False
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if self.enabled:
            self.values.append(args[0].clone())

    def pop(self) -> torch.Tensor:
        return self.values.pop()
