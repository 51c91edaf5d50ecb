"""Training step in channels_last (NHWC) against the default contiguous layout, side by side in one run: the same
methods and pair as benchmarks/training_cost.py (its ``make_step``), every method in both layouts, all interleaved,
medians. The runner's ``channels_last`` field (docs/jointrd.md) is off by default; this page is what that default
rests on for the device it was measured on.

    python benchmarks/channels_last_cost.py --arch resnet56_cifar resnet18_cifar --threads 1 --clock cpu
Writes benchmarks/results/training_cost_channels_last.{json,md,png}.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import pyplot  # noqa: E402
from training_cost import make_step, measure_each_arch, run_header, scattered, step_arguments  # noqa: E402

METHODS = ('plain CE (twin alone)', 'Hinton KD', 'JointRD + fade (default recipe)')
LAYOUTS = ('contiguous', 'channels_last')


def measure(arch: str, args) -> dict:
    from jointrd_timm.deploy.latency import compare_latency, paired_ratio
    steps = {f'{m} | {layout}': make_step(m, arch, args.batch, args.size, layout == 'channels_last')
             for m in METHODS for layout in LAYOUTS}
    timed = compare_latency(steps, repeats=args.repeats, warmup=1, inference=False,
                            clock=time.process_time if args.clock == 'cpu' else time.perf_counter)
    rows = {}
    for m in METHODS:
        base, nhwc = timed[f'{m} | contiguous'], timed[f'{m} | channels_last']
        paired = paired_ratio(nhwc['times_ms'], base['times_ms'])  # round by round: both layouts under one load
        rows[m] = dict(contiguous_ms=base['median_ms'], contiguous_iqr_ms=base['iqr_ms'],
                       channels_last_ms=nhwc['median_ms'], channels_last_iqr_ms=nhwc['iqr_ms'],
                       ratio=paired['median'], ratio_iqr=paired['iqr'], noisy=scattered(paired['median'], paired['iqr']),
                       contiguous_times_ms=base['times_ms'], channels_last_times_ms=nhwc['times_ms'])
    return rows


def lines_for(results: dict, meta: dict, args) -> list:
    lines = [f'# Training step in channels_last: batch {args.batch}, {args.size} px', '',
             run_header(meta, args.clock)
             + f', median of {args.repeats} full training steps (forward, backward, SGD) per method and layout, all '
             'interleaved, after one warm-up round. channels_last: the models (teacher included) and the batch '
             'converted once before the run. Below 1: channels_last is faster. The ratio, where the record holds the '
             'steps, is the median of the per-round ratios (both layouts of a round ran under the same load), with '
             'their IQR.', '']
    for arch, rows in results.items():
        lines += [f'## {arch} pair', '', '| method | contiguous ms (IQR) | channels_last ms (IQR) | channels_last / '
                  'contiguous |', '|---|---|---|---|']
        for m, r in rows.items():
            spread = f' (IQR {r["ratio_iqr"]:.2f})' if r.get('ratio_iqr') is not None else ''
            ratio = 'unmeasured (IQR > 25 % of the median)' if r['noisy'] else f'{r["ratio"]:.2f}x{spread}'
            lines.append(f'| {m} | {r["contiguous_ms"]:.0f} ({r["contiguous_iqr_ms"]:.0f}) | '
                         f'{r["channels_last_ms"]:.0f} ({r["channels_last_iqr_ms"]:.0f}) | {ratio} |')
        lines.append('')
    return lines


def _plot(results, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * sum(len(r) for r in results.values())))
    labels = [f'{arch}: {m}' for arch, rows in results.items() for m in rows]
    ax.barh(labels, [r['ratio'] for rows in results.values() for r in rows.values()])
    ax.axvline(1.0, color='k', lw=0.8)
    ax.set_xlabel('training step time, channels_last / contiguous (median)')
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format='png')
    plt.close(fig)


def main():
    parser = step_arguments(__doc__)
    parser.add_argument('--name', default='training_cost_channels_last')
    args = parser.parse_args()
    measure_each_arch(args, measure, lines_for, _plot)


if __name__ == '__main__':
    main()
