"""Deployment truth: what the shortcut-free twin buys over its residual model, measured side by side.

    python benchmarks/deploy_bench.py            # about 15 minutes on 2 CPU cores

1. Latency and activation memory (analysed and measured) of residual vs twin, batch 1 and 16: resnet18/34/50 and
   regnetx_002, mobilenetv2_050, efficientnet_b0, convnext_atto at 224 px; CIFAR resnet56 at 32 px.
2. The reviewers' missing baseline: resnet50 channel-pruned with Torch-Pruning (L2 magnitude, uniform ratio found by
   bisection so its FLOPs match plain_resnet50's) vs plain_resnet50, same table (untrained weights: speed and memory
   only). Its memory is analysed, not measured (a fresh process cannot rebuild the pruned net by name).
3. The exact RM conversion (``jointrd_timm.deploy.exact``, no training, extra channels) vs its residual model, for
   resnet18, resnet50 and resnet56_cifar (``--exact-only`` measures just these rows into the existing record).
Writes benchmarks/results/deploy_bench.{json,md,png}.
"""
import json
import argparse
from pathlib import Path

import timm
import torch

import jointrd_timm  # noqa: F401
from jointrd_timm.deploy.bench import DEFAULT_PAIRS, bench_models, markdown, run_bench
from jointrd_timm.deploy.fold import fold_for_deployment
from jointrd_timm.twins.summary import count_flops
from report import pyplot, write_report

ROOT = Path(__file__).resolve().parents[1]


def pruned_resnet50_matching(target_flops: float):
    import torch_pruning as tp
    x = torch.randn(1, 3, 224, 224)
    lo, hi = 0.0, 0.5
    for _ in range(8):
        ratio = (lo + hi) / 2
        model = timm.create_model('resnet50').eval()
        pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[model.fc])
        pruner.step()
        flops = count_flops(model, (3, 224, 224))
        if flops > target_flops:
            lo = ratio
        else:
            hi = ratio
    return model, ratio, flops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--models', nargs='*', default=DEFAULT_PAIRS)
    parser.add_argument('--exact', nargs='*', default=EXACT_MODELS, help='residual models to convert exactly')
    parser.add_argument('--exact-only', action='store_true',
                        help='measure only the exact-conversion rows, into the existing record')
    args = parser.parse_args()
    out = ROOT / 'benchmarks/results'
    if args.exact_only:
        report = json.loads((out / 'deploy_bench.json').read_text())
        torch.set_num_threads(args.threads)
        report['exact_conversion'] = exact_rows(args.exact, args.repeats, args.threads)
        report['meta']['exact_command'] = f'python benchmarks/deploy_bench.py --exact-only --threads {args.threads}'
        report['meta']['exact_threads'] = args.threads
        write_report('deploy_bench', report, page(report), lambda path: plot(report, path), out)
        return
    report = run_bench(args.models, (1, 16), args.repeats, args.threads)
    twin = timm.create_model('plain_resnet50')
    twin_flops = count_flops(twin, (3, 224, 224))
    pruned, ratio, flops = pruned_resnet50_matching(twin_flops)
    row = bench_models({'pruned': fold_for_deployment(pruned)[0], 'twin': fold_for_deployment(twin)[0]}, 224,
                       (1, 16), args.repeats, True, {'twin': 'plain_resnet50'})
    report['pruned_baseline'] = dict(pruning_ratio=ratio, flops=flops, twin_flops=twin_flops, **row)
    report['exact_conversion'] = exact_rows(args.exact, args.repeats, args.threads)
    report['meta']['exact_threads'] = args.threads
    report['meta']['command'] = 'python benchmarks/deploy_bench.py'
    write_report('deploy_bench', report, page(report), lambda path: plot(report, path), out)


EXACT_MODELS = ['resnet18', 'resnet50', 'resnet56_cifar']


def exact_rows(names, repeats: int, threads: int) -> list:
    """Each residual model (random weights, BN statistics made non-trivial) against its exact conversion, both
    folded, side by side: latency, analysed activation memory, parameters and FLOPs."""
    from jointrd_timm.deploy.bench import model_input_size
    from jointrd_timm.deploy.exact import exact_plain
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
        size = model_input_size(model)
        built = {'residual': fold_for_deployment(model)[0], 'exact': exact_plain(model)}
        row = bench_models(built, size, (1, 16), repeats, True, None)
        row['flops'] = {k: count_flops(m, (3, size, size)) for k, m in built.items()}
        rows.append(dict(teacher=name, **row))
        print(f'exact {name}: done', flush=True)
    return rows


def page(report) -> list:
    pruned = report['pruned_baseline']
    ratio, flops, twin_flops, row = pruned['pruning_ratio'], pruned['flops'], pruned['twin_flops'], pruned
    lines = ['# Residual model vs shortcut-free twin: latency and activation memory (CPU)', '',
             'Ratios are residual / twin (> 1: the twin is faster / lighter). Command: `python benchmarks/deploy_bench.py`.',
             '', markdown(report), '', '## Channel-pruned ResNet-50 vs plain_resnet50 (matched FLOPs)', '',
             f'Torch-Pruning L2-magnitude, uniform ratio {ratio:.3f}: {flops / 1e9:.2f} GFLOPs vs the twin\'s '
             f'{twin_flops / 1e9:.2f} GFLOPs (224 px). Ratios are pruned / twin.', '',
             '| batch | eager ms pruned / twin | ratio | ORT ms pruned / twin | ratio | act. memory analysed MB pruned / twin | ratio |',
             '|---|---|---|---|---|---|---|']
    for batch, r in row['batches'].items():
        m = r['memory_analysed_bytes']
        lines.append(f'| {batch} | {r["pruned/eager"]:.2f} / {r["twin/eager"]:.2f} | {r["speedup/eager"]:.2f}x | '
                     f'{r["pruned/onnxruntime"]:.2f} / {r["twin/onnxruntime"]:.2f} | {r["speedup/onnxruntime"]:.2f}x | '
                     f'{m["pruned"] / 2**20:.2f} / {m["twin"] / 2**20:.2f} | {r["memory_ratio_analysed"]:.2f}x |')
    if report.get('exact_conversion'):
        lines += ['', '## Exact RM conversion vs its residual model', '',
                  'The residual model converted by `jointrd_timm.deploy.exact.exact_plain` (carried channels: no '
                  'shortcut addition, the same outputs, no training; [docs/exact_conversion.md]'
                  '(../../docs/exact_conversion.md)), both folded. Ratios are residual / exact (> 1: the conversion '
                  'is faster / lighter). Compare the twin rows above: the twin removes the shortcuts without adding '
                  f'channels. {report["meta"].get("exact_threads", report["meta"]["threads"])} thread(s), '
                  f'{report["meta"]["repeats"]} interleaved runs; command: '
                  f'`{report["meta"].get("exact_command", report["meta"]["command"])}`.', '',
                  '| residual model | batch | params M residual / exact | GFLOPs residual / exact | eager ms residual / '
                  'exact | ratio | ORT ms residual / exact | ratio | act. memory analysed MB residual / exact | ratio |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for r in report['exact_conversion']:
            for batch, b in r['batches'].items():
                m = b['memory_analysed_bytes']
                lines.append(
                    f'| {r["teacher"]} ({r["input_size"]} px) | {batch} | {r["params"]["residual"] / 1e6:.2f} / '
                    f'{r["params"]["exact"] / 1e6:.2f} | {r["flops"]["residual"] / 1e9:.3f} / '
                    f'{r["flops"]["exact"] / 1e9:.3f} | {b["residual/eager"]:.2f} / {b["exact/eager"]:.2f} | '
                    f'{b["speedup/eager"]:.2f}x | {b["residual/onnxruntime"]:.2f} / {b["exact/onnxruntime"]:.2f} | '
                    f'{b["speedup/onnxruntime"]:.2f}x | {m["residual"] / 2**20:.2f} / {m["exact"] / 2**20:.2f} | '
                    f'{b["memory_ratio_analysed"]:.2f}x |')
    return lines


def plot(report, path):
    plt = pyplot()
    names = [r['teacher'] for r in report['results']]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, title) in zip(axes, (('speedup/eager', 'latency ratio, eager'), ('speedup/onnxruntime', 'latency ratio, ONNX Runtime'),
                                       ('memory_ratio_analysed', 'activation memory ratio (analysed)'))):
        for offset, batch in ((-0.2, 1), (0.2, 16)):
            values = [(r['batches'].get(batch) or r['batches'][str(batch)])[key] for r in report['results']]
            ax.bar([i + offset for i in range(len(names))], values, width=0.4, label=f'batch {batch}')
        ax.axhline(1.0, color='k', lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha='right', fontsize=8)
        ax.set_title(f'{title}: residual / twin', fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')
    plt.close(fig)


if __name__ == '__main__':
    main()
