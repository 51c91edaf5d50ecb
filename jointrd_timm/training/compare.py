"""A residual teacher beside its twin: parameters, latency and activation memory measured side by side, and the
plot of a comparison. Shared by ``jointrd demo`` and ``jointrd distill``.

Measured by :func:`jointrd_timm.deploy.bench.measure_models` (the one deployment measurement of the package) on the
deployed form of each model (BatchNorm folded): eager PyTorch latency, interleaved runs; activation memory analysed
at the smallest batch size.
"""
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['measure_models', 'plot_comparison']


def measure_models(models: Dict[str, nn.Module], input_chw: Tuple[int, int, int], batches: Sequence[int] = (1, 16),
                   latency_repeats: int = 50) -> Dict:
    """Parameters, median latency (ms) per batch size and activation memory (MB, batch 1) of each model, in the
    layout the demo and ``jointrd distill`` report: :func:`jointrd_timm.deploy.bench.measure_models` on the deployed
    (folded) models, eager. With models ``teacher`` and ``twin`` (in that order), ``speedup`` is teacher / twin
    latency per batch size."""
    from ..deploy.bench import measure_models as measure
    measured = measure(models, input_chw, batches, repeats=latency_repeats, warmup=min(5, latency_repeats),
                       channels_last=False, fold=True, memory_batches=(min(batches),))
    rows = measured['batches']
    latency = {b: {name: rows[b][f'{name}/eager'] for name in models} for b in batches}
    result = dict(params=measured['params'], latency_ms=latency, latency_repeats=latency_repeats,
                  activation_memory_mb={k: v / 2 ** 20 for k, v in rows[min(batches)].get('memory_analysed_bytes',
                                                                                           {}).items()},
                  threads=torch.get_num_threads())
    if {'teacher', 'twin'} <= set(models):
        result['speedup'] = {b: latency[b]['teacher'] / latency[b]['twin'] for b in latency}
    return result


def plot_comparison(accuracy: Sequence[Tuple[str, float]], speedup: Dict[int, float], path: Path, title: str,
                    memory: Optional[Dict[str, float]] = None, memory_unit: str = 'MB') -> None:
    """Bars: test accuracy per model, teacher / twin latency per batch size, and (given) activation memory."""
    from ..extras import require
    require('matplotlib', 'the comparison plot').use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3 if memory else 2, figsize=(13 if memory else 9, 3.5))
    colors = ['#4c72b0', '#dd8452', '#55a868']
    axes[0].bar([label for label, _ in accuracy], [acc for _, acc in accuracy], color=colors[:len(accuracy)])
    axes[0].set_ylabel('test accuracy (%)')
    axes[0].set_ylim(max(0, min(acc for _, acc in accuracy) - 10), 100)
    axes[0].tick_params(axis='x', labelsize=8)
    axes[1].bar([f'batch {b}' for b in speedup], list(speedup.values()), color='#8172b2')
    axes[1].axhline(1.0, color='k', lw=0.8)
    axes[1].set_ylabel('teacher / twin latency')
    if memory:
        axes[2].bar(list(memory), list(memory.values()), color=colors[:len(memory)])
        axes[2].set_ylabel(f'activation memory, batch 1 ({memory_unit})')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
