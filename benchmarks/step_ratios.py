"""A few of training_cost's methods side by side with many more repeats, read as ratios with a bootstrap confidence
interval: for the goals that training_cost's page cannot decide at its repeats (a difference of a few percent, where
a single step's time scatters by more than that on a shared machine).

Every pair of the given methods (the later one over the earlier one) is read round by round (both steps of a round
ran under the same load): the median of the per-round ratios, their IQR, and a 95 % percentile-bootstrap interval
of that median over the rounds. A goal of training_cost (same method and reference) is met when the whole interval
is at or below its limit, missed when the whole interval is above it, and undecided otherwise.

    python benchmarks/step_ratios.py --arch resnet56_cifar resnet18_cifar --repeats 40 --threads 1 --clock cpu \
        --methods 'plain CE (twin alone)' 'fading twin alone' 'residual model CE (the teacher alone)'
Writes benchmarks/results/<name>.{json,md,png} (default name training_cost_ratios).
"""
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import pyplot, write_report  # noqa: E402
from jointrd_timm.deploy.latency import paired_ratio  # noqa: E402
from training_cost import (GOALS, METHODS, interval_verdict, make_step, measure_each_arch, run_header,  # noqa: E402
                           step_arguments)

DEFAULT_METHODS = ('plain CE (twin alone)', 'fading twin alone', 'residual model CE (the teacher alone)')
LEVEL = 0.95


def verdict(low: float, high: float, limit: Optional[float]) -> str:
    """A goal ``ratio <= limit`` judged by the interval of the ratio (training_cost's rule); '' without a goal."""
    return '' if limit is None else interval_verdict(low, high, limit)


def pair_rows(times: dict) -> list:
    """Every pair of the measured methods (later over earlier, in the order given): the per-round ratio's median,
    IQR and bootstrap interval, and the verdict on the training_cost goal for that pair, if there is one."""
    goals = {(method, reference): limit for _, method, reference, limit, kind in GOALS if kind == 'time'}
    names, rows = list(times), []
    for i, reference in enumerate(names):
        for method in names[i + 1:]:
            p = paired_ratio(times[method], times[reference], LEVEL)
            limit = goals.get((method, reference))
            rows.append(dict(method=method, reference=reference, median=p['median'], iqr=p['iqr'], low=p['low'],
                             high=p['high'], rounds=len(times[method]), limit=limit,
                             verdict=verdict(p['low'], p['high'], limit)))
    return rows


def fade_op_overhead(arch: str, batch: int, size: int, repeats: int, clock=time.process_time) -> dict:
    """What a fading twin's step computes beyond the residual model's, timed op by op at this pair's shapes: per
    faded shortcut, ``addcmul(branch, shortcut, s)`` (out of place) in the forward and ``grad * s`` in the backward,
    where the residual block adds in place (timm's ``x += shortcut``) and its backward passes the gradient through.
    Both sums over all faded shortcuts of one step (each at its block's output shape), interleaved, ``repeats`` times;
    returns their medians (ms) and the difference."""
    import timm
    import jointrd_timm  # noqa: F401
    from jointrd_timm.twins.fade import FadingGraphBlock, _is_fade
    twin = timm.create_model(f'plain_{arch}', num_classes=10, shortcut_fade=True)
    shapes = []  # one per faded shortcut, at its block's output shape

    def faded(block):
        return sum(1 for n in block.graph.nodes if _is_fade(n))
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.extend([tuple(o.shape)] * faded(m)))
             for m in twin.modules() if isinstance(m, FadingGraphBlock)]
    with torch.no_grad():
        twin(torch.randn(batch, 3, size, size))
    for h in hooks:
        h.remove()
    s = torch.tensor(0.5)
    tensors = [(torch.randn(shape), torch.randn(shape), torch.randn(shape)) for shape in shapes]

    def fade_ops():
        for branch, shortcut, grad in tensors:
            torch.addcmul(branch, shortcut, s)
            grad.mul(s)

    def residual_ops():  # adds the same shortcut again each round: the values grow linearly, far from overflow
        for branch, shortcut, _ in tensors:
            branch.add_(shortcut)
    samples = {'fade': [], 'residual': []}
    runners = {'fade': fade_ops, 'residual': residual_ops}
    for r in range(repeats + 1):
        for name in (list(runners) if r % 2 else list(runners)[::-1]):
            start = clock()
            runners[name]()
            if r:  # the first round warms up
                samples[name].append(1e3 * (clock() - start))
    fade, residual = statistics.median(samples['fade']), statistics.median(samples['residual'])
    return dict(shortcuts=len(shapes), fade_ops_ms=fade, residual_ops_ms=residual, extra_ms=fade - residual)


def measure(arch: str, args) -> dict:
    from jointrd_timm.deploy.latency import compare_latency
    steps = {m: make_step(m, arch, args.batch, args.size) for m in args.methods}
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    timed = compare_latency(steps, repeats=args.repeats, warmup=1, inference=False, clock=clock)
    times = {m: timed[m]['times_ms'] for m in args.methods}
    result = dict(times_ms=times, pairs=pair_rows(times))
    if 'fading twin alone' in times and 'plain CE (twin alone)' in times:
        ops = fade_op_overhead(arch, args.batch, args.size, max(args.repeats, 30), clock)
        ops['of_plain_step'] = ops['extra_ms'] / statistics.median(times['plain CE (twin alone)'])
        result['fade_ops'] = ops
    return result


def lines_for(results: dict, meta: dict, args) -> list:
    lines = [f'# Training step ratios with a confidence interval: batch {args.batch}, {args.size} px', '',
             run_header(meta, args.clock)
             + f'; {args.repeats} rounds, each running every method once (rotating order, after one warm-up round). '
             'Each pair is read round by round: the median of the per-round ratios, their IQR, and a '
             f'{LEVEL:.0%} percentile-bootstrap interval of that median. A goal of '
             '[training_cost.md](training_cost.md) is met when the whole interval is at or below its limit. The '
             'methods are those of training_cost.py (same pair, batch and step).', '']
    for arch, result in results.items():
        lines += [f'## {arch} pair', '', f'| ratio | median | IQR | {LEVEL:.0%} interval | rounds | goal | verdict |',
                  '|---|---|---|---|---|---|---|']
        for p in result['pairs']:
            goal = '' if p['limit'] is None else f'<= {p["limit"]:.2f}x'
            lines.append(f'| {p["method"]} / {p["reference"]} | {p["median"]:.3f}x | {p["iqr"]:.3f} | '
                         f'{p["low"]:.3f}x - {p["high"]:.3f}x | {p["rounds"]} | {goal} | {p["verdict"]} |')
        lines.append('')
    ops = {arch: r['fade_ops'] for arch, r in results.items() if 'fade_ops' in r}
    if ops:
        lines += ['## What the fade adds to the residual model\'s step, op by op', '',
                  'Mid-fade the fading twin computes the residual network; beyond it, per faded shortcut, one '
                  '`addcmul(branch, shortcut, s)` (out of place) where the residual block adds in place, and one '
                  '`grad * s` in the backward where the residual addition passes the gradient through. Timed alone at '
                  'the pair\'s shapes (the sums over one step\'s shortcuts, interleaved, medians), against the plain '
                  'twin\'s step of the run above. The fading twin\'s step is the residual model\'s plus this.', '',
                  '| pair | faded shortcuts | fade ops ms | residual additions ms | extra ms per step | '
                  'extra / plain twin step |', '|---|---|---|---|---|---|']
        for arch, o in ops.items():
            lines.append(f'| {arch} | {o["shortcuts"]} | {o["fade_ops_ms"]:.1f} | {o["residual_ops_ms"]:.1f} | '
                         f'{o["extra_ms"]:.1f} | {o["of_plain_step"]:.2%} |')
        lines.append('')
    return lines


def _plot(results, path):
    plt = pyplot()
    labels, medians, errors = [], [], [[], []]
    for arch, result in results.items():
        for p in result['pairs']:
            labels.append(f'{arch}: {p["method"]} / {p["reference"]}')
            medians.append(p['median'])
            errors[0].append(p['median'] - p['low'])
            errors[1].append(p['high'] - p['median'])
    fig, ax = plt.subplots(figsize=(10, 1 + 0.45 * len(labels)))
    ax.errorbar(medians, range(len(labels)), xerr=errors, fmt='o', capsize=4)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.axvline(1.0, color='k', lw=0.8)
    ax.set_xlabel(f'training step time ratio (median of per-round ratios, {LEVEL:.0%} bootstrap interval)')
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format='png')
    plt.close(fig)


def main():
    parser = step_arguments(__doc__)
    parser.set_defaults(repeats=40)
    parser.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS), choices=list(METHODS),
                        metavar='METHOD', help='methods of training_cost.py; every pair is compared')
    parser.add_argument('--name', default='training_cost_ratios', help='results file stem under benchmarks/results')
    parser.add_argument('--report-only', action='store_true', help='rewrite the page from the recorded steps')
    args = parser.parse_args()
    if args.report_only:  # the pairs recomputed from the recorded steps, the page describing the recorded run
        import json
        path = Path(__file__).resolve().parent / 'results' / f'{args.name}.json'
        if not path.is_file():
            parser.error(f'--report-only: no record {path}; run the benchmark first or give the --name of a record.')
        record = json.loads(path.read_text())
        meta, name = record['meta'], args.name
        args = parser.parse_args(shlex.split(meta['command'])[2:])
        args.name = name  # the record read, whatever name its command line gave (or left to the default)
        results = {arch: dict(r, pairs=pair_rows(r['times_ms'])) for arch, r in record['archs'].items()}
        write_report(args.name, dict(meta=meta, archs=results), lines_for(results, meta, args),
                     lambda png: _plot(results, png))
        return
    if len(args.methods) < 2 or args.repeats < 4:
        parser.error(f'need at least two methods (got {len(args.methods)}) and four rounds (--repeats, got '
                     f'{args.repeats}): every pair is read round by round.')
    measure_each_arch(args, measure, lines_for, _plot, methods=args.methods, repeats=args.repeats)

if __name__ == '__main__':
    main()
