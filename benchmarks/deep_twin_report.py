"""The deep-twin diagnostics page: what happens inside a depth-56 twin while its shortcuts fade out.

Merges screen records written by ``deep_twin_screen.py`` (each one conversion with per-block probes) into one
record, ``benchmarks/results/deep_twin_diagnostics.json``, and writes its page and plot from that record.

    python benchmarks/deep_twin_report.py --add /tmp/screens/*.json     # add (or replace, by name) screens
    python benchmarks/deep_twin_report.py                               # regenerate the page from the record
"""
import argparse
import json
import statistics
from pathlib import Path

from jointrd_timm.training.run_folder import RunFolder, deployed_accuracy
from report import RESULTS, pyplot, save_figure, write_report

NAME = 'deep_twin_diagnostics'

RUNS = RESULTS.parent / 'runs'

# Issue 34's accuracy goals: a twin converted in at most `epochs` lands at most `tolerance` below its teacher on the
# test set, on two seeds. Each goal lists the recipes measured against it, each by its name and its runs' folders in
# the record (seed 0, seed 1); the numbers are read from the records when the page is written, and each run's last
# epoch (train and held-out accuracy) from its folder under `runs` (benchmarks/runs/<runs>/<arch>/<folder>).
GOALS = (
    dict(arch='resnet20_cifar', record='full_cifar10_resnet20_cifar', runs='full_cifar10', epochs=8, tolerance=0.5,
         recipes=(
            ('kd-low-lr-blocks-fade60', ('twin-jointrd-e8-kd-lr02-block5-fade60',
                                         'twin-jointrd-e8-kd-lr02-block5-fade60-s1')),
            ('kd-low-lr-blocks', ('twin-jointrd-e8-kd-lr02-block5', 'twin-jointrd-e8-kd-lr02-block5-s1')),
            ('kd-low-lr', ('twin-jointrd-e8-kd-lr02', 'twin-jointrd-e8-kd-lr02-s1')))),
    dict(arch='resnet56_cifar', record='full_cifar10_t32_resnet56_cifar', runs='full_cifar10_t32', epochs=16,
         tolerance=1.0, recipes=(
            ('kd-low-lr-blocks20-joint', ('twin-jointrd-e16', 'twin-jointrd-e16-s1')),
            ('kd-low-lr-blocks20-joint, fade over 60 %', ('twin-jointrd-e16-fade60', 'twin-jointrd-e16-fade60-s1')))),
    dict(arch='resnet56_cifar', record='full_cifar10_resnet56_cifar', runs='full_cifar10', epochs=4, tolerance=1.0,
         recipes=(
            ('kd-low-lr-blocks20-joint', ('twin-jointrd-e4-kd-lr02-block20-jtf',
                                          'twin-jointrd-e4-kd-lr02-block20-jtf-s1')),
            ('kd-low-lr-blocks20', ('twin-jointrd-e4-kd-lr02-block20', 'twin-jointrd-e4-kd-lr02-block20-s1')),
            ('default', ('twin-jointrd-e4', 'twin-jointrd-e4-s1')))),
)


def last_epoch(folder: Path, epochs: int) -> tuple:
    """(train accuracy, held-out accuracy) of the last epoch a run folder's metrics hold; (None, None) without any.
    A folder whose last epoch is not ``epochs`` (the record's epochs done) holds another run than the record's: a
    ValueError."""
    curve = RunFolder(folder).metrics()
    if curve and curve[-1]['epoch'] != epochs:
        raise ValueError(f'{folder}: its metrics end at epoch {curve[-1]["epoch"]}, its record at {epochs}; rerun '
                         'the script that writes the record first')
    return (curve[-1]['train_acc'], curve[-1].get('val_acc')) if curve else (None, None)


def goal_rows(goals=GOALS, results: Path = RESULTS, arch_recipes=None, runs_root: Path = RUNS) -> list:
    """One row per (goal, recipe): the teacher's test accuracy, the target, each seed's deployed test accuracy
    (None where the record has no finished run in that folder) and whether both seeds reach the target; and how
    well each fits its training set: the last epoch's train and held-out accuracy of the teacher (``teacher_fit``)
    and of each finished run (``fit``, None where unfinished), read from the run folders under ``runs_root``.
    ``arch_recipes``: the architecture -> recipe name map that says which recipe ``recipe_for`` picks (default:
    recipes.ARCH_RECIPES). A listed run longer than its goal's epochs is a ValueError."""
    if arch_recipes is None:
        from jointrd_timm.recipes import ARCH_RECIPES as arch_recipes
    rows = []
    for goal in goals:
        record = json.loads((results / f'{goal["record"]}.json').read_text())
        runs = {r['folder']: r for r in record['runs']}
        teacher = runs['teacher']
        target = round(teacher['test_acc'] - goal['tolerance'], 2)
        folder = runs_root / goal['runs'] / goal['arch']
        for name, folders in goal['recipes']:
            longer = [f for f in folders if f in runs and runs[f]['epochs'] > goal['epochs']]
            if longer:
                raise ValueError(f'{goal["record"]}: {longer} trained longer than the goal\'s {goal["epochs"]} epochs')
            # a run is read once its record holds its test accuracy (written from its final.json)
            accs = [runs[f]['test_acc'] if 'test_acc' in runs.get(f, {}) else None for f in folders]
            rows.append(dict(arch=goal['arch'], record=goal['record'], teacher_epochs=teacher['epochs'],
                             teacher_acc=teacher['test_acc'], epochs=goal['epochs'], tolerance=goal['tolerance'],
                             target=target, recipe=name, is_recipe=arch_recipes.get(goal['arch']) == name,
                             folders=list(folders), test_acc=accs,
                             met=all(a is not None and a >= target for a in accs),
                             teacher_fit=last_epoch(folder / 'teacher', teacher['epochs_done']),
                             fit=[last_epoch(folder / f, runs[f]['epochs_done']) if a is not None else None
                                  for f, a in zip(folders, accs)]))
    return rows


def goal_lines(rows: list) -> list:
    if not rows:
        return []
    out = ['## Where the goals stand', '',
           'The goals: a twin converted in at most the epochs given lands at most the tolerance below its teacher, on '
           'the full CIFAR-10 test set (last epoch, nothing selected on test), on two seeds. Each cell is a run\'s '
           'deployed test accuracy and its distance to the teacher, read from the record linked; "not finished" is a '
           'run the record does not hold yet. **bold**: the recipe `recipe_for` picks for the architecture now.', '',
           '| architecture (teacher epochs) | teacher test % | target % (conversion epochs) | recipe | seed 0 | '
           'seed 1 | both seeds reach the target |',
           '|---|---|---|---|---|---|---|']
    for r in rows:
        cells = [f'{a:.2f} ({a - r["teacher_acc"]:+.2f})' if a is not None else 'not finished' for a in r['test_acc']]
        recipe = f'**{r["recipe"]}**' if r['is_recipe'] else r['recipe']
        out.append(f'| [{r["arch"]} ({r["teacher_epochs"]})]({r["record"]}.md) | {r["teacher_acc"]:.2f} | '
                   f'{r["target"]:.2f} (<= {r["epochs"]}) | {recipe} | ' + ' | '.join(cells) +
                   f' | {"yes" if r["met"] else "no"} |')
    return out + [''] + fit_lines(rows)


def fit_lines(rows: list) -> list:
    """The table of how well each goal run and its teacher fit the training set (rows of :func:`goal_rows`; rows
    of a record written before the table have no fit: no table)."""
    if not all('fit' in r for r in rows):
        return []
    out = ['How well each fits its training set: the train accuracy of the last epoch (train mode, augmented, the '
           'epoch\'s mean; the last epoch is the end of each run\'s cosine, lr near 0) and the held-out accuracy after '
           'it (2,000 training images kept out of training, as trained), of the teacher and of each seed\'s twin, '
           'read from the runs\' folders.', '',
           '| architecture (teacher epochs) | recipe | teacher train / held-out % | seed 0 train / held-out % | '
           'seed 1 train / held-out % |',
           '|---|---|---|---|---|']
    for r in rows:
        cells = ['not finished' if f is None else 'no metrics' if None in f else f'{f[0]:.2f} / {f[1]:.2f}'
                 for f in [r['teacher_fit']] + r['fit']]
        out.append(f'| {r["arch"]} ({r["teacher_epochs"]}) | {r["recipe"]} | ' + ' | '.join(cells) + ' |')
    return out + ['']


def screen_name(screen: dict) -> str:
    a = screen['args']
    parts = ['jointrd' if a.get('jointrd') else 'alone']
    if a.get('recipe', 'default') != 'default':  # screens recorded before --recipe ran on the default recipe
        parts.append(a['recipe'])
    if a.get('share'):
        parts.append('share fade')
    if a.get('hint'):
        parts.append(f'block hints {a["hint"]:g}')
    if a.get('kd'):
        parts.append(f'KD {a["kd"]:g}')
    if a.get('clip') is not None:
        parts.append(f'clip {a.get("clip_mode", "agc")} {a["clip"]:g}')
    if a.get('lr') != 0.1:
        parts.append(f'lr {a["lr"]:g}')
    if a.get('fade') != 0.8:
        parts.append(f'fade {a["fade"]:g}')
    if a.get('batch_size', 128) != 128:  # a screen of the conversion's batch (Recipe.batch_scale) is its own screen
        parts.append(f'batch {a["batch_size"]}')
    if a.get('steps', 375) != 375:
        parts.append(f'{a["steps"]} steps')
    parts += list(a.get('lever') or [])
    if a.get('seed'):
        parts.append(f'seed {a["seed"]}')
    return ', '.join(parts)


def leaning(screen: dict) -> list:
    """(step, s, median over blocks of the shortcut's size relative to the branch divided by s) per logged window
    while s > 0.005: 1 when the network follows the fade, above 1 when it keeps more shortcut than s gives, rising
    when it leans back on the shortcut as s falls. The window's stats are averages over its steps, so s is taken
    as the mean of its values at the window's two ends."""
    out, previous = [], 1.0
    for e in screen['log']:
        s_mid = (previous + e['s']) / 2
        previous = e['s']
        if s_mid <= 0.005:
            continue
        rel = [b['shortcut_rms'] / max(b['branch_rms'], 1e-12) / s_mid for b in e['blocks'].values()]
        out.append((e['step'], s_mid, statistics.median(rel)))
    return out


def summary(screen: dict) -> dict:
    """The numbers a reader compares: train accuracy before the fade bites, at its lowest, and at the end; the
    test accuracy of the deployed twin; the shortcut share, gradient norms and RMS at the fade's end."""
    log = screen['log']
    acc = [e['train_acc'] for e in log]
    low = min(range(len(log)), key=lambda i: acc[i])
    faded = next((e for e in log if e['s'] == 0.0), log[-1])
    blocks = list(faded['blocks'])
    lean = leaning(screen)
    lowest = min(lean, key=lambda t: t[2])
    return dict(name=screen_name(screen), lean_first=lean[0][2], lean_lowest=lowest[2], lean_lowest_s=lowest[1],
                lean_last=lean[-1][2], lean_last_s=lean[-1][1], test_acc=screen['test_acc'], test_images=screen['test_images'],
                steps=screen['args']['steps'], train_acc_first=acc[0], train_acc_low=acc[low],
                s_at_low=log[low]['s'], step_at_low=log[low]['step'], train_acc_last=acc[-1],
                eval_rms_first_block=log[0]['blocks'][blocks[0]]['eval_output_rms'],
                eval_rms_faded=statistics.median(faded['blocks'][b]['eval_output_rms'] for b in blocks),
                eval_rms_start=statistics.median(log[0]['blocks'][b]['eval_output_rms'] for b in blocks),
                grad_ratio_first_last=faded['blocks'][blocks[0]]['grad_norm'] / max(
                    1e-12, faded['blocks'][blocks[-1]]['grad_norm']),
                bn_drift_max=max(max(e['bn_drift'].values()) for e in log),
                seconds=screen['seconds'])


def full_runs(arch: str) -> dict:
    """Per-epoch train accuracy and shortcut scale of the four-epoch twin conversions that accuracy.py full records
    for ``arch`` (every twin run of its record, in the record's order), and their deployed test accuracy where
    finished."""
    root = Path(__file__).resolve().parents[1] / 'benchmarks'
    record = root / 'results' / f'full_cifar10_{arch}.json'
    names = [r['folder'] for r in json.loads(record.read_text())['runs']
             if r['folder'].startswith('twin-') and r['epochs'] == 4] if record.is_file() else []
    out = {}
    for name in names:
        run = RunFolder(root / 'runs/full_cifar10' / arch / name)
        curve, final = run.metrics(), run.final()
        if not curve:
            continue
        entry = dict(train_acc=[c['train_acc'] for c in curve], s_end=[c.get('shortcut_scale') for c in curve])
        if final is not None:
            entry['test_acc'] = deployed_accuracy(final)
        out[name] = entry
    return out


def full_run_lines(runs: dict) -> list:
    if not runs:
        return []
    epochs = max(len(r['train_acc']) for r in runs.values())
    lines = ['', '## The same conversions at full CIFAR-10, four epochs', '',
             'Train accuracy of each epoch (train mode, the epoch\'s mean) and s at its end, from the runs of '
             '[full_cifar10_resnet56_cifar.md](full_cifar10_resnet56_cifar.md) (same teacher and split, seed 0 '
             'unless marked); '
             'the fade ends at 80 % of the run (in epoch 4), for `-fade50` at the end of epoch 2; `-kd` adds Hinton KD '
             '(weight 1, T 4) on the twin\'s logits; `-lr02` trains the twin at 0.2 times the peak lr (`lr_scale` '
             '0.2: 0.02); `-dirac0`: Dirac-parametrised twin convs that start as the teacher\'s, their identity scales at 0 '
             '(`dirac=True, dirac_init=(0.0, 1.0)`); `-w05`: a staggered fade, each block over half the fade, shallow '
             'blocks first (`shortcut_fade_window=0.5`; s is the run\'s, the blocks\' own scales spread around it); '
             '`-p2`: the fade raised to power 2 (`shortcut_fade_power=2`; the s shown is the powered one); '
             '`-block1`, `-block5`: teacher-forced block targets at weight 1, 5 (`block_loss_weight`); `-jtf`: the '
             'teacher trained along as the depth-110 recipe trains it (`joint-teacher-first`\'s fields); '
             '`-hold08`: the twin\'s peak lr held through the fade (80 % of the run), then a per-step cosine to 0 '
             '(`lr_hold=0.8`); `-s1`: training seed 1 (data order, augmentation), same teacher '
             'and split.', '',
             '| run | ' + ' | '.join(f'epoch {e + 1}' for e in range(epochs)) + ' | deployed test acc % |',
             '|---|' + '---|' * (epochs + 1)]
    for name, r in runs.items():
        cells = [f'{a:.1f} (s {s:.2f})' for a, s in zip(r['train_acc'], r['s_end'])]
        cells += [''] * (epochs - len(cells))
        test = f'{r["test_acc"]:.2f}' if 'test_acc' in r else 'not finished'
        lines.append(f'| {name} | ' + ' | '.join(cells) + f' | {test} |')
    return lines


def lines_for(record: dict) -> list:
    screens = record['screens']
    meta = record['meta']
    out = [f'# Deep twins: where the signal goes while the shortcuts fade ({meta["arch"]})', '']
    out += goal_lines(record.get('goals', []))
    out += ['## The screens', '', meta['setup'], '',
           '| screen | deployed test acc % | train acc % first window | lowest (at s) | last window | '
           'shortcut / branch over s (median of blocks): first -> lowest (at s) -> last (at s) | '
           'median eval RMS of block outputs: start -> faded | grad norm first / last block (faded) |',
           '|---|---|---|---|---|---|---|---|']
    for s in screens:
        m = summary(s)
        out.append(f'| {m["name"]} | {m["test_acc"]:.2f} | {m["train_acc_first"]:.1f} | {m["train_acc_low"]:.1f} '
                   f'({m["s_at_low"]:.2f}) | {m["train_acc_last"]:.1f} | {m["lean_first"]:.2f} -> '
                   f'{m["lean_lowest"]:.2f} ({m["lean_lowest_s"]:.2f}) -> {m["lean_last"]:.2f} ({m["lean_last_s"]:.3f}) | '
                   f'{m["eval_rms_start"]:.2f} -> '
                   f'{m["eval_rms_faded"]:.2f} | {m["grad_ratio_first_last"]:.2f} |')
    out += ['', f'Test accuracy on {screens[0]["test_images"]} test images (one image is '
            f'{100 / screens[0]["test_images"]:.2f} points): differences of a point or two between screens are '
            'within what another seed moves; the screens rank levers, the full CIFAR-10 runs '
            '([full_cifar10_resnet56_cifar.md](full_cifar10_resnet56_cifar.md)) decide.', '']
    out += record.get('findings', [])
    out += full_run_lines(record.get('full_runs', {}))
    return out


def plot(record: dict):
    screens = record['screens']

    def draw(path):
        plt = pyplot()
        fig, axes = plt.subplots(3, 2, figsize=(12, 12))
        ax = axes[0][1]
        for s in screens:
            lean = leaning(s)
            ax.plot([t[0] for t in lean], [t[2] for t in lean], label=screen_name(s))
        ax.axhline(1.0, color='k', lw=0.6)
        ax.set_xlabel('step')
        ax.set_ylabel('shortcut / branch RMS over s (median of blocks)')
        ax.set_title('shortcut vs branch, over s (1 flat: network idle; falling: branches take over; rising: it keeps its shortcuts)', fontsize=8)
        ax.legend(fontsize=7)
        ax = axes[2][1]
        base = screens[0]
        ax.plot([e['step'] for e in base['log']], [max(e['bn_drift'].values()) for e in base['log']], label='max')
        ax.plot([e['step'] for e in base['log']],
                [statistics.mean(e['bn_drift'].values()) for e in base['log']], label='mean')
        ax.set_xlabel('step')
        ax.set_ylabel('BN drift (batch vs running statistics)')
        ax.set_title(f'BatchNorm drift: {screen_name(base)}', fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[0][0]
        for s in screens:
            ax.plot([e['step'] for e in s['log']], [e['train_acc'] for e in s['log']], label=screen_name(s))
        twin = ax.twinx()
        base = screens[0]['log']
        twin.plot([e['step'] for e in base], [e['s'] for e in base], 'k:', label='s')
        twin.set_ylabel('shortcut scale s (dotted)')
        ax.set_xlabel('step')
        ax.set_ylabel('train accuracy % (window)')
        ax.legend(fontsize=7)
        ax.set_title('train accuracy while s fades', fontsize=9)
        base = screens[0]
        blocks = list(base['log'][0]['blocks'])
        for ax, key, title in ((axes[1][0], 'shortcut_share', 'shortcut share of each block output'),
                               (axes[1][1], 'grad_norm', 'gradient norm per block'),
                               (axes[2][0], 'eval_output_rms', 'eval-mode RMS of each block output')):
            grid = [[e['blocks'][b][key] for e in base['log']] for b in blocks]
            im = ax.imshow(grid, aspect='auto', cmap='viridis',
                           extent=(base['log'][0]['step'], base['log'][-1]['step'], len(blocks) - 0.5, -0.5))
            fig.colorbar(im, ax=ax)
            ax.set_ylabel('block (input side at top)')
            ax.set_xlabel('step')
            ax.set_title(f'{title}: {screen_name(base)}', fontsize=9)
        save_figure(fig, path, 110)
    return draw


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--add', nargs='*', default=[], help='screen records to add (replacing a screen of the same name)')
    p.add_argument('--findings', help='a markdown file of findings to put under the table')
    args = p.parse_args()
    path = RESULTS / f'{NAME}.json'
    record = json.loads(path.read_text()) if path.is_file() else dict(screens=[])
    for item in args.add:
        screen = json.loads(Path(item).read_text())
        record['screens'] = [s for s in record['screens'] if screen_name(s) != screen_name(screen)] + [screen]
    record['full_runs'] = full_runs(record['screens'][0]['args']['arch'])
    record['goals'] = goal_rows()
    if args.findings:
        record['findings'] = Path(args.findings).read_text().rstrip('\n').split('\n')
    first = record['screens'][0]['args']
    record['meta'] = dict(record.get('meta', {}), arch=first['arch'], setup=(
        f'Each screen converts the published teacher ({Path(first["teacher"]).name}) into its twin for '
        f'{first["steps"]} SGD steps (batch {first["batch_size"]}, one pass over {first["train_size"]} CIFAR-10 '
        'training images, Nesterov 0.9, cosine lr from the peak given, weight decay 5e-4, shortcuts faded over '
        'the fraction given, seed 0 unless named), recording every 25 steps the shortcut scale s, the lr, the loss, '
        'the train accuracy of that window and, per block, the branch and scaled-shortcut RMS, the shortcut share '
        'of the output, the gradient norm and the BatchNorm drift (`jointrd_timm.twins.probe`). The deployed twin '
        '(fade finished, BN statistics recomputed on 100 training batches) is then tested. Each screen: '
        '`python benchmarks/deep_twin_screen.py` with the arguments in the record.'))
    record['meta']['command'] = 'python benchmarks/deep_twin_report.py'
    write_report(NAME, record, lines_for(record), plot(record))


if __name__ == '__main__':
    main()
