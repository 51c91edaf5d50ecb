"""What the CIFAR-10 benchmarks share: the CPU budget's arguments, the data splits, the teacher, run folders and the
command line recorded (accuracy_subset.py; full_cifar10.py reads its runs back with ``finished`` / ``read_run``).
"""
import argparse
import json
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def cifar_splits(args, seed: int):
    """(train subset, held-out validation split of train, full test set), seeded."""
    from jointrd_timm.training.data import load_image_dataset
    fraction = args.val_size / 50000
    train_set = load_image_dataset(args.data, 'train', transform='cifar', validation_fraction=fraction, part='train',
                                   limit=args.train_size, seed=seed)
    val_set = load_image_dataset(args.data, 'train', transform='cifar', train=False, validation_fraction=fraction,
                                 part='val', seed=seed)
    return train_set, val_set, load_image_dataset(args.data, 'test', transform='cifar')


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
        train_set, val_set, test_set = splits or cifar_splits(args, seed)
        from jointrd_timm.recipes import SCHEDULES
        schedule = SCHEDULES['cpu-budget'].replace(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
        train(make_config(train_set, test_set, dict(key='timm_model', kwargs=dict(model_name=args.arch, num_classes=10)),
                          'ce', schedule=schedule, seed=seed, num_workers=args.workers, val_set=val_set,
                          output_dir=str(folder)),
              resume=(folder / 'last.safetensors').is_file())  # an interrupted run continues exactly
    return read_run(folder)[0]


def finished(folder: Path) -> bool:
    """A runner output folder holds a finished run (``RunFolder.final``: its final.json is written last)."""
    from jointrd_timm.training.run_folder import RunFolder
    return RunFolder(folder).final() is not None


def read_run(folder: Path):
    """A finished run's final metrics and its per-epoch records (``RunFolder.final`` and ``RunFolder.metrics``)."""
    from jointrd_timm.training.run_folder import RunFolder
    run = RunFolder(folder)
    final = run.final()
    if final is None:
        raise FileNotFoundError(f'{folder}: no finished run (no final.json)')
    return final, run.metrics()
