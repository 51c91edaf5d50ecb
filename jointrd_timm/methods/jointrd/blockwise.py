"""Teacher-forced block targets (``JointRDConfig.block_loss_weight``, docs/jointrd.md): each of the twin's blocks
is run on the input its teacher block received in the teacher's own forward, and trained to give that teacher
block's output.

Why: a twin started from its teacher loses its shortcuts by the fade; a block then has to carry by its branch alone
what ``branch + shortcut`` carried. The only signal that tells it so in JointRD comes back through the whole plain
chain above it (and through the teacher tails of its stage's hybrid path). Here every block gets the signal where
it is needed, all blocks at once and independently of the depth: with the teacher's input x_b and output y_b of
block b (no gradient),

    L_block = 1/B * sum_b  mean((S_b(x_b) - y_b)^2) / mean(y_b^2)

(the means over the whole batch: in a distributed run the denominator is averaged over the processes,
:func:`global_mean`, so that the loss and its gradient are the one-process ones; the twin block S_b at its current
shortcut scale, in train mode; a relative error, so that blocks of every size weigh alike; at the start of a fade a
teacher-started twin block differs from its teacher block only by its BN's batch statistics). The gradient of a term
reaches block b's own parameters only. The twin's BN running statistics are not updated by these forwards (they
describe the twin's own features, which it is evaluated with); its BN layers normalise the teacher's features with
their batch statistics, as in the twin's own forward.

The pairs are the teacher's shortcut blocks (the modules a shortcut rule knows) and the twin's modules of the same
names: a fading twin's blocks or a plain twin's, whichever the twin is.
"""
from typing import List, Tuple

import torch
from torch import nn

from ...twins.rules import get_rule
from ..base import call_on_buffer_copies

__all__ = ['BlockTargets', 'block_pairs', 'global_mean']


def block_pairs(teacher: nn.Module, student: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(name, teacher block, twin block) of every outermost shortcut block of ``teacher`` that ``student`` has a
    module of the same name for, in forward order. Raises ValueError when there is none."""
    pairs, taken = [], []
    student_modules = dict(student.named_modules())
    for name, module in teacher.named_modules():
        if not name or get_rule(module) is None or any(name.startswith(t + '.') for t in taken):
            continue
        if name in student_modules:
            pairs.append((name, module, student_modules[name]))
            taken.append(name)
    if not pairs:
        raise ValueError(f'block_loss_weight: the teacher ({type(teacher).__name__}) has no shortcut block that the '
                         f'twin ({type(student).__name__}) has a module of the same name for; train the twin of the '
                         "teacher (timm.create_model('plain_<teacher>')) or set block_loss_weight to 0.")
    return pairs


class _Capture:
    """Forward hook on a teacher block: records its (args, kwargs, output), detached copies, while ``enabled``."""

    def __init__(self, name: str):
        self.name, self.enabled, self.value = name, False, None

    def __call__(self, module, args, kwargs, output):
        if not self.enabled:
            return
        if not isinstance(output, torch.Tensor):
            raise TypeError(f'block_loss_weight: teacher block {self.name} ({type(module).__name__}) returns '
                            f'{type(output).__name__}, not a tensor; its twin cannot be given a block target.')
        # copies: the teacher's later in-place ops (an inplace ReLU on the next block's sum) would change views
        copy = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
        self.value = (tuple(map(copy, args)), {k: copy(v) for k, v in kwargs.items()}, copy(output))


class BlockTargets:
    """The teacher-forced block loss of one teacher/twin pair (module docstring). A plain object, not a module:
    it holds references to blocks both models own, and hooks on the teacher's.

    Use: ``with targets.recording(): teacher(x)``, then ``targets.loss()`` (the captures are dropped after it)."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        self.pairs = block_pairs(teacher, student)
        self.captures = [_Capture(name) for name, _, _ in self.pairs]
        self.handles = [t.register_forward_hook(c, with_kwargs=True)
                        for (_, t, _), c in zip(self.pairs, self.captures)]

    def recording(self) -> '_Recording':
        return _Recording(self.captures)

    def clear(self) -> None:
        for c in self.captures:
            c.value = None

    def loss(self) -> torch.Tensor:
        """L_block over the blocks recorded by the last teacher forward (each twin block in its own mode)."""
        missing = [c.name for c in self.captures if c.value is None]
        if missing:
            self.clear()
            raise RuntimeError(f'block_loss_weight: teacher blocks {missing[:3]} did not run in the recorded teacher '
                               'forward, so their twins have no target.')
        errors, sizes = [], []
        try:
            for (_, _, block), capture in zip(self.pairs, self.captures):
                args, kwargs, target = capture.value
                out = call_on_buffer_copies(block, args, kwargs)
                target = target.float()
                errors.append(((out.float() - target) ** 2).mean())
                sizes.append(target.pow(2).mean())
        finally:
            self.clear()
        return (torch.stack(errors) / global_mean(torch.stack(sizes)).clamp_min(1e-12)).mean()


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """``values`` (one per block, no gradient) averaged over the processes of a distributed run (each holds an equal
    share of the batch: the runner splits batches), else as they are. The relative error's denominator is the whole
    batch's, so that the loss is a mean over samples and its gradient, averaged by DDP, is the one-process gradient
    of the same batch (a per-process denominator would weigh each share by its own size)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


class _Recording:
    def __init__(self, captures: List[_Capture]):
        self.captures = captures

    def __enter__(self):
        for c in self.captures:
            c.enabled, c.value = True, None

    def __exit__(self, *exc):
        for c in self.captures:
            c.enabled = False
        return False

