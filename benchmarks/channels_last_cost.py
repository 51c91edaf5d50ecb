"""A runner option's training step against the default, side by side in one run: channels_last (NHWC) against the
contiguous layout, or torch.compile against eager. The same methods and pair as benchmarks/training_cost.py (its
``make_step``), every method both ways, all interleaved, medians. The runner's ``channels_last`` and ``compile``
fields (docs/jointrd.md) are off by default; these pages are what those defaults rest on for the device measured.

    python benchmarks/channels_last_cost.py --arch resnet56_cifar resnet18_cifar --threads 1 --clock cpu
    python benchmarks/channels_last_cost.py --variant compile --arch resnet20_cifar --threads 1 --clock cpu
Writes benchmarks/results/training_cost_channels_last.{json,md,png} (training_cost_compile.* for compile).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import pyplot  # noqa: E402
from training_cost import make_step, measure_each_arch, run_header, scattered, step_arguments  # noqa: E402

METHODS = ('plain CE (twin alone)', 'Hinton KD', 'JointRD + fade (default recipe)')
# variant: (name of the default, name of the variant, page, what the variant does to make_step, warm-up rounds)
VARIANTS = {
    'channels_last': ('contiguous', 'channels_last', 'training_cost_channels_last', dict(channels_last=True), 1),
    'compile': ('eager', 'compiled', 'training_cost_compile', dict(compile_backend='inductor'), 3),
}


def measure(arch: str, args) -> dict:
    from jointrd_timm.deploy.latency import compare_latency, paired_ratio
    base_name, name, _, change, warmup = VARIANTS[getattr(args, 'variant', 'channels_last')]
    steps = {f'{m} | {way}': make_step(m, arch, args.batch, args.size, **(change if way == name else {}))
             for m in METHODS for way in (base_name, name)}
    timed = compare_latency(steps, repeats=args.repeats, warmup=warmup, inference=False,
                            clock=time.process_time if args.clock == 'cpu' else time.perf_counter)
    rows = {}
    for m in METHODS:
        base, other = timed[f'{m} | {base_name}'], timed[f'{m} | {name}']
        paired = paired_ratio(other['times_ms'], base['times_ms'])  # round by round: both ways under one load
        rows[m] = {f'{base_name}_ms': base['median_ms'], f'{base_name}_iqr_ms': base['iqr_ms'],
                   f'{name}_ms': other['median_ms'], f'{name}_iqr_ms': other['iqr_ms'],
                   'ratio': paired['median'], 'ratio_iqr': paired['iqr'],
                   'noisy': scattered(paired['median'], paired['iqr']),
                   f'{base_name}_times_ms': base['times_ms'], f'{name}_times_ms': other['times_ms']}
    return rows


_WHAT = {
    'channels_last': ('Training step in channels_last', 'channels_last: the models (teacher included) and the batch '
                      'converted once before the run. Below 1: channels_last is faster.'),
    'compile': ('Training step under torch.compile', 'compiled: `runner.compile_modules` with the inductor backend '
                '(what `runner.compile: true` does), the compilation done in the warm-up rounds, which are not timed. '
                'Below 1: compiled is faster.'),
}


def lines_for(results: dict, meta: dict, args) -> list:
    variant = getattr(args, 'variant', 'channels_last')
    base_name, name, _, _, warmup = VARIANTS[variant]
    title, what = _WHAT[variant]
    lines = [f'# {title}: batch {args.batch}, {args.size} px', '',
             run_header(meta, args.clock)
             + f', median of {args.repeats} full training steps (forward, backward, SGD) per method, both ways, all '
             f'interleaved, after {"one warm-up round" if warmup == 1 else f"{warmup} warm-up rounds"}. {what} The '
             'ratio, where the record holds the steps, is the median of the per-round ratios (both ways of a round ran '
             'under the same load), with their IQR.', '']
    for arch, rows in results.items():
        lines += [f'## {arch} pair', '', f'| method | {base_name} ms (IQR) | {name} ms (IQR) | {name} / '
                  f'{base_name} |', '|---|---|---|---|']
        for m, r in rows.items():
            spread = f' (IQR {r["ratio_iqr"]:.2f})' if r.get('ratio_iqr') is not None else ''
            ratio = 'unmeasured (IQR > 25 % of the median)' if r['noisy'] else f'{r["ratio"]:.2f}x{spread}'
            lines.append(f'| {m} | {r[base_name + "_ms"]:.0f} ({r[base_name + "_iqr_ms"]:.0f}) | '
                         f'{r[name + "_ms"]:.0f} ({r[name + "_iqr_ms"]:.0f}) | {ratio} |')
        lines.append('')
    return lines


def _plot(results, path, variant='channels_last'):
    base_name, name = VARIANTS[variant][:2]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * sum(len(r) for r in results.values())))
    labels = [f'{arch}: {m}' for arch, rows in results.items() for m in rows]
    ax.barh(labels, [r['ratio'] for rows in results.values() for r in rows.values()])
    ax.axvline(1.0, color='k', lw=0.8)
    ax.set_xlabel(f'training step time, {name} / {base_name} (median)')
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format='png')
    plt.close(fig)


def main():
    parser = step_arguments(__doc__)
    parser.add_argument('--variant', choices=sorted(VARIANTS), default='channels_last')
    parser.add_argument('--name', default=None, help='page name (default: the variant\'s page)')
    args = parser.parse_args()
    args.name = args.name or VARIANTS[args.variant][2]
    measure_each_arch(args, measure, lines_for, lambda results, path: _plot(results, path, args.variant))


if __name__ == '__main__':
    main()
