"""A residual teacher beside its twin: parameters, latency and activation memory measured side by side, and the
plot of a comparison. Shared by ``jointrd demo`` and ``jointrd distill``.

Latency: eager PyTorch, interleaved runs (:func:`~jointrd_timm.deploy.latency.compare_latency`). Activation memory:
analysed on the deployed form of each model (BatchNorm folded), one image
(:func:`~jointrd_timm.deploy.memory.analyze_activation_memory`).
"""
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ['measure_models', 'plot_comparison']


def measure_models(models: Dict[str, nn.Module], input_chw: Tuple[int, int, int], batches: Sequence[int] = (1, 16),
                   latency_repeats: int = 50) -> Dict:
    """Parameters, median latency (ms) per batch size and activation memory (MB, batch 1) of each model (eval
    mode). With models ``teacher`` and ``twin``, ``speedup`` is teacher / twin latency per batch size."""
    from ..deploy.fold import fold_for_deployment
    from ..deploy.latency import compare_latency
    from ..deploy.memory import analyze_activation_memory
    models = {name: m.eval() for name, m in models.items()}
    latency = {}
    for batch in batches:
        x = torch.randn(batch, *input_chw)
        timed = compare_latency({name: (lambda m=m: m(x)) for name, m in models.items()}, repeats=latency_repeats,
                                warmup=min(5, latency_repeats))
        latency[batch] = {name: timed[name]['median_ms'] for name in models}
    x = torch.randn(1, *input_chw)
    memory = {name: analyze_activation_memory(fold_for_deployment(m)[0], x).peak_bytes / 2 ** 20
              for name, m in models.items()}
    result = dict(params={name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
                  latency_ms=latency, activation_memory_mb=memory, latency_repeats=latency_repeats,
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
