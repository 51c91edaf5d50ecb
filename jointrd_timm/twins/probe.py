"""Where a fading twin's signal goes: per-block measurements taken during training.

A deep twin started from its teacher can lose its accuracy as its shortcuts fade out (benchmarks/results/
deep_twin_diagnostics.md). :class:`FadeProbe` records, for every fading block of a model, in the forward passes
that run while it is attached:

* ``branch_rms``: the root mean square of the residual branch (what the twin keeps);
* ``shortcut_rms``: the root mean square of the scaled shortcut ``s * shortcut`` (what the fade removes);
* ``shortcut_share``: ``shortcut_rms / (branch_rms + shortcut_rms)``: how much of the block's output still comes
  through its shortcut. A fade that works drives this to 0 with ``s``; a network that keeps the share up by
  shrinking its branches while ``s`` falls (BatchNorm makes that free) loses everything at ``s = 0``;
* ``output_rms``: the root mean square of the block's output;

and, with :meth:`FadeProbe.gradient_norms` after a backward, each block's parameter-gradient norm; with
:func:`batchnorm_drift`, how far each BatchNorm's batch statistics are from its running ones.

The probe swaps the fade's ``addcmul`` for a recording submodule and swaps it back on :meth:`close` (or at the
end of a ``with`` block): the computation is the same op, the outputs are bit for bit those without the probe.
"""
from collections import defaultdict
from typing import Dict, List

import torch
from torch import nn

from .fade import FadingGraphBlock, _is_fade, rms

__all__ = ['FadeProbe', 'batchnorm_drift']

_PROBE = 'jointrd_fade_probe'


class _Recorder(nn.Module):
    """``addcmul(branch, shortcut, s)`` that also records the two terms' sizes in ``stats``."""

    def __init__(self, stats: Dict[str, List[float]]):
        super().__init__()
        self.stats = stats

    def forward(self, branch: torch.Tensor, shortcut: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = torch.addcmul(branch, shortcut, scale)
        with torch.no_grad():
            b = rms(branch).item()
            s = rms(shortcut.float() * scale.float()).item()
            self.stats['branch_rms'].append(b)
            self.stats['shortcut_rms'].append(s)
            self.stats['shortcut_share'].append(s / (b + s) if b + s > 0 else 0.0)
        return out


class FadeProbe:
    """Records the per-block sizes of a fading model's forward passes (see the module docstring).

    ``stats()`` returns, per block name, the mean of each quantity over the forwards since the last ``reset()``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.blocks = {n: m for n, m in model.named_modules() if isinstance(m, FadingGraphBlock)}
        if not self.blocks:
            raise ValueError(f'{type(model).__name__} has no fading blocks to probe: build it with '
                             "timm.create_model('plain_<arch>', shortcut_fade=True).")
        self._stats = {n: defaultdict(list) for n in self.blocks}
        self._hooks = []
        for name, block in self.blocks.items():
            block.add_module(_PROBE, _Recorder(self._stats[name]))
            for node in block.graph.nodes:
                if _is_fade(node):
                    node.op, node.target = 'call_module', _PROBE
            block.recompile()
            self._hooks.append(block.register_forward_hook(self._output_hook(name)))

    def _output_hook(self, name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                self._stats[name]['output_rms'].append(rms(output).item())
        return hook

    def reset(self) -> None:
        for stats in self._stats.values():
            stats.clear()

    def stats(self) -> Dict[str, Dict[str, float]]:
        return {n: {k: sum(v) / len(v) for k, v in s.items() if v} for n, s in self._stats.items()}

    def gradient_norms(self) -> Dict[str, float]:
        """Each block's parameter-gradient norm (call after a backward)."""
        out = {}
        for name, block in self.blocks.items():
            grads = [p.grad.detach().float().pow(2).sum() for p in block.parameters() if p.grad is not None]
            out[name] = float(torch.stack(grads).sum().sqrt()) if grads else 0.0
        return out

    def close(self) -> None:
        """Put the fade's own op back: the model is as it was before the probe."""
        for hook in self._hooks:
            hook.remove()
        for block in self.blocks.values():
            for node in block.graph.nodes:
                if node.op == 'call_module' and node.target == _PROBE:
                    node.op, node.target = 'call_function', torch.addcmul
            block.recompile()
            delattr(block, _PROBE)
        self._hooks = []

    def __enter__(self) -> 'FadeProbe':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def batchnorm_drift(model: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """For every BatchNorm of ``model``: how far the batch statistics of ``x`` are from its running ones, as the
    mean over channels of ``|mean_batch - mean_running| / sqrt(var_running + eps) + |log(var_batch / var_running)|``
    (0 when the running statistics describe the batch exactly). Runs ``model`` once under no_grad in train mode
    with the running statistics left as they were (momentum 0 for that forward)."""
    found, hooks, saved = {}, [], {}

    def hook_for(name):
        def hook(module, args, output):
            v = args[0].detach().float()
            dims = [d for d in range(v.dim()) if d != 1]
            mean, var = v.mean(dims), v.var(dims, unbiased=False)
            rm, rv = module.running_mean.float(), module.running_var.float()
            found[name] = float(((mean - rm).abs() / (rv + module.eps).sqrt()
                                 + ((var + module.eps) / (rv + module.eps)).log().abs()).mean())
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            hooks.append(m.register_forward_hook(hook_for(name)))
            saved[name] = (m, m.momentum)
            m.momentum = 0.0
    was_training = model.training
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
        for m, momentum in saved.values():
            m.momentum = momentum
    return found
