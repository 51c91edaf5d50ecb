"""Teacher -> twin weight transfer: strict about everything except the shortcut branches the twin dropped."""
import logging
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from ..io import with_module_versions
from .dirac import DiracWeight

__all__ = ['load_teacher_weights', 'teacher_state_for_twin', 'pretrained_teacher_filter']

_logger = logging.getLogger(__name__)
_DIRAC_ORIGINAL = '.parametrizations.weight.original'
_DIRAC_SCALES = ('.weight.0.alpha', '.weight.0.beta')  # a Dirac parametrisation's identity and weight scales


def _dirac_parametrisations(twin: nn.Module) -> Dict[str, DiracWeight]:
    found = {}
    for name, module in twin.named_modules():
        params = getattr(getattr(module, 'parametrizations', None), 'weight', None)
        if params is not None and isinstance(params[0], DiracWeight):
            found[f'{name}{_DIRAC_ORIGINAL}'] = params[0]
    return found


def teacher_state_for_twin(twin: nn.Module, teacher_state_dict: Mapping[str, torch.Tensor],
                           keep_shapes: Sequence[str] = ()) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The twin's state dict made from a residual teacher's (see :func:`load_teacher_weights`), and the teacher
    keys left over (all of removed shortcut branches).

    ``keep_shapes``: keys whose teacher tensor is passed on unchanged even if its shape differs from the twin's
    (timm's pretrained loader adapts the first conv to ``in_chans`` and drops a classifier of another width after
    this mapping)."""
    report = getattr(twin, 'plain_report', None)
    if report is None:
        raise ValueError(f'{type(twin).__name__} is not a twin: build it with make_plain() or timm.create_model("plain_...").')
    removed_prefixes = tuple(f'{name}.' for name in report.removed_modules)
    dirac = _dirac_parametrisations(twin)
    twin_state = twin.state_dict()
    scales = [key for key in twin_state if key.endswith(_DIRAC_SCALES)]
    source_of = {key: key.replace(_DIRAC_ORIGINAL, '.weight') for key in twin_state if key not in scales}
    missing = [key for key, source in source_of.items() if source not in teacher_state_dict]
    used = set(source_of.values())
    leftover = [key for key in teacher_state_dict if key not in used]
    unexpected = [key for key in leftover if not key.startswith(removed_prefixes)]
    mismatched = [f'{key}: twin {tuple(twin_state[key].shape)} vs teacher {tuple(teacher_state_dict[src].shape)}'
                  for key, src in source_of.items() if src in teacher_state_dict and src not in keep_shapes
                  and twin_state[key].shape != teacher_state_dict[src].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f'{len(missing)} twin tensors have no teacher tensor (e.g. {missing[:3]})')
        if unexpected:
            problems.append(f'{len(unexpected)} teacher tensors match nothing in the twin and are not removed '
                            f'shortcut branches (e.g. {unexpected[:3]})')
        if mismatched:
            problems.append(f'{len(mismatched)} shapes differ (e.g. {mismatched[:3]})')
        raise ValueError(
            f'This state dict is not the teacher of {type(twin).__name__}: ' + '; '.join(problems) +
            '. Load the weights of the architecture the twin was derived from (same depth, widths, num_classes).')
    new_state = {}
    for key, src in source_of.items():
        value = teacher_state_dict[src]
        if key in dirac and value.shape == twin_state[key].shape:
            param = dirac[key]
            value = (value.to(param.delta.dtype) - param.alpha.detach() * param.delta) / param.beta.detach()
        new_state[key] = value
    # the Dirac scales the stored weights were solved with: a state dict with every twin key loads strictly
    new_state.update((key, twin_state[key]) for key in scales)
    return new_state, leftover


def load_teacher_weights(twin: nn.Module, teacher_state_dict: Union[Mapping[str, torch.Tensor], nn.Module]) -> List[str]:
    """Copy a residual teacher's weights into its twin (made by :func:`make_plain`).

    Every twin tensor must come from the teacher with the same shape; the only teacher tensors left over may be
    those of the shortcut modules that make_plain removed. For a Dirac-parametrised twin the stored weight is set so
    that the effective conv equals the teacher's (``W = (W_T - alpha * delta) / beta``).

    Returns:
        The teacher keys that were dropped (all belong to removed shortcut branches); they are also logged.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped keys, when the state dict is not this twin's teacher.
    """
    if isinstance(teacher_state_dict, nn.Module):
        teacher_state_dict = teacher_state_dict.state_dict()
    if not isinstance(twin, nn.Module) or not isinstance(teacher_state_dict, Mapping):
        raise TypeError(f'load_teacher_weights(twin, teacher): the twin must be a model and the teacher a model or its '
                        f'state dict, got {type(twin).__name__} and {type(teacher_state_dict).__name__}. For a timm '
                        "name, create it first: timm.create_model('<arch>.<tag>', pretrained=True).")
    new_state, leftover = teacher_state_for_twin(twin, teacher_state_dict)
    # the teacher's module versions (a module such as torchvision's MNASNet reads its own when loading)
    twin.load_state_dict(with_module_versions(new_state, twin, versions_of=teacher_state_dict), strict=False)
    _log_dropped(leftover)
    return leftover


def _log_dropped(leftover: List[str]) -> None:
    if leftover:
        _logger.info('load_teacher_weights: dropped %d teacher tensors of removed shortcut branches: %s',
                     len(leftover), ', '.join(leftover))


def _names(value) -> Tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def pretrained_teacher_filter(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn`` of every ``plain_*`` model: a state dict with exactly the twin's keys (a
    published twin, or a fading twin's teacher) passes unchanged; a residual teacher's goes through
    :func:`teacher_state_for_twin` (strict but for the removed shortcut branches), and the keys dropped are kept
    on ``model.plain_report.teacher_keys_dropped`` and logged. timm then adapts the first conv and classifier and
    loads the result strictly (a state dict that is neither passes unchanged, so timm's own error names the
    keys that do not fit)."""
    if set(state_dict) == set(model.state_dict()):
        return state_dict
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    keep = [f'{name}.{p}' for name in _names(cfg.get('first_conv')) + _names(cfg.get('classifier'))
            for p in ('weight', 'bias')]
    try:
        new_state, leftover = teacher_state_for_twin(model, state_dict, keep_shapes=keep)
    except ValueError:  # neither the twin's nor its teacher's weights: timm's strict load says what does not fit
        return state_dict
    model.plain_report.teacher_keys_dropped = leftover
    _log_dropped(leftover)
    return new_state
