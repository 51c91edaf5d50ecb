"""What the CIFAR-10 accuracy benchmarks share: what a row trains (:class:`Row`, :func:`row_config`: one definition
of the teacher, the twin alone or with JointRD, the control, step-wise removal and the distillation methods, used at
both scales), the CPU budget's arguments, the data splits, the teacher, run folders and the command line recorded
(the two scales of accuracy.py: scale_subset.py, the CPU budget; scale_full.py, the published-twin budget).
"""
import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from jointrd_timm.training.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]
TWIN_RUNS = ('alone', 'jointrd')  # the runs that train a recipe's twin (at its recipe's peak lr)


@dataclass(frozen=True)
class Row:
    """One row of an accuracy benchmark: what it trains (``run``: 'teacher'; 'alone' or 'jointrd', the twin of
    ``recipe`` alone or with JointRD; 'control', the teacher trained again for the budget; 'stepwise', step-wise
    shortcut removal from the frozen teacher; or a distillation method: 'kd', 'fitnets', 'cakd', 'aps') and ``lr``,
    when it differs from the budget's."""
    label: str
    run: str
    recipe: Optional['Recipe'] = None  # noqa: F821 - jointrd_timm.recipes.Recipe
    lr: Optional[float] = None

    @property
    def id(self) -> str:
        """``run:recipe-id`` (or the run alone), plus ``,lr=`` when the row changes the learning rate."""
        return (f'{self.run}:{self.recipe.id}' if self.recipe else self.run) + (f',lr={self.lr}' if self.lr else '')


def budget_schedule(args, epochs: Optional[int] = None, lr: Optional[float] = None):
    """The budget's schedule: ``epochs`` (default ``--epochs``) at ``--batch-size``, SGD from ``lr`` (default
    ``--lr``) with a cosine decay, weight decay 5e-4 (``SCHEDULES['cpu-budget']`` at these values)."""
    from jointrd_timm.settings import SCHEDULES
    return SCHEDULES['cpu-budget'].replace(epochs=epochs or args.epochs, lr=lr or args.lr,
                                           batch_size=args.batch_size, weight_decay=5e-4)


def stepwise_blocks(arch: str) -> int:
    """How many shortcuts step-wise removal takes away from ``arch``'s twin (one per fading block)."""
    import timm
    from jointrd_timm.twins.fade import fading_block_count
    return fading_block_count(timm.create_model(f'plain_{arch}', num_classes=10, shortcut_fade=True))


def row_config(row: Row, arch: str, teacher_ckpt: str, schedule) -> tuple:
    """(torchdistill model config, ``make_config`` method, ``make_config`` keywords) of ``row`` on the pair
    ``arch`` whose teacher's weights are ``teacher_ckpt``; ``schedule`` is the budget's for the row (its epochs,
    batch and peak lr): a twin trains on its recipe's (``Recipe.twin_schedule``), every other row on it as given.
    Step-wise removal (Tailor, Weng et al. 2023) takes one shortcut away every epochs / (shortcuts + 1) epochs, so
    that the last removal is followed by one interval of training."""
    common = dict(num_classes=10)
    teacher = dict(model_name=arch, checkpoint=teacher_ckpt, **common)
    twin = dict(model_name=f'plain_{arch}', **common)
    if row.run in TWIN_RUNS or (row.run == 'control' and row.recipe is not None):  # a control on a twin's schedule
        schedule = row.recipe.twin_schedule(schedule)
    from jointrd_timm.settings import DISCRIMINATOR_SGD, ZOO_SETTINGS  # the zoo's method settings (as its YAMLs')
    discriminator = schedule.side_optimizer(**DISCRIMINATOR_SGD)
    configs = {
        'teacher': lambda: (dict(key='timm_model', kwargs=dict(model_name=arch, **common)), 'ce', {}),
        'control': lambda: (dict(key='timm_model', kwargs=teacher), 'ce', {}),
        'alone': lambda: (row.recipe.twin_alone_model(arch, teacher_ckpt, **common), 'ce', {}),
        'jointrd': lambda: (row.recipe.jointrd_model(arch, teacher_ckpt, schedule, **common), 'jointrd', {}),
        'stepwise': lambda: (dict(key='stepwise_model', kwargs=dict(
            teacher=teacher, interval=schedule.epochs / (stepwise_blocks(arch) + 1))), 'stepwise', {}),
        'kd': lambda: (dict(key='timm_model', kwargs=twin), 'kd', dict(teacher=dict(key='timm_model', kwargs=teacher))),
        'fitnets': lambda: (dict(key='timm_model', kwargs=twin), 'fitnets',
                            dict(teacher=dict(key='timm_model', kwargs=teacher))),
        'cakd': lambda: (dict(key='cakd_model', kwargs=dict(teacher=teacher, student=twin, **ZOO_SETTINGS['cakd'],
                                                            discriminator=discriminator)), 'cakd', {}),
        'aps': lambda: (dict(key='aps_model', kwargs=dict(teacher=teacher, student=twin, **ZOO_SETTINGS['aps'],
                                                          discriminator=discriminator)), 'aps', {}),
    }
    if row.run not in configs:
        raise ValueError(f'Row {row.label!r}: unknown run {row.run!r}; runs: {", ".join(configs)}')
    model, method, extra = configs[row.run]()
    return model, method, dict(extra, schedule=schedule)


def budget_parser(description: str, name: str) -> argparse.ArgumentParser:
    """The arguments every CIFAR-10 benchmark takes (data, pair, budget, output names)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(ROOT.parent / 'shared/datasets/cifar10'))
    parser.add_argument('--arch', default='resnet56_cifar')
    parser.add_argument('--train-size', type=int, default=8000)
    parser.add_argument('--val-size', type=int, default=2000)
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--threads', type=int, default=2, help='torch threads (a timing column is only comparable '
                        'between runs at the same value)')
    parser.add_argument('--name', default=name, help='results file name under benchmarks/results/')
    parser.add_argument('--work-dir', default=str(ROOT / 'benchmarks/work'))
    return parser


# what a results record is measured at: runs at other values never join it (their numbers would not compare)
BUDGET_SETTINGS = dict(arch=str, train_size=int, val_size=int, epochs=int, batch_size=int, lr=float)


def budget_settings(args) -> dict:
    """The pair and budget of this invocation (``BUDGET_SETTINGS`` read from the parsed arguments)."""
    return {key: getattr(args, key) for key in BUDGET_SETTINGS}


def recorded_settings(meta: dict, parser: argparse.ArgumentParser) -> dict:
    """The pair and budget a results record was measured at: ``meta['settings']``, or, for records written before
    it was stored, read back from the recorded command line (a flag it does not give had the parser's default)."""
    if 'settings' in meta:
        return {key: kind(meta['settings'][key]) for key, kind in BUDGET_SETTINGS.items()}
    tokens = shlex.split(meta.get('command', ''))
    settings = {}
    for key, kind in BUDGET_SETTINGS.items():
        flag = '--' + key.replace('_', '-')
        given = tokens.index(flag) + 1 if flag in tokens else None
        settings[key] = kind(tokens[given]) if given is not None and given < len(tokens) else parser.get_default(key)
    return settings


def check_record(parser: argparse.ArgumentParser, args, meta: dict, path, report_only: bool = False) -> None:
    """Keep one results record at one pair and budget. A command whose ``BUDGET_SETTINGS`` differ from those the
    record at ``path`` was measured at is refused (``parser.error`` names the recorded values), so e.g. resnet56
    runs never join the resnet110 record; a report rewrite (``report_only``) adopts the recorded values instead, as
    the report describes the runs, not the command line."""
    if not meta:
        return
    recorded, asked = recorded_settings(meta, parser), budget_settings(args)
    differ = {key: value for key, value in recorded.items() if asked[key] != value}
    if not differ:
        return
    flags = ' '.join(f'--{key.replace("_", "-")} {value}' for key, value in differ.items())
    if report_only:
        print(f'{path}: runs recorded at {flags}; the report uses these', flush=True)
        for key, value in differ.items():
            setattr(args, key, value)
        return
    asked_flags = ' '.join(f'--{key.replace("_", "-")} {asked[key]}' for key in differ)
    parser.error(f'{path} records runs made with {flags}, but this command asks for {asked_flags}: pass {flags} '
                 f'to add runs to that record, or --name NEW for a record of its own')


def cifar_splits(data: str, val_size: int, seed: int, limit: Optional[int] = None, input_size: int = 32):
    """(train less ``val_size`` held-out images, its first ``limit`` after a seeded shuffle (None: all of it); the
    held-out validation split; the full test set), seeded, every image read at ``input_size``. Both scales read
    CIFAR-10 through this."""
    from jointrd_timm.training.data import load_image_dataset
    fraction, read = val_size / 50000, dict(transform='cifar', input_size=input_size)
    train_set = load_image_dataset(data, 'train', validation_fraction=fraction, part='train', limit=limit, seed=seed,
                                   **read)
    val_set = load_image_dataset(data, 'train', train=False, validation_fraction=fraction, part='val', seed=seed,
                                 **read)
    return train_set, val_set, load_image_dataset(data, 'test', **read)


def budget_meta(args, script: str) -> dict:
    """The ``meta`` of a record of the CPU budget: command, machine, torch, budget, date and settings."""
    import platform
    import time

    import torch
    return dict(command=command_line(script, args),
                machine=f'{platform.machine()}, {torch.get_num_threads()} torch threads', torch=torch.__version__,
                budget=f'{args.train_size} train images, {args.epochs} epochs, batch {args.batch_size}, cosine lr '
                       f'{args.lr}', date=time.strftime('%Y-%m-%d'), settings=budget_settings(args))


def command_line(script: str, args) -> str:
    """The command that reproduces a run (machine-specific paths left out)."""
    parts = []
    for key, value in vars(args).items():
        if key in ('data', 'work_dir', 'threads', 'report_only') or value is None or value is False:
            continue
        if value is True:  # a store_true flag
            parts.append(f'--{key.replace("_", "-")}')
            continue
        value = ' '.join(f'"{v}"' if ' ' in str(v) else str(v) for v in value) if isinstance(value, list) else value
        parts.append(f'--{key.replace("_", "-")} {value}')
    return f'python benchmarks/{script} ' + ' '.join(parts)


def ensure_teacher(args, work: Path, seed: int = 0, splits=None) -> dict:
    """The residual teacher ``args.arch`` of the run folder ``work``: trained with cross-entropy at the budget unless
    ``work/teacher`` already holds a finished run (then reused as it is). Returns its final metrics."""
    folder = Path(work) / 'teacher'
    if not finished(folder):
        from jointrd_timm.integrations import torchdistill as _registers  # noqa: F401
        from jointrd_timm.training.configs import make_config
        from jointrd_timm.training.runner import train
        train_set, val_set, test_set = splits or cifar_splits(args.data, args.val_size, seed, limit=args.train_size)
        model, method, extra = row_config(Row('teacher', 'teacher'), args.arch, '', budget_schedule(args))
        train(make_config(train_set, test_set, model, method, seed=seed, num_workers=args.workers, val_set=val_set,
                          output_dir=str(folder), **extra),
              resume=RunFolder(folder).can_resume())  # an interrupted run continues exactly
    return read_run(folder)[0]


def finished(folder: Path) -> bool:
    """A runner output folder holds a finished run (``RunFolder.final``: its final.json is written last)."""
    return RunFolder(folder).final() is not None


def read_run(folder: Path):
    """A finished run's final metrics and its per-epoch records (``RunFolder.final`` and ``RunFolder.metrics``)."""
    run = RunFolder(folder)
    final = run.final()
    if final is None:
        raise FileNotFoundError(f'{folder}: no finished run (no final.json)')
    return final, run.metrics()
