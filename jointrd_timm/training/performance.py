"""How a run's models execute faster with the same function: ``runner.channels_last`` and ``runner.compile``.

``channels_last`` puts every model's 4-D weights and every 4-D input in NHWC memory format (the convs' fast layout
with cuDNN under mixed precision, and for oneDNN on many CPUs; off by default because what it saves depends on the
device: measure it). The function is the same; checkpoints and the saved model hold contiguous tensors.

``compile`` (:func:`compile_modules`) compiles, in place (``nn.Module.compile``: parameter names, checkpoints and
the saved model are unchanged), a plain model whole, and for a method module (JointRD, the fading student, the
adversarial methods) each top-level child of its twin and of its teacher: the stem, the stages and the head, which
both the twin's own forward and JointRD's stage split call. The methods' own Python (the fade's per-step scale, a
buffer that compiled code reads; the hybrid paths; lean memory's autograd functions; the discriminators' steps)
stays eager around them, so nothing in it breaks a graph, and the BN-folded teacher tails (custom autograd
functions) stay eager. Off by default: measured on CPU in benchmarks/results/training_cost_compile.md.
"""
from typing import List

import torch
from torch import nn

from ..methods import base as method_api

__all__ = ['compile_modules', 'to_channels_last']


def _channels_last_inputs(module: nn.Module, args: tuple):
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                 for a in args)


def compile_modules(module: nn.Module, backend='inductor') -> List[str]:
    """``torch.compile`` in place what a training step of ``module`` spends its time in (see the module docstring):
    the model whole, or for a method module each top-level child of its twin and teacher. Returns the names of the
    compiled modules. ``backend``: a torch.compile backend (True: inductor)."""
    backend = 'inductor' if backend is True else backend
    if not isinstance(module, method_api.TrainingMethod):
        module.compile(backend=backend)
        return ['model']
    compiled = []
    for role in ('student', 'teacher'):
        model = getattr(module, role, None)
        if not isinstance(model, nn.Module):
            continue
        for name, child in model.named_children():
            if any(True for _ in child.parameters()) or any(True for _ in child.children()):
                child.compile(backend=backend)
                compiled.append(f'{role}.{name}')
    return compiled


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` in place with its 4-D parameters and buffers in channels_last memory format, and a forward pre-hook
    that hands it its 4-D tensor arguments in that format (what ``runner.channels_last`` does)."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_inputs)
    return model
