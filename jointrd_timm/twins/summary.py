"""``jointrd derive``: what the twin of a model is: shortcuts removed, parameters and FLOPs, rules used."""
from typing import Callable, List, Optional

import timm
import torch

from .derive import make_plain
from .verify import count_shortcut_additions

__all__ = ['describe_twin', 'list_twins', 'count_flops']


def list_twins() -> List[str]:
    return timm.list_models('plain_*')


def count_flops(model: torch.nn.Module, input_size) -> int:
    """Multiply-accumulates x 2 of one forward at batch 1 (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, *input_size))
    return counter.get_total_flops()


def describe_twin(name: str, keep_projection_shortcuts: bool = False, input_size: Optional[int] = None,
                  build: Optional[Callable[[str], torch.nn.Module]] = None) -> str:
    """The twin of the residual architecture ``name`` (a ``plain_`` prefix is read as its residual model), in lines
    for the user: shortcut additions, parameters and FLOPs (at ``input_size``, else the model's configured size) of
    both, what was removed and re-initialised, the rules used. ``build``: the residual model from its name (default:
    timm's ``create_model``, the name checked against timm's list first; ``jointrd derive`` passes one that builds
    torchvision names too)."""
    if name.startswith('plain_'):
        name = name[len('plain_'):]
    if build is None:
        if name not in timm.list_models():
            close = timm.list_models(f'*{name}*')[:5]
            raise ValueError(f'Unknown timm model {name!r}.' + (f' Did you mean one of {close}?' if close else ''))
        build = timm.create_model
    teacher = build(name)
    twin = make_plain(build(name), keep_projection_shortcuts=keep_projection_shortcuts)
    report = twin.plain_report
    chans, h, w = teacher.pretrained_cfg.get('input_size', (3, 224, 224))
    if input_size:
        h = w = input_size
    t_params, p_params = (sum(p.numel() for p in m.parameters()) for m in (teacher, twin))
    t_flops, p_flops = count_flops(teacher, (chans, h, w)), count_flops(twin, (chans, h, w))
    lines = [
        f'twin of {name}: plain_{name}' + (' (keeping projection shortcuts)' if keep_projection_shortcuts else ''),
        f'  shortcut additions: {count_shortcut_additions(teacher)} -> {count_shortcut_additions(twin)} '
        f'({report.shortcuts_removed} removed, {len(report.kept_projections)} projections kept)',
        f'  parameters: {t_params / 1e6:.3f} M -> {p_params / 1e6:.3f} M ({p_params / t_params:.3f}x)',
        f'  FLOPs at {h}x{w}: {t_flops / 1e9:.3f} G -> {p_flops / 1e9:.3f} G ({p_flops / max(1, t_flops):.3f}x)',
        f'  removed modules: {len(report.removed_modules)}' +
        (f' (e.g. {", ".join(report.removed_modules[:3])})' if report.removed_modules else ''),
        f'  re-initialised for training without shortcuts: {len(report.reinitialised)}',
        '  rules:',
    ]
    for rule, count in sorted(report.blocks_by_rule.items()):
        lines.append(f'    {rule} x{count}: {report.rule_descriptions[rule]}')
    return '\n'.join(lines)
