"""The nearest alternatives to a twin, side by side, at the published-twin budget (one page per depth).

A user with a trained ResNet who wants a network without shortcuts can take: our recipe twin (teacher init, fade,
JointRD), the same twin trained alone, step-wise removal under a frozen teacher (Tailor, Weng et al. 2023), the
exact RM conversion (Meng et al.; no training, more channels: ``jointrd_timm.deploy.exact``), or keep the residual
net (trained for the same extra epochs: the control). The accuracies of the trained rows come from
``accuracy.py full``'s record (``benchmarks/results/full_cifar10_<ARCH>.json``, the same teacher and twin epochs);
the exact conversion is evaluated here on the same 10,000 test images and checked against the teacher. Three
architectures are deployed (the residual net, the plain twin, the exact conversion), each folded, and measured side
by side: parameters, FLOPs, analysed activation memory at batch 1 and 16, eager and ONNX Runtime latency.

    python benchmarks/alternatives.py --arch resnet56_cifar --epochs 4
    python benchmarks/alternatives.py --arch resnet56_cifar --report-only
Writes benchmarks/results/alternatives_<ARCH>.{json,md,png}.
"""
import argparse
import json
from pathlib import Path

import torch

from report import RESULTS, pyplot, save_figure, write_report

ROOT = Path(__file__).resolve().parents[1]
# row -> (the full_cifar10 row it reads, the deployed architecture)
ROWS = {'teacher (residual)': ('teacher', 'residual'),
        'our recipe twin': ('twin + JointRD', 'twin'),
        'twin alone': ('twin alone', 'twin'),
        'step-wise removal (Tailor)': ('step-wise removal', 'twin'),
        'exact conversion (RM)': (None, 'exact'),
        'residual control': ('control', 'residual')}


def trained_rows(arch: str, epochs: int) -> dict:
    """Test accuracy of each trained row at ``epochs`` twin epochs (the teacher at its own); the recipe twin is the
    JointRD row with the best held-out validation accuracy among the recipe and its variants."""
    record = json.loads((RESULTS / f'full_cifar10_{arch}.json').read_text())
    runs = [r for r in record['runs'] if 'test_acc' in r]
    out = {}
    for label, (row, _) in ROWS.items():
        if row is None:
            continue
        found = [r for r in runs if r['row'].split(',')[0] == row and (row == 'teacher' or r['epochs'] == epochs)]
        if found:
            best = max(found, key=lambda r: r.get('val_acc') or 0)
            out[label] = dict(test_acc=best['test_acc'], run=best['row'], epochs=best['epochs'],
                              recipe=best.get('recipe') or (record['meta']['recipe'] if 'JointRD' in row else None))
    return out


def exact_accuracy(arch: str, data: str) -> dict:
    """The exact conversion of the published teacher, evaluated on the test split, beside the teacher itself."""
    import timm
    from jointrd_timm.deploy.exact import exact_plain
    from jointrd_timm.io import load_weights, top1_accuracy
    from jointrd_timm.training.data import load_image_dataset
    teacher = load_weights(timm.create_model(arch, num_classes=10), ROOT / 'benchmarks/runs/full_cifar10' / arch /
                           'teacher' / 'model').eval()
    test = load_image_dataset(data, 'test', transform='cifar')
    exact = exact_plain(teacher)
    return dict(exact=top1_accuracy(exact, test), teacher=top1_accuracy(teacher, test), test_images=len(test))


def deployment(arch: str, repeats: int) -> dict:
    import timm
    import jointrd_timm  # noqa: F401
    from jointrd_timm.deploy.bench import bench_models
    from jointrd_timm.deploy.exact import exact_plain
    from jointrd_timm.deploy.fold import fold_for_deployment
    from jointrd_timm.twins.summary import count_flops
    torch.manual_seed(0)
    residual = timm.create_model(arch, num_classes=10).eval()
    for m in residual.modules():  # non-trivial BN statistics, so that folding is exercised as with trained weights
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 1.5)
    built = {'residual': fold_for_deployment(residual)[0],
             'twin': fold_for_deployment(timm.create_model(f'plain_{arch}', num_classes=10))[0],
             'exact': exact_plain(residual)}
    result = bench_models(built, 32, (1, 16), repeats, True, None)
    result['flops'] = {k: count_flops(m, (3, 32, 32)) for k, m in built.items()}
    return result


def lines_for(record: dict) -> list:
    meta, acc, dep = record['meta'], record['accuracy'], record['deployment']
    ex = record['exact']
    arch = meta['arch']
    rows = []
    for label, (_, kind) in ROWS.items():
        a = ex['exact'] if kind == 'exact' else acc.get(label, {}).get('test_acc')
        rows.append((label, kind, a))
    b1, b16 = dep['batches']['1'], dep['batches']['16']
    mib = 2 ** 20
    out = [f'# The nearest alternatives to a twin: {arch}, full CIFAR-10, {meta["epochs"]} twin epochs', '',
           f'Accuracy: last-epoch test accuracy on the {ex["test_images"]} test images of the runs of '
           f'[full_cifar10_{arch}.md](full_cifar10_{arch}.md) (teacher {acc["teacher (residual)"]["epochs"]} epochs, '
           f'every other row {meta["epochs"]} more epochs from it; the recipe twin is the JointRD run with the best '
           'held-out validation accuracy, its recipe named below). The exact conversion is the teacher converted by '
           '`jointrd_timm.deploy.exact.exact_plain` (no training), evaluated here: '
           f'{ex["exact"]:.2f} % against the teacher\'s {ex["teacher"]:.2f} % on the same images '
           f'(difference {ex["exact"] - ex["teacher"]:+.2f}). Deployment: each architecture folded (BN), '
           f'{meta["repeats"]} interleaved runs after warm-up, median, eager in channels_last and ONNX Runtime, '
           'activation memory analysed from the graph (`deploy.memory`), FLOPs at batch 1; one image is 32 px.', '',
           '| option | test acc % | params M | MFLOPs | act. memory b1 KB | act. memory b16 MB | eager ms b1 / b16 | '
           'ORT ms b1 / b16 |', '|---|---|---|---|---|---|---|---|']
    for label, kind, a in rows:
        acc_text = f'{a:.2f}' if a is not None else 'not run'
        run = acc.get(label, {}).get('run', '')
        shown = f'{label} (run: {run})' if ',' in run else label
        out.append(f'| {shown} | {acc_text} | {dep["params"][kind] / 1e6:.3f} | {dep["flops"][kind] / 1e6:.1f} | '
                   f'{b1["memory_analysed_bytes"][kind] / 1024:.0f} | {b16["memory_analysed_bytes"][kind] / mib:.2f} | '
                   f'{b1[kind + "/eager"]:.2f} / {b16[kind + "/eager"]:.2f} | '
                   f'{b1[kind + "/onnxruntime"]:.2f} / {b16[kind + "/onnxruntime"]:.2f} |')
    recipe = acc.get('our recipe twin', {}).get('recipe')
    out += ['', f'Recipe of the recipe twin: `{recipe}`.' if recipe else '', '', '## Which to choose', '']
    out += verdicts(rows, dep)
    return out


def verdicts(rows, dep) -> list:
    """What the table says, in words, read from its numbers."""
    acc = {label: a for label, _, a in rows if a is not None}
    kind = {label: k for label, k, _ in rows}
    mem = {k: dep['batches']['16']['memory_analysed_bytes'][k] for k in ('residual', 'twin', 'exact')}
    ort = {k: dep['batches']['1'][k + '/onnxruntime'] for k in ('residual', 'twin', 'exact')}
    plain = [label for label in acc if kind[label] == 'twin']
    best_plain = max(plain, key=lambda label: acc[label]) if plain else None
    lines = []
    if best_plain and 'exact conversion (RM)' in acc:
        gap = acc['exact conversion (RM)'] - acc[best_plain]
        lines.append(f'- **Accuracy**: the exact conversion keeps the teacher\'s accuracy with no training; the best '
                     f'trained twin ({best_plain}) is {abs(gap):.2f} points {"behind" if gap > 0 else "ahead of"} it.')
        exact_vs = mem['exact'] / mem['residual']
        how = ('its carried channels cost more than the shortcuts it removes' if exact_vs > 1.005 else
               'its carried channels take the place of the shortcuts it removes' if exact_vs > 0.995 else
               'it removes more than its carried channels add')
        lines.append(f'- **Activation memory** (batch 16): the twin needs {mem["twin"] / mem["residual"]:.2f}x the '
                     f'residual net\'s and {mem["twin"] / mem["exact"]:.2f}x the exact conversion\'s; the exact '
                     f'conversion needs {exact_vs:.2f}x the residual net\'s ({how}).')
        per_mb = {label: acc[label] / (mem[kind[label]] / 2 ** 20) for label in acc}
        top = max(per_mb, key=per_mb.get)
        others = ', '.join(f'{label} {per_mb[label]:.1f}' for label in ('exact conversion (RM)', best_plain)
                           if label != top)
        lines.append(f'- **Accuracy per MB of activation memory** (batch 16): highest for {top} '
                     f'({per_mb[top]:.1f} points per MB); {others}.')
        lines.append(f'- **Latency** (ONNX Runtime, batch 1): twin {ort["twin"]:.2f} ms, exact conversion '
                     f'{ort["exact"]:.2f} ms, residual {ort["residual"]:.2f} ms.')
        lines.append('- **So**: where the device\'s activation memory is the limit, the twin is the option that removes '
                     'the shortcuts\' memory, at the accuracy the table shows; where the teacher\'s accuracy must be '
                     'kept exactly and memory is not the limit, the exact conversion needs no training; the residual '
                     'net itself is the reference both are measured against.')
    return lines


def plot(record):
    def draw(path):
        plt = pyplot()
        dep, ex, acc = record['deployment'], record['exact'], record['accuracy']
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, (_, kind) in ROWS.items():
            a = ex['exact'] if kind == 'exact' else acc.get(label, {}).get('test_acc')
            if a is None:
                continue
            m = dep['batches']['16']['memory_analysed_bytes'][kind] / 2 ** 20
            ax.scatter(m, a, s=40)
            ax.annotate(label, (m, a), fontsize=7, xytext=(4, 2), textcoords='offset points')
        ax.set_xlabel('activation memory at batch 16, analysed (MB)')
        ax.set_ylabel('test accuracy (%)')
        ax.set_title(f'{record["meta"]["arch"]}: accuracy vs activation memory', fontsize=9)
        save_figure(fig, path, 120)
    return draw


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--arch', default='resnet56_cifar')
    p.add_argument('--epochs', type=int, default=None, help='twin epochs (default: the longest in the record)')
    p.add_argument('--data', default=str(ROOT.parent / 'shared/datasets/cifar10'))
    p.add_argument('--repeats', type=int, default=20)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--report-only', action='store_true')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    name = f'alternatives_{args.arch}'
    if args.report_only:
        record = json.loads((RESULTS / f'{name}.json').read_text())
        record['accuracy'] = trained_rows(args.arch, record['meta']['epochs'])
    else:
        full = json.loads((RESULTS / f'full_cifar10_{args.arch}.json').read_text())
        epochs = args.epochs or max(r['epochs'] for r in full['runs'] if r['row'] != 'teacher')
        record = dict(meta=dict(arch=args.arch, epochs=epochs, repeats=args.repeats, threads=args.threads),
                      accuracy=trained_rows(args.arch, epochs), exact=exact_accuracy(args.arch, args.data),
                      deployment=deployment(args.arch, args.repeats))
    record['deployment']['batches'] = {str(k): v for k, v in record['deployment']['batches'].items()}
    write_report(name, record, lines_for(record), plot(record))


if __name__ == '__main__':
    main()
