"""``jointrd demo``: the whole story in a few minutes on an embedded real dataset.

1. a residual teacher (CIFAR-style ResNet) trained with cross-entropy;
2. its shortcut-free twin trained alone, same recipe and budget;
3. the twin trained with JointRD from the teacher, same recipe and budget;
the twin's convs Dirac-parametrised while training in 2 and 3 (the default recipe of recipe_ablation.md; folded
into plain convs before evaluation and saving; ``dirac=False`` for the reference JointRD recipe);
then a table (test accuracy, parameters, latency of twin vs teacher at batch 1 and 16, measured side by side)
and a plot. Default data: scikit-learn's 8x8 digits (shipped inside scikit-learn, 1437 train / 360 test).
"""
import json
import platform
import time
from pathlib import Path
from typing import Optional

import torch

__all__ = ['run_demo']

DEMO_ARCH = 'resnet32_cifar'


def _datasets(dataset: str):
    from .data import load_image_dataset
    if dataset == 'sklearn:digits':
        kwargs = dict(recipe='tensor', input_size=8, channels=1)
    else:
        kwargs = dict(recipe='cifar', input_size=32, channels=3)
    return (load_image_dataset(dataset, 'train', **kwargs), load_image_dataset(dataset, 'test', **kwargs),
            kwargs['channels'], kwargs['input_size'])


def run_demo(dataset: str = 'sklearn:digits', output_dir: str = 'runs/demo', epochs: Optional[int] = None,
             device: Optional[str] = None, arch: str = DEMO_ARCH, dirac: bool = True) -> dict:
    import timm
    from ..integrations import torchdistill as _registers  # noqa: F401
    from ..deploy.latency import compare_latency
    from .checkpoint import load_weights
    from .configs import make_config
    from .runner import train

    out = Path(output_dir)
    train_set, test_set, channels, size = _datasets(dataset)
    num_classes = train_set.num_classes
    epochs = epochs or (12 if dataset == 'sklearn:digits' else 5)
    common = dict(in_chans=channels, num_classes=num_classes)
    teacher = dict(key='timm_model', kwargs=dict(model_name=arch, **common))
    twin = dict(key='timm_model', kwargs=dict(model_name=f'plain_{arch}', dirac=dirac, **common))
    recipe = dict(epochs=epochs, batch_size=64, lr=0.05, weight_decay=5e-4)
    start = time.time()
    results = {}
    print(f'[1/3] teacher {arch}: cross-entropy, {epochs} epochs')
    results['teacher'] = train(make_config(train_set, test_set, teacher, 'ce', output_dir=str(out / 'teacher'),
                                           **recipe), device=device)
    print(f'[2/3] twin plain_{arch} alone: cross-entropy, {epochs} epochs')
    results['twin alone'] = train(make_config(train_set, test_set, twin, 'ce', output_dir=str(out / 'twin-alone'),
                                              **recipe), device=device)
    print(f'[3/3] twin plain_{arch} with JointRD from the teacher, {epochs} epochs')
    pair = dict(key='jointrd_model', kwargs=dict(
        teacher=dict(model_name=arch, checkpoint=str(out / 'teacher' / 'model'), **common),
        student=dict(model_name=f'plain_{arch}', dirac=dirac, **common),
        jointrd=dict(eta_min=0.5, eta_horizon_fraction=0.3)))
    results['twin + JointRD'] = train(make_config(train_set, test_set, pair, 'jointrd',
                                                  output_dir=str(out / 'twin-jointrd'), **recipe), device=device)
    train_seconds = time.time() - start

    models = {'teacher': load_weights(timm.create_model(arch, **common), out / 'teacher' / 'model').eval(),
              'twin': load_weights(timm.create_model(f'plain_{arch}', **common), out / 'twin-jointrd' / 'model').eval()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    latency = {}
    for batch in (1, 16):
        x = torch.randn(batch, channels, size, size)
        timed = compare_latency({name: (lambda m=m: m(x)) for name, m in models.items()}, repeats=50, warmup=5)
        latency[batch] = {name: timed[name]['median_ms'] for name in models}

    deployed = {k: r.get('test_acc_folded', r['test_acc']) for k, r in results.items()}  # Dirac folded
    rows = [('teacher (residual)', deployed['teacher'], params['teacher'], 'teacher'),
            ('twin alone (plain)', deployed['twin alone'], params['twin'], 'twin'),
            ('twin + JointRD (plain)', deployed['twin + JointRD'], params['twin'], 'twin')]
    lines = [f'# jointrd demo: {arch} on {dataset}, {epochs} epochs per run, last-epoch test accuracy', '',
             f'Twin trained {"with Dirac-parametrised convs (folded before evaluation)" if dirac else "as plain convs"}.',
             '',
             '| model | test acc % | params | latency b1 ms | latency b16 ms |', '|---|---|---|---|---|']
    for label, acc, n, kind in rows:
        lines.append(f'| {label} | {acc:.2f} | {n / 1e6:.3f} M | {latency[1][kind]:.2f} | {latency[16][kind]:.2f} |')
    speedup = {b: latency[b]['teacher'] / latency[b]['twin'] for b in latency}
    lines += ['', f'Twin vs teacher latency (eager PyTorch, {torch.get_num_threads()} threads, medians of 50 '
                  f'interleaved runs): {speedup[1]:.2f}x at batch 1, {speedup[16]:.2f}x at batch 16. '
                  f'Training took {train_seconds:.0f} s on {platform.processor() or platform.machine()}.']
    table = '\n'.join(lines)
    summary = dict(dataset=dataset, arch=arch, epochs=epochs, dirac=dirac, results=results, params=params,
                   latency_ms=latency, speedup=speedup, train_seconds=train_seconds)
    (out / 'summary.json').write_text(json.dumps(summary, indent=1))
    (out / 'summary.md').write_text(table + '\n')
    _plot(rows, speedup, out / 'summary.png', f'{arch} on {dataset}')
    print(table)
    print(f'\nwrote {out / "summary.md"}, {out / "summary.png"}')
    return summary


def _plot(rows, speedup, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar([r[0].split(' (')[0] for r in rows], [r[1] for r in rows], color=['#4c72b0', '#dd8452', '#55a868'])
    ax1.set_ylabel('test accuracy (%)')
    ax1.set_ylim(max(0, min(r[1] for r in rows) - 10), 100)
    ax1.tick_params(axis='x', labelsize=8)
    ax2.bar([f'batch {b}' for b in speedup], list(speedup.values()), color='#8172b2')
    ax2.axhline(1.0, color='k', lw=0.8)
    ax2.set_ylabel('teacher / twin latency')
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
