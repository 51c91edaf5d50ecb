"""The distillation zoo on one pair: which method trains the shortcut-free twin best? CIFAR-10 at CPU scale.

Every row trains the same deployable student, plain_resnet56_cifar (the teacher's shortcut-free twin), from the
same residual teacher (resnet56_cifar, trained once by cross-entropy), with the same data, recipe and budget:
the twin alone (cross-entropy), Hinton KD (torchdistill's KDLoss, T 4, alpha 0.9), a FitNets-style hint (MSE on
layer2 outputs + CE), conditional adversarial KD (Xu et al. 2017), adversarial portable students (Wang et al.
2018, our reading), and JointRD. Last-epoch accuracy on the full CIFAR-10 test set (10,000 images).

Rows whose run folder already holds a finished run (final.json) are read back instead of retrained, so the
script resumes after an interruption and shares the teacher, twin-alone and JointRD runs of
cifar10_jointrd.py (same work folder, same recipe). Writes benchmarks/results/<name>.{json,md,png}.

    python benchmarks/cifar10_zoo.py            # ~55 min from nothing on 2 cores; ~30 min when the
                                                # cifar10_jointrd.py runs exist

Budget (default, = cifar10_jointrd.py): 8,000 training images (seeded subset), 5 epochs, batch 128, SGD Nesterov
lr 0.1 cosine to 0, wd 5e-4, random crop + flip. Discriminators: SGD lr 1e-3, momentum 0.9, wd 0, cosine on the
student's schedule.
"""
import json
import platform
import time

import torch

from cifar_budget import ROOT, budget_parser, budget_run, command_line, finished, read_run
from jointrd_timm.recipes import REFERENCE_JOINTRD
from report import curves_and_bars, write_report

# Xu et al. 2017, Table 1 (error %, median of 5 runs; WRN-40-10 teacher, WRN-10-4 student, full CIFAR, ~200 epochs)
XU2017_CIFAR10_ERROR = {'student alone': 7.46, 'best KD': 6.94, 'conditional adversarial KD': 6.09, 'teacher': 4.19}


def main():
    parser = budget_parser(__doc__, 'cifar10_zoo')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--work-name', default='cifar10_jointrd',
                        help='run folder under --work-dir (shared with cifar10_jointrd.py: same rows are reused)')
    args = parser.parse_args()

    from jointrd_timm.integrations import torchdistill as _registers  # noqa: F401
    from jointrd_timm.training.configs import make_config
    from jointrd_timm.training.runner import train

    (train_set, val_set, test_set), work, recipe = budget_run(args, args.work_name)
    common = dict(num_classes=10)
    teacher_ckpt = str(work / 'teacher' / 'model')
    teacher = dict(key='timm_model', kwargs=dict(model_name=args.arch, checkpoint=teacher_ckpt, **common))
    teacher_kwargs = dict(model_name=args.arch, checkpoint=teacher_ckpt, **common)
    twin = dict(model_name=f'plain_{args.arch}', **common)
    discriminator = dict(lr=1e-3, momentum=0.9, weight_decay=0.0, cosine_epochs=args.epochs)
    rows = {}

    def run(label, model, method, **extra):
        folder = work / label
        if finished(folder):
            print(f'{label}: finished run found in {folder}, read back', flush=True)
        else:
            train(make_config(train_set, test_set, model, method, output_dir=str(folder), **recipe, **extra),
                  resume=(folder / 'last.safetensors').is_file())  # an interrupted run continues exactly
        final, curve = read_run(folder)
        rows[label] = dict(test_acc=final['test_acc'], val_curve=[c.get('val_acc') for c in curve],
                           train_loss=[c['train_loss'] for c in curve],
                           seconds_per_epoch=round(sum(c['seconds'] for c in curve) / len(curve), 1))
        print(label, rows[label], flush=True)

    run('teacher', dict(key='timm_model', kwargs=dict(model_name=args.arch, **common)), 'ce')
    run('twin alone', dict(key='timm_model', kwargs=twin), 'ce')
    run('twin + KD', dict(key='timm_model', kwargs=twin), 'kd', teacher=teacher)
    run('twin + FitNets', dict(key='timm_model', kwargs=twin), 'fitnets', teacher=teacher)
    run('twin + CAKD', dict(key='cakd_model', kwargs=dict(
        teacher=teacher_kwargs, student=twin, discriminator_depth=3, dropout=0.3, non_saturating=False,
        discriminator=discriminator)), 'cakd')
    run('twin + APS', dict(key='aps_model', kwargs=dict(
        teacher=teacher_kwargs, student=twin, adversarial_weight=0.1, kd_weight=1.0, kd_temperature=4.0,
        hidden=256, label_head=False, discriminator=discriminator)), 'aps')
    run('twin + JointRD', dict(key='jointrd_model', kwargs=dict(
        teacher=teacher_kwargs, student=twin,
        jointrd=dict(REFERENCE_JOINTRD))), 'jointrd')

    meta = dict(command=command_line('cifar10_zoo.py', args),
                machine=f'{platform.machine()}, {torch.get_num_threads()} torch threads', torch=torch.__version__,
                budget=f'{args.train_size} train images, {args.epochs} epochs, batch {args.batch_size}, cosine lr {args.lr}',
                date=time.strftime('%Y-%m-%d'))
    out = ROOT / 'benchmarks/results'
    record = dict(meta=meta, rows=rows, args=vars(args), xu2017_cifar10_error=XU2017_CIFAR10_ERROR)
    lines = markdown(rows, meta, args)
    write_report(args.name, record, lines,
                 lambda path: plot(rows, path, f'CIFAR-10, student plain_{args.arch}: {meta["budget"]}'), out)
    print('\n'.join(lines))


def markdown(rows, meta, args) -> list:
    alone, teacher = rows['twin alone']['test_acc'], rows['teacher']['test_acc']
    lines = [f'# CIFAR-10 distillation zoo: every method trains the shortcut-free twin plain_{args.arch}', '',
             f'Budget: {meta["budget"]}; same for every row. Teacher: {args.arch} (cross-entropy, same budget). '
             f'Machine: {meta["machine"]}, {meta["date"]}. Command: `{meta["command"]}`. One seed per row.', '',
             '| row | test acc % (last epoch, 10k test) | vs twin alone (points) | share of the gap closed | s / epoch |',
             '|---|---|---|---|---|']
    for label, r in rows.items():
        gain = r['test_acc'] - alone
        share = f'{100 * gain / (teacher - alone):.0f} %' if label not in ('teacher', 'twin alone') else ''
        lines.append(f'| {label} | {r["test_acc"]:.2f} | {gain:+.2f} | {share} | {r["seconds_per_epoch"]} |')
    methods = {k: v['test_acc'] for k, v in rows.items() if k not in ('teacher', 'twin alone')}
    best = max(methods, key=methods.get)
    worse = [k for k, v in methods.items() if v < alone]
    lines += ['', f'Best method here: {best} ({methods[best] - alone:+.2f} points over the twin alone, closing '
                  f'{100 * (methods[best] - alone) / (teacher - alone):.0f} % of the gap to the teacher). '
                  f'Below the twin alone: {", ".join(worse) or "none"}. {_seed_noise()}']
    lines += ['', 's / epoch is the wall time of each run as recorded; the rows ran at different times and some '
                  'shared the 2 cores with other jobs, so it is not a cost comparison (side-by-side step costs: '
                  '`training_cost.md`).']
    xu = XU2017_CIFAR10_ERROR
    lines += ['', 'For reference, Xu et al. 2017 (CIFAR-10, WRN-40-10 teacher -> WRN-10-4 student, full training set, '
                  'about 200 epochs on GPUs, median of 5 runs; a residual student, not a plain one). A different '
                  'scale entirely: compare the ordering of the methods, not the numbers.', '',
              '| Xu et al. row | error % | accuracy % |', '|---|---|---|']
    lines += [f'| {k} | {v:.2f} | {100 - v:.2f} |' for k, v in xu.items()]
    return lines


def _seed_noise() -> str:
    """What two seeds of the same row differ by, from recipe_ablation.py's runs on the same budget."""
    path = ROOT / 'benchmarks/results/recipe_ablation.json'
    runs = json.loads(path.read_text())['runs'] if path.is_file() else {}
    alone = sorted(r['test_acc'] for r in runs.values() if r['label'] == 'twin alone')
    if len(alone) < 2:
        return 'One seed per row: small differences may be seed noise (recipe_ablation.md measures the spread).'
    return (f'One seed per row, and seed noise is large at this budget: the twin alone scores '
            f'{" / ".join(f"{a:.2f}" for a in alone)} % over {len(alone)} seeds (recipe_ablation.md, range '
            f'{alone[-1] - alone[0]:.2f} points), so only differences well beyond that are findings.')


def plot(rows, path, title):
    curves_and_bars(rows, path, title, short=lambda label: label.replace('twin + ', '+'),
                    colors=['#4c72b0' if k == 'teacher' else '#dd8452' if k == 'twin alone' else '#55a868'
                            for k in rows])


if __name__ == '__main__':
    main()
