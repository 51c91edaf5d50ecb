"""The first steps of a conversion: what the peak learning rate does to a twin started from its converged teacher,
with and without Hinton KD.

For each architecture (``--archs``, the full-CIFAR-10 teachers of ``accuracy.py full``), each peak lr (``--lrs``) and
each KD weight (``--kd``), the default recipe's JointRD module is built exactly as that run builds it (twin started
from the teacher, the run length of a ``--epochs`` conversion, so the fade and eta are where they are in the real
run) and trained for ``--steps`` SGD steps (Nesterov momentum 0.9, weight decay 5e-4, batch 128) on the same
shuffled batches. Every step records the twin's cross-entropy (train mode), its batch accuracy, Hinton KD against the
frozen teacher (T 4; logged also where it is not trained on) and the gradient norm. The conversions of
``accuracy.py full`` hold the peak lr through their first epoch, so these steps show how each run starts.

    python benchmarks/conversion_lr.py --threads 2
"""
import argparse
import itertools
import json
import statistics
import time

import torch

from report import ROOT, pyplot, save_figure, write_report

NAME = 'conversion_lr'
CONVERSION_EPOCHS = {'resnet20_cifar': 8, 'resnet56_cifar': 4}  # the full_cifar10 runs these steps begin


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=str(ROOT.parent / 'shared/datasets/cifar10'))
    p.add_argument('--archs', nargs='+', default=list(CONVERSION_EPOCHS))
    p.add_argument('--lrs', nargs='+', type=float, default=[0.1, 0.02])
    p.add_argument('--kd', nargs='+', type=float, default=[0.0, 1.0])
    p.add_argument('--steps', type=int, default=30)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--val-size', type=int, default=5000, help="accuracy.py full's held-out split (not trained on)")
    p.add_argument('--threads', type=int, default=1)
    return p


def batches(args):
    """The same ``--steps`` shuffled training batches for every setting (accuracy.py full's training split)."""
    from jointrd_timm.training.data import load_image_dataset
    train = load_image_dataset(args.data, 'train', transform='cifar', validation_fraction=args.val_size / 50000,
                               part='train', seed=0)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    return list(itertools.islice(loader, args.steps)), len(loader)


def first_steps(arch: str, lr: float, kd_weight: float, data, steps_per_epoch: int) -> dict:
    """Per-step CE, accuracy, KD and gradient norm of the default recipe's conversion of ``arch`` at peak ``lr``."""
    from jointrd_timm.integrations.torchdistill import jointrd_model
    from jointrd_timm.methods.base import hinton_kd
    from jointrd_timm.recipes import DEFAULT_RECIPE
    teacher_ckpt = ROOT / 'benchmarks/runs/full_cifar10' / arch / 'teacher' / 'model'
    torch.manual_seed(0)
    recipe = DEFAULT_RECIPE.replace(kd_weight=kd_weight)
    model = jointrd_model(**recipe.jointrd_model(arch, str(teacher_ckpt), num_classes=10)['kwargs'])
    model.set_run_length(CONVERSION_EPOCHS[arch], steps_per_epoch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    rows = dict(ce=[], acc=[], kd=[], grad_norm=[])
    for x, y in data:
        out = model(x, y)
        sgd.zero_grad()
        out['loss'].backward()
        rows['grad_norm'].append(float(torch.nn.utils.clip_grad_norm_(params, float('inf'))))
        sgd.step()
        with torch.no_grad():
            teacher_logits = model.teacher(x) if out['teacher_logits'] is None else out['teacher_logits']
            rows['kd'].append(float(hinton_kd(out['logits'].detach(), teacher_logits, 4.0)))
        rows['ce'].append(float(out['ce_student']))
        rows['acc'].append(100.0 * float((out['logits'].argmax(1) == y).float().mean()))
    return rows


def label(arch: str, lr: float, kd: float) -> str:
    return f'{arch}, lr {lr:g}, ' + (f'KD {kd:g}' if kd else 'no KD')


def page_lines(record: dict) -> list:
    meta = record['meta']
    last = meta['steps'] // 3
    lines = ['# The first steps of a conversion: peak learning rate and KD', '',
             f'The default recipe\'s JointRD conversion of each full-CIFAR-10 teacher of accuracy.py full, its first '
             f'{meta["steps"]} steps (the twin still has its shortcuts: s falls by less than 1 % over them), on the '
             'same batches for every setting. CE and accuracy: the twin in train mode on the step\'s batch; KD: '
             'T² KL(teacher || twin) at T 4, logged in every setting, trained on where the KD weight is not 0. '
             f'"Start": the first step; "end": the median of the last {last} steps.', '',
             '| setting | CE start | CE end | batch acc % start | end | KD end | grad norm end (median) |',
             '|---|---|---|---|---|---|---|']
    for key, r in record['runs'].items():
        end = lambda name: statistics.median(r[name][-last:])  # noqa: E731
        lines.append(f'| {key} | {r["ce"][0]:.3f} | {end("ce"):.3f} | {r["acc"][0]:.1f} | {end("acc"):.1f} | '
                     f'{end("kd"):.3f} | {end("grad_norm"):.2f} |')
    lines += ['', 'What the full runs of these settings reach is on '
              '[deep_twin_diagnostics.md](deep_twin_diagnostics.md) and the full_cifar10 pages.']
    return lines


def plot(record: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, r in record['runs'].items():
        style = '-' if ', KD' in key else '--'
        axes[0].plot(range(1, len(r['ce']) + 1), r['ce'], style, label=key)
        axes[1].plot(range(1, len(r['acc']) + 1), r['acc'], style, label=key)
    axes[0].set_ylabel("twin's CE (train mode)")
    axes[1].set_ylabel('batch accuracy %')
    for ax in axes:
        ax.set_xlabel('step')
    axes[0].set_yscale('log')
    axes[1].legend(fontsize=6)
    save_figure(fig, path)


def main():
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    import jointrd_timm  # noqa: F401  (registers the twins)
    data, steps_per_epoch = batches(args)
    runs = {}
    for arch in args.archs:
        for lr in args.lrs:
            for kd in args.kd:
                start = time.time()
                runs[label(arch, lr, kd)] = first_steps(arch, lr, kd, data, steps_per_epoch)
                print(f'{label(arch, lr, kd)}: {time.time() - start:.0f} s', flush=True)
    record = dict(meta=dict(steps=args.steps, batch_size=args.batch_size, lrs=args.lrs, kd=args.kd), runs=runs)
    write_report(NAME, record, page_lines(record), lambda path: plot(record, path))
    print(json.dumps({k: round(v['ce'][-1], 3) for k, v in runs.items()}, indent=1))


if __name__ == '__main__':
    main()
