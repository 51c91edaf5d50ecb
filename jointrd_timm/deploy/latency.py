"""Latency of several models measured side by side: interleaved runs, warm-up, medians.

Timings on a shared machine drift; interleaving (model A, B, C, A, B, C, ... in a rotating order) exposes every
model to the same drift, and the median of many repeats resists outliers. Report ratios from one call.
"""
import contextlib
import statistics
import time
from typing import Callable, Dict

import torch

__all__ = ['compare_latency']


def compare_latency(runners: Dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 5,
                    inference: bool = True, clock: Callable[[], float] = time.perf_counter) -> Dict[str, Dict]:
    """``runners``: name -> a no-argument callable doing one inference (or, with ``inference=False``, one training
    step: autograd stays on), run interleaved. ``clock``: wall time by default; ``time.process_time`` counts the
    CPU time of this process instead (all its threads), which other jobs on a shared machine barely change.
    Returns name -> dict(median_ms, iqr_ms, samples)."""
    names = list(runners)
    with torch.inference_mode() if inference else contextlib.nullcontext():
        for _ in range(warmup):
            for name in names:
                runners[name]()
        samples = {name: [] for name in names}
        for r in range(repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                start = clock()
                runners[name]()
                samples[name].append(1e3 * (clock() - start))
    result = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) >= 4 else [min(values), 0, max(values)]
        result[name] = dict(median_ms=statistics.median(values), iqr_ms=q[2] - q[0], samples=len(values))
    return result
