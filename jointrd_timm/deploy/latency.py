"""Latency of several models measured side by side: interleaved runs, warm-up, medians.

Timings on a shared machine drift; interleaving (model A, B, C, A, B, C, ... in a rotating order) exposes every
model to the same drift, and the median of many repeats resists outliers. Report ratios from one call; the ratio
of two runners is best read per round (:func:`paired_ratio`): both ran back to back, under the same load.
"""
import contextlib
import random
import statistics
import time
from typing import Callable, Dict, Sequence

import torch

__all__ = ['compare_latency', 'paired_ratio', 'bootstrap_median_interval']


def compare_latency(runners: Dict[str, Callable[[], object]], repeats: int = 30, warmup: int = 5,
                    inference: bool = True, clock: Callable[[], float] = time.perf_counter) -> Dict[str, Dict]:
    """``runners``: name -> a no-argument callable doing one inference (or, with ``inference=False``, one training
    step: autograd stays on), run interleaved. ``clock``: wall time by default; ``time.process_time`` counts the
    CPU time of this process instead (all its threads), which other jobs on a shared machine barely change.
    Returns name -> dict(median_ms, iqr_ms, samples, times_ms), ``times_ms`` the samples in round order."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f'compare_latency needs repeats >= 1 and warmup >= 0 (got {repeats}, {warmup}): the medians '
                         'are of the timed repeats.')
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
        median, iqr = _median_iqr(values)
        result[name] = dict(median_ms=median, iqr_ms=iqr, samples=len(values), times_ms=list(values))
    return result


def _median_iqr(values: Sequence[float]) -> tuple:
    q = statistics.quantiles(values, n=4) if len(values) >= 4 else [min(values), 0, max(values)]
    return statistics.median(values), q[2] - q[0]


def bootstrap_median_interval(values: Sequence[float], level: float = 0.95, draws: int = 4000,
                              seed: int = 0) -> tuple:
    """Percentile-bootstrap interval of the median of ``values`` (resampled with replacement ``draws`` times, seeded:
    the same values give the same interval)."""
    if len(values) < 2:
        raise ValueError(f'a bootstrap interval needs at least 2 values, got {len(values)}.')
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    tail = (1 - level) / 2
    return medians[int(tail * (draws - 1))], medians[int(round((1 - tail) * (draws - 1)))]


def paired_ratio(times_ms: Sequence[float], reference_ms: Sequence[float], level: float = 0.95) -> Dict[str, float]:
    """The ratio of two runners of one :func:`compare_latency` call, round by round: the median and the IQR of
    ``times_ms[r] / reference_ms[r]``, and the ``level`` bootstrap interval of that median (``low``, ``high``). A load
    that drifts slowly (from round to round) slows both samples of a round alike and leaves these ratios alone;
    scatter from one step to the next stays in them, which the IQR and the interval show."""
    if len(times_ms) != len(reference_ms) or len(times_ms) < 2:
        raise ValueError(f'paired_ratio needs the same number of rounds (at least 2) on both sides, got '
                         f'{len(times_ms)} and {len(reference_ms)}.')
    ratios = [a / b for a, b in zip(times_ms, reference_ms)]
    median, iqr = _median_iqr(ratios)
    low, high = bootstrap_median_interval(ratios, level)
    return dict(median=median, iqr=iqr, low=low, high=high)
