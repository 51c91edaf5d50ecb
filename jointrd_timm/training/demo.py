"""``jointrd demo``: the whole story in a few minutes on an embedded real dataset.

1. a residual teacher (CIFAR-style ResNet) trained with cross-entropy;
2. its shortcut-free twin trained alone, same recipe, budget and ingredients;
3. the twin trained with JointRD from the teacher, same recipe, budget and ingredients;
then a table (test accuracy with the count of test images, parameters, activation memory and latency of twin vs
teacher at batch 1 and 16, measured side by side) and a plot of the same. Default data: scikit-learn's 8x8 digits (shipped inside scikit-learn, 1437 train / 360 test).

The twins are trained with a recipe of :mod:`jointrd_timm.recipes` (``recipe``: ``default``, ``reference``,
``dirac``, ...); both get the same ingredients, so their difference is what JointRD adds.
"""
import json
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from ..recipes import SCHEDULES, get_recipe

__all__ = ['run_demo']

DEMO_ARCH = 'resnet32_cifar'


def _datasets(dataset: str, limit: Optional[int] = None):
    from .data import load_image_dataset
    if dataset == 'sklearn:digits':
        kwargs = dict(transform='tensor', input_size=8, channels=1)
    else:
        kwargs = dict(transform='cifar', input_size=32, channels=3)
    return (load_image_dataset(dataset, 'train', limit=limit, **kwargs), load_image_dataset(dataset, 'test', **kwargs),
            kwargs['channels'], kwargs['input_size'])


def run_demo(dataset: str = 'sklearn:digits', output_dir: str = 'runs/demo', epochs: Optional[int] = None,
             device: Optional[str] = None, arch: str = DEMO_ARCH, recipe: str = 'default',
             limit: Optional[int] = None, latency_repeats: int = 50) -> dict:
    """Runs the three trainings into ``output_dir`` and writes summary.{json,md,png}; ``limit``: train images per
    run (a quick smoke run; default all); ``latency_repeats``: interleaved timed runs per model and batch size."""
    import timm
    from ..integrations import torchdistill as _registers  # noqa: F401
    from ..io import load_weights
    from .compare import measure_models, plot_comparison
    from .run_folder import deployed_accuracy
    from .configs import make_config
    from .runner import train

    out = Path(output_dir)
    train_set, test_set, channels, size = _datasets(dataset, limit)
    num_classes = train_set.num_classes
    twin_recipe = get_recipe(recipe)
    schedule = SCHEDULES['demo']
    epochs = epochs or (schedule.epochs if dataset == 'sklearn:digits' else 5)
    common = dict(in_chans=channels, num_classes=num_classes)
    teacher = dict(key='timm_model', kwargs=dict(model_name=arch, **common))
    teacher_ckpt = str(out / 'teacher' / 'model')
    twin_alone = twin_recipe.twin_alone_model(arch, teacher_ckpt, **common)
    pair = twin_recipe.jointrd_model(arch, teacher_ckpt, **common)
    budget = dict(schedule=schedule.replace(epochs=epochs))
    twin_budget = dict(schedule=twin_recipe.twin_schedule(budget['schedule']))  # both twins: the recipe's peak lr
    start = time.time()
    results = {}
    # a demo is rerun as a whole: each rerun replaces the three runs of the previous one (never a partial mix)
    run_args = dict(device=device, overwrite=True)
    print(f'[1/3] teacher {arch}: cross-entropy, {epochs} epochs')
    results['teacher'] = train(make_config(train_set, test_set, teacher, 'ce', output_dir=str(out / 'teacher'),
                                           **budget), **run_args)
    print(f'[2/3] twin plain_{arch} alone: cross-entropy, {epochs} epochs')
    results['twin alone'] = train(make_config(train_set, test_set, twin_alone, 'ce', output_dir=str(out / 'twin-alone'),
                                              **twin_budget), **run_args)
    print(f'[3/3] twin plain_{arch} with JointRD from the teacher, {epochs} epochs')
    results['twin + JointRD'] = train(make_config(train_set, test_set, pair, 'jointrd',
                                                  output_dir=str(out / 'twin-jointrd'), **twin_budget), **run_args)
    train_seconds = time.time() - start

    models = {'teacher': load_weights(timm.create_model(arch, **common), out / 'teacher' / 'model').eval(),
              'twin': load_weights(timm.create_model(f'plain_{arch}', **common), out / 'twin-jointrd' / 'model').eval()}
    measured = measure_models(models, (channels, size, size), latency_repeats=latency_repeats)
    params, latency, speedup = measured['params'], measured['latency_ms'], measured['speedup']

    deployed = {k: deployed_accuracy(r) for k, r in results.items()}
    memory_kb = {k: v * 1024 for k, v in measured['activation_memory_mb'].items()}
    rows = [('teacher (residual)', deployed['teacher'], params['teacher'], 'teacher'),
            ('twin alone (plain)', deployed['twin alone'], params['twin'], 'twin'),
            ('twin + JointRD (plain)', deployed['twin + JointRD'], params['twin'], 'twin')]
    n_test = len(test_set)
    lines = [f'# jointrd demo: {arch} on {dataset}, {epochs} epochs per run, last-epoch test accuracy', '',
             f'Twin recipe `{twin_recipe.id}`: {twin_recipe.description}; accuracy of the deployed (shortcut-free, '
             'folded) twin.',
             '',
             '| model | test acc % | test images right | params | activation memory b1 KB | latency b1 ms | '
             'latency b16 ms |', '|---|---|---|---|---|---|---|']
    for label, acc, n, kind in rows:
        lines.append(f'| {label} | {acc:.2f} | {round(acc * n_test / 100)} of {n_test} | {n / 1e6:.3f} M | '
                     f'{memory_kb[kind]:.1f} | {latency[1][kind]:.2f} | {latency[16][kind]:.2f} |')
    lines += ['', f'{n_test} test images: one image is {100 / n_test:.2f} points, so a difference of a few images '
                  'is no effect.',
              f'What the twin buys, against its teacher: activation memory (analysed on the folded models, batch 1) '
              f'{memory_kb["teacher"] / memory_kb["twin"]:.2f}x less; latency (eager PyTorch, '
              f'{torch.get_num_threads()} threads, medians of {latency_repeats} interleaved runs) '
              f'{speedup[1]:.2f}x at batch 1, {speedup[16]:.2f}x at batch 16 (above 1: the twin is faster). '
              f'Training took {train_seconds:.0f} s on {platform.processor() or platform.machine()}.']
    table = '\n'.join(lines)
    summary = dict(dataset=dataset, arch=arch, epochs=epochs, recipe=recipe, results=results, params=params,
                   latency_ms=latency, speedup=speedup, activation_memory_mb=measured['activation_memory_mb'],
                   test_images=n_test, train_seconds=train_seconds)
    (out / 'summary.json').write_text(json.dumps(summary, indent=1))
    (out / 'summary.md').write_text(table + '\n')
    plot_comparison([(r[0].split(' (')[0], r[1]) for r in rows], speedup, out / 'summary.png',
                    f'{arch} on {dataset} ({n_test} test images)', memory=memory_kb, memory_unit='KB')
    print(table)
    print(f'\nwrote {out / "summary.md"}, {out / "summary.png"}')
    return summary

