"""``jointrd demo``: the whole story in a few minutes on an embedded real dataset.

The demo is ``jointrd distill`` (:mod:`jointrd_timm.training.distill`) from a bare architecture name, plus the twin
trained alone as its baseline:

1. a residual teacher (CIFAR-style ResNet) trained here with cross-entropy (distill's path for a teacher without
   weights);
2. the twin trained with JointRD from the teacher (distill's run: YAMLs, the deployed twin in ``model/`` with its
   card, ``comparison.*``);
3. the same twin trained alone: same recipe, schedule and ingredients (teacher init, shortcut fade), no JointRD;
then a table (test accuracy with the count of test images, parameters, activation memory and latency of twin vs
teacher at batch 1 and 16, measured side by side by distill's report) and a plot of the same. Default data:
scikit-learn's 8x8 digits (shipped inside scikit-learn, 1437 train / 360 test).

The twins are trained with a recipe of :mod:`jointrd_timm.recipes` (``recipe``: ``default``, ``reference``,
``dirac``, ...); both get the same ingredients, so their difference is what JointRD adds.
"""
import json
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from ..settings import SCHEDULES

__all__ = ['run_demo']

DEMO_ARCH = 'resnet32_cifar'


# the file that marks a folder as a demo's: a rerun replaces the runs in such a folder, and in no other
DEMO_MARK = '.jointrd-demo'


def check_demo_folder(out: Path) -> None:
    """Refuse an output folder that holds files no demo wrote: the demo replaces its runs by name (teacher/,
    model/, ...), and a user's folder must not lose its own. A new or empty folder, or one a demo wrote (its mark,
    or the summary.json of a demo from before the mark), is fine."""
    from ..errors import InputError
    if out.is_file():
        raise InputError(f'{out} is a file: give a folder for the demo\'s runs (--output-dir).')
    if not out.is_dir() or (out / DEMO_MARK).is_file() or not any(out.iterdir()):
        return
    try:
        earlier = 'twin alone' in json.loads((out / 'summary.json').read_text()).get('results', {})
    except (OSError, ValueError, AttributeError):
        earlier = False
    if not earlier:
        names = sorted(p.name for p in out.iterdir())
        raise InputError(f'{out} holds files that no demo wrote ({", ".join(names[:5])}'
                         f'{", ..." if len(names) > 5 else ""}): the demo replaces the runs in its folder, so it '
                         'runs only in a new or empty folder, or one an earlier demo wrote. Give another '
                         '--output-dir.')


def _train_spec(digits: bool, epochs: Optional[int]):
    """The demo's schedule (``SCHEDULES['demo']``) as distill options; other data than the digits: 5 epochs, and
    loaders without workers (the demo's data order on every machine)."""
    from .distill_inputs import TrainSpec
    schedule = SCHEDULES['demo']
    default = schedule.epochs if digits else 5
    return TrainSpec(epochs=default if epochs is None else epochs, batch_size=schedule.batch_size,
                     lr=schedule.lr, workers=0)


def run_demo(dataset: str = 'sklearn:digits', output_dir: str = 'runs/demo', epochs: Optional[int] = None,
             device: Optional[str] = None, arch: str = DEMO_ARCH, recipe: str = 'default',
             limit: Optional[int] = None, latency_repeats: int = 50) -> dict:
    """Runs the three trainings into ``output_dir`` and writes summary.{json,md,png}; ``limit``: train images per
    run (a quick smoke run; default all); ``latency_repeats``: interleaved timed runs per model and batch size.
    A rerun replaces the runs of the previous one (never a partial mix)."""
    from .compare import plot_comparison
    from .configs import build_config
    from .distill import DataSpec, plan_distill, report_distill, train_distill
    from .run_folder import RunFolder, deployed_accuracy
    from .distill_inputs import check_positive
    from .runner import check_device, train

    check_device(device)  # before the previous demo's runs are replaced
    check_positive(epochs=epochs, limit=limit, latency_repeats=latency_repeats)
    out = Path(output_dir)
    check_demo_folder(out)
    digits = dataset == 'sklearn:digits'
    data = DataSpec(dataset, limit=limit, transform='tensor' if digits else 'cifar', input_size=8 if digits else 32)
    plan = plan_distill(arch, data, output_dir=str(out), train=_train_spec(digits, epochs), recipe=recipe,
                        overwrite=True)
    existed = out.is_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text('a folder of `jointrd demo`: a rerun replaces its runs\n')
    epochs, twin_recipe = plan.epochs, plan.recipe
    start = time.time()
    print(f'[1-2/3] teacher {arch} (cross-entropy) and twin plain_{arch} with JointRD, {epochs} epochs each: '
          f'jointrd distill')
    try:
        final = train_distill(plan, overwrite=True, device=device)
    except BaseException:
        if [p.name for p in out.iterdir()] == [DEMO_MARK]:  # distill left nothing: neither does the demo
            (out / DEMO_MARK).unlink()
            if not existed:
                out.rmdir()
        raise
    print(f'[3/3] twin plain_{arch} alone: cross-entropy, {epochs} epochs, same recipe')
    teacher_ckpt = str((out / 'teacher' / 'model').resolve())
    alone = build_config(plan.datasets, twin_recipe.twin_alone_model(arch, teacher_ckpt, **plan.common),
                         plan.run_schedule(epochs, twin=True), 'ce', seed=plan.budget['seed'],
                         output_dir=str(out / 'twin-alone'), num_workers=plan.budget['num_workers'],
                         runner=plan.runner)
    results = {'teacher': RunFolder(out / 'teacher').final(),
               'twin alone': train(alone, device=device, overwrite=True),
               'twin + JointRD': {k: v for k, v in final.items() if k != 'config'}}
    train_seconds = time.time() - start
    measured = report_distill(plan, final, train_seconds, latency_repeats=latency_repeats)
    test_set = plan.datasets['test']
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

