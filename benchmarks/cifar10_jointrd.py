"""Does JointRD close the gap between a deep plain net and its residual teacher? CIFAR-10 at CPU scale.

Three rows, same data, recipe and budget: the residual teacher (cross-entropy), its shortcut-free twin trained
alone (cross-entropy), the twin trained with JointRD from that teacher. Last-epoch accuracy on the full CIFAR-10
test set (10,000 images); per-epoch accuracy on a held-out validation split carved from train (never used to
select anything). Writes benchmarks/results/<name>.{json,md,png}.

    python benchmarks/cifar10_jointrd.py                       # resnet56_cifar, 8k train images, 5 epochs (~35 min)
    python benchmarks/cifar10_jointrd.py --arch resnet20_cifar --epochs 4 --train-size 5000   # quick

Budget (default): 8,000 training images (seeded subset), 5 epochs, batch 128, SGD Nesterov lr 0.1 cosine to 0,
wd 5e-4, random crop + flip. JointRD: eta from 1 to 0.5 over the first 30 % of the run (the reference's 60 of 200
epochs), lambda 0 (reference CIFAR setting).
"""
import json
import platform
import time

import torch

from jointrd_timm.recipes import REFERENCE_JOINTRD
from report import curves_and_bars, write_report
from cifar_budget import (ROOT, budget_parser, budget_run, budget_settings, check_record, command_line, ensure_teacher,
                          read_run)


def main():
    parser = budget_parser(__doc__, 'cifar10_jointrd')
    parser.add_argument('--eta-min', type=float, default=REFERENCE_JOINTRD['eta_min'])
    parser.add_argument('--eta-horizon-fraction', type=float, default=REFERENCE_JOINTRD['eta_horizon_fraction'])
    parser.add_argument('--feature-loss-weight', type=float, default=0.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--add-sampled-row', action='store_true',
                        help='add the row "twin + JointRD (1 sampled path)" to the recorded results, reusing the '
                             'recorded teacher (same data, recipe and budget)')
    args = parser.parse_args()
    out = ROOT / 'benchmarks/results'
    rows = {}
    if args.add_sampled_row:
        path = out / f'{args.name}.json'
        if not path.is_file():
            parser.error(f'--add-sampled-row: no recorded results in {path}; run without it first')
        recorded = json.loads(path.read_text())
        check_record(parser, args, recorded['meta'], path)
        rows = recorded['rows']

    from jointrd_timm.integrations import torchdistill as _registers  # noqa: F401
    from jointrd_timm.training.configs import make_config
    from jointrd_timm.training.runner import train

    (train_set, val_set, test_set), work, recipe = budget_run(args, args.name)
    common = dict(num_classes=10)

    def trained(model, method):
        return lambda folder: train(make_config(train_set, test_set, model, method, output_dir=str(folder), **recipe),
                                    resume=(folder / 'last.safetensors').is_file())  # interrupted: continue

    def run(label, train_row):
        """Train one row in ``work / label`` (``train_row(folder)`` returns its final.json record)."""
        start = time.time()
        final = train_row(work / label)
        curve = read_run(work / label)[1]
        rows[label] = dict(test_acc=final['test_acc'], val_curve=[c.get('val_acc') for c in curve],
                           train_loss=[c['train_loss'] for c in curve], seconds=round(time.time() - start),
                           seconds_per_epoch=round(sum(c['seconds'] for c in curve) / len(curve), 1))
        print(label, rows[label], flush=True)

    def jointrd(**extra):
        return dict(key='jointrd_model', kwargs=dict(
            teacher=dict(model_name=args.arch, checkpoint=str(work / 'teacher' / 'model'), **common),
            student=dict(model_name=f'plain_{args.arch}', **common),
            jointrd=dict(eta_min=args.eta_min, eta_horizon_fraction=args.eta_horizon_fraction,
                         feature_loss_weight=args.feature_loss_weight, **extra)))

    if args.add_sampled_row:
        run('twin + JointRD (1 sampled path)', trained(jointrd(hybrid_paths=1), 'jointrd'))
    else:
        # the teacher (in work / 'teacher') is reused when finished (recipe_ablation.py and cifar10_zoo.py share it)
        run('teacher', lambda folder: ensure_teacher(args, work, args.seed, (train_set, val_set, test_set)))
        run('twin alone', trained(dict(key='timm_model', kwargs=dict(model_name=f'plain_{args.arch}', **common)), 'ce'))
        run('twin + JointRD', trained(jointrd(), 'jointrd'))

    meta = dict(command=command_line('cifar10_jointrd.py', args),
                machine=f'{platform.machine()}, {torch.get_num_threads()} torch threads', torch=torch.__version__,
                budget=f'{args.train_size} train images, {args.epochs} epochs, batch {args.batch_size}, cosine lr {args.lr}',
                date=time.strftime('%Y-%m-%d'), settings=budget_settings(args))
    if args.add_sampled_row:
        meta['command'] += ' (then --add-sampled-row)'
    gap_alone = rows['teacher']['test_acc'] - rows['twin alone']['test_acc']
    gap_jointrd = rows['teacher']['test_acc'] - rows['twin + JointRD']['test_acc']
    lines = [f'# CIFAR-10, {args.arch} and its shortcut-free twin: JointRD at CPU scale', '',
             f'Budget: {meta["budget"]}; same for every row. Machine: {meta["machine"]}. Command: `{meta["command"]}`.',
             '', '| row | test acc % (last epoch, 10k test) | gap to teacher (points) | s / epoch |', '|---|---|---|---|']
    for label, r in rows.items():
        gap = rows['teacher']['test_acc'] - r['test_acc']
        lines.append(f'| {label} | {r["test_acc"]:.2f} | {gap:+.2f} | {r["seconds_per_epoch"]} |')
    closed = 100 * (gap_alone - gap_jointrd) / gap_alone if gap_alone > 0 else float('nan')
    lines += ['', f'JointRD closes {closed:.0f} % of the gap between the twin alone and the teacher '
                  f'({gap_alone:.2f} -> {gap_jointrd:.2f} points), one seed, this budget.']
    write_report(args.name, dict(meta=meta, rows=rows, args=vars(args)), lines,
                 lambda path: plot(rows, path, f'CIFAR-10 {args.arch}: {meta["budget"]}'), out)
    print('\n'.join(lines))


def plot(rows, path, title):
    curves_and_bars(rows, path, title, short=lambda label: label.replace(' (', '\n('),
                    colors=['#4c72b0', '#dd8452', '#55a868', '#8172b2'][:len(rows)])


if __name__ == '__main__':
    main()
