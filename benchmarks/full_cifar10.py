"""Published twins at the largest budget two CPU cores allow: full CIFAR-10.

The teacher (``--arch``, cross-entropy, ``--teacher-epochs`` on the full training set less the held-out validation
split, cosine lr) is trained once; from it, for each fraction in ``--fractions`` of the teacher's epochs:

* ``twin + JointRD``: the twin with the recipes module's default recipe for the architecture;
* ``twin alone``: the same twin, same ingredients (teacher init + shortcut fade), no JointRD terms;
* ``control``: the residual teacher itself trained for the same extra epochs from its own weights (equal compute).

Every run is a runner output folder under ``--work-dir``; an unfinished one is resumed exactly (the runner's
``--resume``), a finished one (``final.json``) read back, so the script can be stopped and rerun at any time, also
in another session (``--work-dir`` may point at a folder kept between sessions). Each run records how it was
split (``metrics.jsonl`` keeps one line per epoch with its seconds; ``resumes`` in the record counts restarts).
Outputs: ``benchmarks/results/<name>.{json,md,png}``, the command recorded.

    python benchmarks/full_cifar10.py --arch resnet20_cifar --teacher-epochs 32 --rows teacher
    python benchmarks/full_cifar10.py --arch resnet20_cifar --teacher-epochs 32      # every row
    python benchmarks/full_cifar10.py --report-only
"""
import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cifar_budget import ROOT, finished

ROWS = ('teacher', 'twin + JointRD', 'twin alone', 'control')


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=str(ROOT.parent / 'shared/datasets/cifar10'))
    p.add_argument('--arch', default='resnet20_cifar')
    p.add_argument('--teacher-epochs', type=int, default=32)
    p.add_argument('--fractions', type=float, nargs='+', default=[0.25, 0.5])
    p.add_argument('--val-size', type=int, default=2000)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=ROWS)
    p.add_argument('--work-dir', default=str(ROOT / 'benchmarks/work/full_cifar10'))
    p.add_argument('--name', default='full_cifar10')
    p.add_argument('--report-only', action='store_true')
    return p


def splits(args):
    """(train: 50,000 less the held-out validation split, validation split, the 10,000 test images), seeded."""
    from jointrd_timm.training.data import load_image_dataset
    fraction = args.val_size / 50000
    train = load_image_dataset(args.data, 'train', recipe='cifar', validation_fraction=fraction, part='train',
                               seed=args.seed)
    val = load_image_dataset(args.data, 'train', recipe='cifar', train=False, validation_fraction=fraction,
                             part='val', seed=args.seed)
    return train, val, load_image_dataset(args.data, 'test', recipe='cifar')


def run(folder: Path, config: dict) -> None:
    """Train ``config`` into ``folder``: resumed when a checkpoint is there, skipped when finished."""
    from jointrd_timm.training.runner import train
    if finished(folder):
        return
    resume = (folder / 'last.safetensors').is_file()
    if resume:
        count = folder / 'resumes.txt'
        count.write_text(str(int(count.read_text()) + 1 if count.is_file() else 1))
    train(config, output_dir=str(folder), resume=resume)


def main():
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    from jointrd_timm.integrations import torchdistill as _registers  # noqa: F401
    from jointrd_timm.training.configs import make_config
    work = Path(args.work_dir) / args.arch
    data = splits(args)
    common = dict(epochs=args.teacher_epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=5e-4,
                  seed=args.seed, val_set=data[1])
    if 'teacher' in args.rows:
        model = dict(key='timm_model', kwargs=dict(model_name=args.arch, num_classes=10))
        start = time.time()
        run(work / 'teacher', make_config(data[0], data[2], model, 'ce', **common))
        print(f'teacher: {time.time() - start:.0f} s', flush=True)


if __name__ == '__main__':
    main()
