"""Accuracy at the published-twin budget, the largest two CPU cores allow: full CIFAR-10 (``accuracy.py full``).

The teacher (``--arch``, cross-entropy, ``--teacher-epochs`` on the full training set less the held-out validation
split, cosine lr) is trained once; from it, for each fraction in ``--fractions`` of the teacher's epochs:

* ``twin + JointRD``: the twin with ``--recipe`` (default: the record's, else the recipes module's recommended
  recipe for the architecture);
* ``twin alone``: the same twin, same ingredients (teacher init + shortcut fade), no JointRD terms;
* ``control``: the residual teacher itself trained for the same extra epochs from its own weights (equal compute);
  where the recipe or a variant trains its twin on another schedule (``lr_scale``, ``lr_hold``, ``batch_scale``),
  ``control, on <tag>`` (e.g. ``on lr02``) is the same on that schedule: what restarting the training costs the
  residual net at the twin's learning rate.

Every run is a runner output folder under ``--work-dir`` (default ``benchmarks/runs/full_cifar10``: each run's
``metrics.jsonl`` and ``final.json`` are committed, its weights and checkpoint are not, except the small teachers'
that every other run starts from (.gitignore); a run that needs more hours than a session has continues from its
checkpoint on the machine that ran it, and starts again on one without it); an unfinished one is resumed exactly (the
runner's ``--resume``), a finished one (``final.json``) read back, so the script can be stopped and rerun at any time. Each run records how it was
split (``metrics.jsonl`` keeps one line per epoch with its seconds; ``resumes`` in the record counts restarts).
Outputs: ``benchmarks/results/<name>_<arch>.{json,md,png}``, the command recorded. Another teacher of the same
architecture (longer trained, retrained) gets a record of its own: ``--name`` and ``--work-dir`` apart from the
published-twin record's, and ``--about``, the sentence its page opens with.

    python benchmarks/accuracy.py full --arch resnet20_cifar --teacher-epochs 32 --threads 1 --rows teacher
    python benchmarks/accuracy.py full --arch resnet20_cifar --teacher-epochs 32      # every row
    python benchmarks/accuracy.py full --arch resnet20_cifar --report-only
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from jointrd_timm.training.run_folder import RunFolder, as_trained_accuracy, deployed_accuracy
from cifar_budget import ROOT, Row, budget_schedule, cifar_splits, finished, read_run, row_config
from report import RESULTS, pyplot, write_report

ROWS = ('teacher', 'twin + JointRD', 'twin alone', 'control', 'step-wise removal')
CONTROL_ON = 'control, on '  # + a twin schedule's tag: the residual net on that schedule (schedule_tag)


def schedule_tag(recipe) -> str:
    """How ``recipe`` trains its twin on another schedule than the budget's, as a folder suffix: 'lr02' for
    ``lr_scale`` 0.2, 'hold08' for ``lr_hold`` 0.8, 'batch05' for ``batch_scale`` 0.5; '' for the budget's own."""
    parts = [(name, value) for name, value, plain in (('lr', recipe.lr_scale, 1.0), ('hold', recipe.lr_hold, 0.0),
                                                      ('batch', recipe.batch_scale, 1.0)) if value != plain]
    return '-'.join(f'{name}{value:g}'.replace('.', '') for name, value in parts)


def parser():
    p = argparse.ArgumentParser(prog='accuracy.py full', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=str(ROOT.parent / 'shared/datasets/cifar10'))
    p.add_argument('--arch', default='resnet20_cifar')
    p.add_argument('--teacher-epochs', type=int, default=None,
                   help="the teacher's epochs (default: the record's, else 32)")
    p.add_argument('--fractions', type=float, nargs='+', default=None,
                   help="twin lengths as fractions of the teacher's epochs (default: the record's, else 0.25 0.5)")
    p.add_argument('--input-size', type=int, default=None,
                   help="the side the 32 px images are read at (resized; default: the record's, else 32): a net "
                        'whose stride leaves too little of a 32 px image to learn from (RegNets) at 64')
    p.add_argument('--val-size', type=int, default=2000)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--seed', type=int, default=0,
                   help='training seed of the conversions (data order, augmentation); a seed other than 0 runs into '
                        'its own folders (suffix -sN) and rows (", seed N"), on the same split and teacher')
    p.add_argument('--split-seed', type=int, default=0, help='seed of the held-out validation split')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--rows', nargs='+', default=list(ROWS), choices=ROWS)
    p.add_argument('--variant', action='append', default=[], metavar='NAME=FIELD:VALUE,...',
                   help="a change of the architecture's recipe (Recipe.replace fields, values as JSON or text) whose "
                        'twins (JointRD and alone) get rows of their own, e.g. share=shortcut_fade_mode:share')
    p.add_argument('--recipe', default=None,
                   help="the twins' recipe (a name or id of jointrd_timm.recipes; default: the record's, so that a "
                        "record's rows keep the recipe they ran with, else the architecture's recommended one)")
    p.add_argument('--only', nargs='+', default=None, metavar='FOLDER',
                   help='run only these run folders (e.g. twin-alone-e4-share); the page lists every finished one')
    p.add_argument('--work-dir', default=str(ROOT / 'benchmarks/runs/full_cifar10'))
    p.add_argument('--name', default='full_cifar10',
                   help='the record: benchmarks/results/<name>_<arch>.{json,md,png} (another name for another '
                        'teacher or question, with its own --work-dir)')
    p.add_argument('--about', default=None,
                   help="what the record asks, in a sentence under its page's title (default: the record's); for a "
                        'record beside the published-twin one, e.g. another teacher')
    p.add_argument('--report-only', action='store_true')
    return p


def splits(args):
    """(train: 50,000 less the held-out validation split, validation split, the 10,000 test images), seeded, read
    at ``--input-size``."""
    return cifar_splits(args.data, args.val_size, args.split_seed, input_size=args.input_size)


def run(folder: Path, config: dict) -> None:
    """Train ``config`` into ``folder``: resumed when a checkpoint is there, skipped when finished, started again
    when an unfinished run's checkpoint is gone (its epochs' lines came to this machine without their weights)."""
    from jointrd_timm.training.runner import train
    if finished(folder):
        return
    resume = RunFolder(folder).can_resume()
    if resume:
        count = folder / 'resumes.txt'
        count.write_text(str(int(count.read_text()) + 1 if count.is_file() else 1))
    lost = not resume and bool(RunFolder(folder).metrics())
    if lost:
        print(f'{folder}: unfinished, and its checkpoint is not here; it starts again from epoch 0 (its old lines '
              'are replaced once the new run has saved its first epoch)', flush=True)
    train(config, output_dir=str(folder), resume=resume, overwrite=lost)


def twin_epochs(args, fraction: float) -> int:
    return max(1, round(fraction * args.teacher_epochs))


def parse_variant(text: str):
    """``NAME=FIELD:VALUE,...`` -> (NAME, {FIELD: VALUE}); VALUE is read as JSON where it parses, else as text."""
    from jointrd_timm.recipes import split_changes
    name, _, changes = text.partition('=')
    fields = {}
    for item in filter(None, split_changes(changes)):  # a value such as [0, 1] keeps its commas
        key, sep, value = item.partition(':')
        if not sep or not key:
            raise SystemExit(f'--variant {text!r}: each change is FIELD:VALUE, got {item!r}.')
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    if not name or not fields:
        raise SystemExit(f'--variant {text!r}: give NAME=FIELD:VALUE[,FIELD:VALUE...].')
    return name, fields


def run_specs(args, work: Path):
    """(label, epochs, folder, :class:`~cifar_budget.Row`) of every run, in run order: the teacher, then for each
    fraction the twin with JointRD, the twin alone, the control and step-wise removal, then each variant's two twins
    (what each trains: :func:`cifar_budget.row_config`, at ``--lr`` and ``--batch-size`` for its epochs)."""
    from jointrd_timm.recipes import get_recipe, recipe_for
    recipe = get_recipe(args.recipe) if args.recipe else recipe_for(args.arch)
    variants = [(name, recipe.replace(**fields)) for name, fields in map(parse_variant, args.variant)]
    specs = [('teacher', args.teacher_epochs, work / 'teacher', Row('teacher', 'teacher'))]
    for fraction in args.fractions:
        epochs = twin_epochs(args, fraction)
        rows = [('twin-jointrd', '', Row('twin + JointRD', 'jointrd', recipe)),
                ('twin-alone', '', Row('twin alone', 'alone', recipe)),
                ('control', '', Row('control', 'control')), ('stepwise', '', Row('step-wise removal', 'stepwise'))]
        # the residual net on each twin schedule (lr_scale, lr_hold, batch_scale) of the recipe and its variants:
        # what restarting the training costs at the twin's learning rate, shortcuts kept (no weight average)
        controls = {}
        for changed in [recipe] + [changed for _, changed in variants]:
            if tag := schedule_tag(changed):
                controls.setdefault(tag, changed.replace(ema_decay=0.0))
        rows[3:3] = [('control', f'-{tag}', Row(f'{CONTROL_ON}{tag}', 'control', changed))
                     for tag, changed in controls.items()]
        for name, changed in variants:
            rows += [('twin-jointrd', f'-{name}', Row(f'twin + JointRD, {name}', 'jointrd', changed)),
                     ('twin-alone', f'-{name}', Row(f'twin alone, {name}', 'alone', changed))]
        specs += [(row.label, epochs, work / f'{prefix}-e{epochs}{suffix}', row) for prefix, suffix, row in rows]
    if args.seed:  # another seed of the conversions: same teacher, split and budget, own folders and rows
        specs = specs[:1] + [(f'{label}, seed {args.seed}', epochs, folder.with_name(f'{folder.name}-s{args.seed}'), row)
                             for label, epochs, folder, row in specs[1:]]
    return recipe, specs


def main(argv=None):
    args = parser().parse_args(argv)
    path = RESULTS / f'{args.name}_{args.arch}.json'
    recorded = json.loads(path.read_text())['meta'] if path.is_file() else {}
    work = Path(args.work_dir) / args.arch
    fill_defaults(args, recorded, work / 'teacher')
    torch.set_num_threads(args.threads)
    from jointrd_timm.integrations import torchdistill as _registers  # noqa: F401
    from jointrd_timm.training.configs import make_config
    recipe, specs = run_specs(args, work)
    if not args.report_only:
        data = splits(args)
        for label, epochs, folder, row in specs:
            if label.split(',')[0] not in args.rows or (args.only and folder.name not in args.only):
                continue
            if row.run != 'teacher' and not finished(work / 'teacher'):
                print(f'{label}: waits for the teacher ({work / "teacher"} has not finished)', flush=True)
                continue
            start = time.time()
            model, method, extra = row_config(row, args.arch, str(work / 'teacher' / 'model'),
                                              budget_schedule(args, epochs))
            run(folder, make_config(data[0], data[2], model, method, seed=args.seed if row.run != 'teacher' else 0,
                                    val_set=data[1], **extra))
            print(f'{label}, {epochs} epochs: {time.time() - start:.0f} s', flush=True)
    report(args, recipe, specs)


def fill_defaults(args, recorded: dict, teacher: Path) -> None:
    """The options not given, from the record (``recorded``: its meta) else the defaults; the teacher's epochs from
    its finished run first: the twins' lengths are fractions of them, so a command whose record is elsewhere
    (``--name``) converts for as long as one that reads the page. A ``--teacher-epochs`` that contradicts the
    finished teacher is refused."""
    done = RunFolder(teacher).final() if teacher.is_dir() else None
    trained = done.get('epochs') if done else None
    if args.teacher_epochs is None:
        args.teacher_epochs = trained or recorded.get('teacher_epochs', 32)
    elif trained and args.teacher_epochs != trained:
        raise SystemExit(f'--teacher-epochs {args.teacher_epochs}: the teacher in {teacher} finished {trained} '
                         f'epochs; give --teacher-epochs {trained} (or leave it out), or another --work-dir for '
                         'another teacher.')
    if args.fractions is None:
        args.fractions = recorded.get('fractions', [0.25, 0.5])
    if args.recipe is None:
        args.recipe = recorded.get('recipe')
    if args.input_size is None:
        args.input_size = recorded.get('input_size', 32)
    if args.about is None:
        args.about = recorded.get('about')


def answer_lines(runs: list, teacher) -> list:
    """What the page is for, read from the finished runs: per twin length, how far the twin lands from its teacher,
    what JointRD adds over the twin alone, and how the conversion compares with the same epochs on the residual
    net (the control). Nothing when the teacher has not finished."""
    if teacher is None:
        return []
    lines = ['', '## What the runs say', '']
    for epochs in sorted({r['epochs'] for r in runs if r['row'] != 'teacher'}):
        rows = {r['row']: r.get('test_acc') for r in runs if r['epochs'] == epochs and r['row'] != 'teacher'}
        if all(v is None for v in rows.values()):
            lines.append(f'- {epochs} epochs: not run yet.')
            continue
        parts = []
        for row in ('twin + JointRD', 'twin alone'):
            if rows.get(row) is not None:
                parts.append(f'{row} {rows[row]:.2f} % ({rows[row] - teacher:+.2f} against the teacher)')
        if rows.get('twin + JointRD') is not None and rows.get('twin alone') is not None:
            parts.append(f'JointRD adds {rows["twin + JointRD"] - rows["twin alone"]:+.2f} points over the twin alone')
        for row, acc in rows.items():  # recipe variants (--variant) and the step-wise removal alternative
            if (',' in row or row == 'step-wise removal') and not row.startswith('control') and acc is not None:
                parts.append(f'{row} {acc:.2f} % ({acc - teacher:+.2f} against the teacher)')
        twins = [v for k, v in rows.items() if not k.startswith('control') and v is not None]
        if rows.get('control') is not None:
            parts.append(f'the residual net given the same {epochs} epochs (control) reaches {rows["control"]:.2f} %'
                         + (f': the best twin is {max(twins) - rows["control"]:+.2f} points from it' if twins else ''))
        for row, acc in rows.items():
            if row.startswith(CONTROL_ON) and acc is not None:
                parts.append(f'on the twins\' schedule {row[len(CONTROL_ON):]} (their learning rate) the residual net '
                             f'reaches {acc:.2f} % ({acc - teacher:+.2f} against the teacher)'
                             + (f': the best twin is {max(twins) - acc:+.2f} points from it' if twins else ''))
        missing = [k for k, v in rows.items() if v is None]
        lines.append(f'- {epochs} epochs: ' + '; '.join(parts) + (f' (not finished: {", ".join(missing)})'
                                                                   if missing else '') + '.')
    recalibrated = [r for r in runs if 'test_acc_as_trained' in r]
    if recalibrated:
        lines += ['', "BN statistics: the twins were deployed with their BatchNorm statistics recomputed on the "
                  'training data (`runner.recalibrate_bn`); as trained -> deployed: '
                  + '; '.join(f'{r["row"]} {r["epochs"]} ep: {r["test_acc_as_trained"]:.2f} -> {r["test_acc"]:.2f} %'
                              for r in recalibrated) + '.']
    averaged = [r for r in runs if 'test_acc_without_ema' in r]
    if averaged:
        lines += ['', 'Weight average: these twins were deployed as the moving average of their weights over their '
                  'shortcut-free steps (`runner.ema_decay`, the recipe\'s `ema_decay`); the same run deployed without '
                  'it -> with it: ' + '; '.join(f'{r["row"]} {r["epochs"]} ep: {r["test_acc_without_ema"]:.2f} -> '
                                                f'{r["test_acc"]:.2f} % ({r["ema_steps"]} steps averaged)'
                                                for r in averaged) + '.']
    lines += ['', 'Seconds per epoch are wall time on the 2-core machine, some epochs with 1 torch thread and cores '
              'shared with other jobs (`resumed` counts the restarts): read them as an order of magnitude.']
    return lines


def deployment_lines(arch: str, bench: dict) -> list:
    """What the twin buys when deployed, read from the deployment benchmark's record (``deploy_bench.json``) for
    this architecture: latency and activation memory ratios, residual / twin, per batch size."""
    result = next((r for r in (bench or {}).get('results', []) if r['teacher'] == arch), None)
    lines = ['', '## What the twin buys at deployment', '']
    if result is None:
        return lines + [f'{arch} is not in the deployment benchmark ([deploy_bench.md](deploy_bench.md)); '
                        f'`jointrd bench {arch}` measures it on your machine.']
    parts = [f'batch {batch}: eager latency {b["speedup/eager"]:.2f}x, ONNX Runtime {b["speedup/onnxruntime"]:.2f}x, '
             f'activation memory (analysed) {b["memory_ratio_analysed"]:.2f}x'
             for batch, b in sorted(result['batches'].items(), key=lambda kv: int(kv[0]))]
    meta = bench.get('meta', {})
    size = f'{result["input_size"]} px images, ' if 'input_size' in result else ''
    return lines + [f'Residual {arch} / its twin, folded, on CPU ({size}{meta.get("machine", "?")}, '
                    f'{meta.get("threads", "?")} threads; [deploy_bench.md](deploy_bench.md)); above 1 the twin is '
                    'faster or lighter: '
                    + '; '.join(parts) + '.']


def run_entry(row: str, epochs: int, folder: Path, recipe_id) -> dict:
    """One row of the record, read from its run folder (an unfinished run: its epochs done)."""
    entry = dict(row=row, epochs=epochs, folder=folder.name)
    if recipe_id:
        entry['recipe'] = recipe_id
    curve = RunFolder(folder).metrics()
    entry['epochs_done'] = len({c['epoch'] for c in curve})
    entry['resumes'] = int((folder / 'resumes.txt').read_text()) if (folder / 'resumes.txt').is_file() else 0
    if curve:
        entry['seconds_per_epoch'] = round(statistics.median(c['seconds'] for c in curve), 1)
    if finished(folder):
        final, _ = read_run(folder)
        entry['test_acc'] = deployed_accuracy(final)
        entry['val_acc'] = final.get('val_acc')
        if final.get('bn_recalibrated_batches'):  # the deployed twin's BN statistics were recomputed
            entry['test_acc_as_trained'] = as_trained_accuracy(final)
            entry['bn_recalibrated_batches'] = final['bn_recalibrated_batches']
        if 'test_acc_deployed_without_ema' in final:  # runner.ema_decay: the deployed twin is the weight average
            entry['test_acc_without_ema'] = final['test_acc_deployed_without_ema']
            entry['ema_steps'] = final['ema_steps']
            if final.get('val_acc_ema') is not None:  # the validation accuracy of what is deployed (publication picks
                entry['val_acc_without_ema'] = entry['val_acc']  # on it), and of the trained twin beside it
                entry['val_acc'] = final['val_acc_ema']
    return entry


def collect_runs(specs, work: Path, recorded: list) -> list:
    """The rows of this command's runs and of every run the record already lists (read again from their folders),
    so that a command naming some fractions, variants or seeds adds its rows to the page instead of replacing it:
    the teacher first, then by conversion epochs, in the order the rows were first recorded."""
    rows = {}
    for r in recorded:
        if (work / r['folder']).is_dir():
            rows[r['folder']] = (r['row'], r['epochs'], work / r['folder'], r.get('recipe'))
    for label, epochs, folder, row in specs:
        if label != 'teacher' and not folder.is_dir():  # a row never started (e.g. the other rows of a new fraction)
            continue
        rows[folder.name] = (label, epochs, folder, row.recipe.id if row.recipe else None)
    runs = [run_entry(*spec) for spec in rows.values()]
    return sorted(runs, key=lambda r: (r['row'] != 'teacher', r['epochs']))  # stable: first-recorded order kept


def report(args, recipe, specs) -> None:
    """The record, page and plot from every finished run (an unfinished one is listed with its epochs done)."""
    path = RESULTS / f'{args.name}_{args.arch}.json'
    previous = json.loads(path.read_text()) if path.is_file() else dict(meta={}, runs=[])
    runs = collect_runs(specs, Path(args.work_dir) / args.arch, previous['runs'])
    variants = list(dict.fromkeys(previous['meta'].get('variants', []) + args.variant))
    fractions = sorted(set(previous['meta'].get('fractions', [])) | set(args.fractions))
    teacher = runs[0].get('test_acc')
    size = '' if args.input_size == 32 else f', read at {args.input_size} px (resized from 32)'
    held = recipe.lr_hold or any('lr_hold' in v for v in variants)
    hold = ', and with its lr_hold held for that part of the run, then a per-step cosine' if held else ''
    record = dict(meta=dict(arch=args.arch, recipe=recipe.id, teacher_epochs=args.teacher_epochs, variants=variants,
                            fractions=fractions, input_size=args.input_size, data='CIFAR-10: 50,000 training images '
                            f'less a held-out validation split of {args.val_size} (seed {args.split_seed}); the 10,000 '
                            f'test images{size}',
                            budget=f'batch {args.batch_size}, SGD Nesterov 0.9, lr {args.lr} cosine over each run '
                                   f"(a twin's: its recipe's lr_scale times that{hold}), weight decay 5e-4"),
                  runs=runs)
    if args.about:
        record['meta']['about'] = args.about
    lines = [f'# Full CIFAR-10: {args.arch} and its twin plain_{args.arch}, recipe `{recipe.id}`', '']
    lines += [args.about, ''] if args.about else []
    lines += [f'{record["meta"]["data"]}; {record["meta"]["budget"]}. Last-epoch test accuracy of the deployed '
              'model (nothing selected on test). The teacher trains first; every other run starts from its weights '
              '(the twins through their recipe: teacher init + shortcut fade; step-wise removal (Tailor, Weng et al. '
              '2023): the frozen teacher, 0.35 MSE on logits + 0.65 CE, one shortcut removed from the input end every '
              'epochs / (shortcuts + 1) epochs; the control is the residual teacher '
              'trained again for the same epochs, equal compute'
              + ('; "control, on lr02" and the like: the same on a twin\'s schedule (lr02: a fifth of the peak lr, '
                 'the recipes\' lr_scale 0.2; hold08: lr_hold 0.8)'
                 if any(r['row'].startswith(CONTROL_ON) for r in runs) else '') + ').', '',
              '| run | epochs | test acc % | vs teacher | s / epoch (median) | epochs done | resumed |',
              '|---|---|---|---|---|---|---|']
    for r in runs:
        acc = f'{r["test_acc"]:.2f}' if 'test_acc' in r else 'not finished'
        vs = f'{r["test_acc"] - teacher:+.2f}' if 'test_acc' in r and teacher is not None and r['row'] != 'teacher' \
            else ''
        lines.append(f'| {r["row"]} | {r["epochs"]} | {acc} | {vs} | {r.get("seconds_per_epoch", "")} | '
                     f'{r["epochs_done"]} of {r["epochs"]} | {r["resumes"]} |')

    lines += answer_lines(runs, teacher)
    bench = RESULTS / 'deploy_bench.json'
    lines += deployment_lines(args.arch, json.loads(bench.read_text()) if bench.is_file() else None)

    def plot(path):
        plt = pyplot()
        done = [r for r in runs if 'test_acc' in r]
        fig, ax = plt.subplots(figsize=(7, 0.5 * max(1, len(done)) + 1.5))
        ax.barh([f'{r["row"]} ({r["epochs"]} ep)' for r in done], [r['test_acc'] for r in done], color='#55a868')
        if teacher is not None:
            ax.axvline(teacher, color='#4c72b0', ls='--', label=f'teacher {teacher:.2f} %')
            ax.legend(fontsize=8, loc='lower right')
        ax.invert_yaxis()
        ax.set_xlabel('last-epoch test accuracy (%)')
        ax.set_title(f'{args.arch} -> plain_{args.arch}, full CIFAR-10', fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120, format='png')
        plt.close(fig)
    write_report(f'{args.name}_{args.arch}', record, lines, plot)

