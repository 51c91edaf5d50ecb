"""Dirac parametrisation of a twin's convolutions, and its exact fold back to plain convs.

Zagoruyko & Komodakis, "DiracNets: Training Very Deep Neural Networks Without Skip-Connections", 2017, as used by
the JointRD reference for its ImageNet students: ``W_eff = alpha * delta + beta * W`` with ``delta`` the identity
kernel (centre tap 1 from output channel o to input channel o, within each group, for the first min(in, out)
channels), ``alpha`` per output channel initialised to 1 and ``beta`` (per output channel) to 0.1. A conv at init
is thus close to an identity map: the shortcut lives inside the weights, and folding it leaves a plain conv.
``apply_dirac(model, 0.0, 1.0)`` starts each conv as its plain weight instead (a teacher's, once transferred), with
an identity scale that training can grow.

Implemented with torch.nn.utils.parametrize; ``fold_dirac`` writes the effective weights back into plain convs.
DiracNets exclude ``alpha`` and ``beta`` from weight decay; :func:`no_weight_decay_names` lists them for an optimizer
built by hand. The runner's SGD (one parameter group) decays them as any other parameter.
"""
import math
from typing import List

import torch
from torch import nn
from torch.nn.utils import parametrize

from .rules import get_rule, record_model_args

__all__ = ['DiracWeight', 'apply_dirac', 'check_dirac_init', 'fold_dirac', 'has_dirac', 'no_weight_decay_names',
           'DIRAC_INIT']

DIRAC_INIT = (1.0, 0.1)  # DiracNets' (alpha_init, beta_init)


def dirac_delta(weight: torch.Tensor, groups: int) -> torch.Tensor:
    out_channels, in_per_group, kh, kw = weight.shape
    out_per_group = out_channels // groups
    delta = torch.zeros_like(weight)
    for o in range(out_channels):
        i = o % out_per_group
        if i < in_per_group:
            delta[o, i, kh // 2, kw // 2] = 1.0
    return delta


class DiracWeight(nn.Module):
    """The parametrisation ``W -> alpha * delta + beta * W`` of one conv's weight."""

    def __init__(self, weight: torch.Tensor, groups: int, alpha_init: float = 1.0, beta_init: float = 0.1):
        super().__init__()
        out_channels = weight.shape[0]
        self.register_buffer('delta', dirac_delta(weight.detach(), groups), persistent=False)
        like = dict(dtype=weight.dtype, device=weight.device)  # beside the weight: a CUDA or meta model too
        self.alpha = nn.Parameter(torch.full((out_channels, 1, 1, 1), alpha_init, **like))
        self.beta = nn.Parameter(torch.full((out_channels, 1, 1, 1), beta_init, **like))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.delta + self.beta * weight


def _block_convs(model: nn.Module):
    """The plain Conv2d layers inside blocks that a rule handled (stem and head convs stay as they are)."""
    seen = set()
    for _, block in model.named_modules():
        if get_rule(block) is None:
            continue
        for name, conv in block.named_modules():
            if type(conv) is nn.Conv2d and id(conv) not in seen and conv.kernel_size[0] == conv.kernel_size[1]:
                seen.add(id(conv))
                yield conv


def check_dirac_init(alpha_init, beta_init) -> None:
    """Refuse a Dirac start that is not two finite numbers with ``beta_init`` != 0 (the weight would not reach the
    output, and a teacher's weight could not be written into it), naming the value."""
    for name, value in (('alpha_init', alpha_init), ('beta_init', beta_init)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f'Dirac {name} must be a finite number, got {value!r}.')
    if beta_init == 0:
        raise ValueError('Dirac beta_init must not be 0: it scales the conv weight (alpha_init, beta_init) = (0, 1) '
                         'starts each conv as its plain weight.')


def apply_dirac(model: nn.Module, alpha_init: float = DIRAC_INIT[0], beta_init: float = DIRAC_INIT[1]) -> nn.Module:
    """Dirac-parametrise every square ``nn.Conv2d`` inside the model's (plain) blocks, in place. ``alpha_init``,
    ``beta_init``: DiracNets' (1, 0.1) by default; (0, 1) keeps each conv's weight as it is (a teacher's, once
    transferred) and adds a learnable identity scale starting at 0 (:func:`check_dirac_init` says what is
    refused)."""
    check_dirac_init(alpha_init, beta_init)
    convs = list(_block_convs(model))
    if not convs:
        raise ValueError(f'{type(model).__name__} has no nn.Conv2d inside a known block to Dirac-parametrise.')
    for conv in convs:
        parametrize.register_parametrization(conv, 'weight', DiracWeight(conv.weight, conv.groups, alpha_init, beta_init))
    return model


def has_dirac(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, 'weight') and isinstance(m.parametrizations.weight[0], DiracWeight)
               for m in model.modules())


def fold_dirac(model: nn.Module) -> nn.Module:
    """Replace every Dirac-parametrised weight by its effective value: a plain conv, same outputs.

    Not ``parametrize.remove_parametrizations``: that deletes the ``weight`` property from the generated
    ``ParametrizedConv2d`` class, which deep copies of the model share, so folding a copy would break the original.
    Here each module gets its original class back and a plain ``weight`` parameter."""
    for module in model.modules():
        if parametrize.is_parametrized(module, 'weight') and \
                any(isinstance(p, DiracWeight) for p in module.parametrizations.weight):
            with torch.no_grad():
                effective = module.weight.detach().clone()
            original_class = type(module).__bases__[0]
            del module._modules['parametrizations']
            module.__class__ = original_class
            module.register_parameter('weight', nn.Parameter(effective))
    record_model_args(model, dirac=False, dirac_init=None)
    return model


def no_weight_decay_names(model: nn.Module) -> List[str]:
    """The names of the Dirac scales (``alpha``, ``beta``) among ``model``'s parameters."""
    return [name for name, _ in model.named_parameters()
            if name.endswith(('weight.0.alpha', 'weight.0.beta'))]
