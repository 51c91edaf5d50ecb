"""The pages of ``accuracy.py subset`` (scale_subset.py), one per question, each generated from its record only
(``write_page``).

jointrd: teacher, twin alone and twin + JointRD with the share of the gap closed; zoo: every distillation method
against the twin alone; ablation: every recipe row over seeds, and runs matched by seed and teacher.
"""
import math
import statistics
from typing import Dict

from report import RESULTS, curves_and_bars, load_record, pyplot, write_report

DEFAULT_ROW = 'JointRD + fade over 80 % + teacher init'  # jointrd_timm.recipes.DEFAULT_RECIPE
ALONE_ROW = 'twin alone + fade over 80 % + teacher init'  # the twin alone with the default's ingredients
# suffix of the joint-teacher row -> the JointRDConfig fields that make it the reference's JOINT branch
JOINT_VARIANT_FIELDS = {
    ' as the reference (teacher step first, running BN, margin per epoch)': dict(
        joint_step_order='teacher_first', hybrid_teacher_bn='running', margin_refresh='epoch'),
    ', teacher step first': dict(joint_step_order='teacher_first'),
    ', tails on running BN statistics': dict(hybrid_teacher_bn='running'),
}
JOINT_ROW = f'{DEFAULT_ROW}, eta held at 1, joint teacher'
# variants of the default that change only the loss: the twin alone with the default's ingredients is their baseline
LOSS_VARIANTS = [f'{DEFAULT_ROW} + margin (lambda 1e-3)', f'{DEFAULT_ROW}, eta to 0 over 60 %',
                 f'{DEFAULT_ROW}, eta held at 1', f'{DEFAULT_ROW}, joint teacher',
                 f'{DEFAULT_ROW}, loss not divided by n', f'{DEFAULT_ROW}, loss divided by its weights',
                 f'{DEFAULT_ROW}, loss per stage']
FADE50_ROW = 'JointRD + fade + teacher init'  # the default before its fade moved from 50 % to 80 % of the run
ETA1_ROW = f'{DEFAULT_ROW}, eta held at 1'  # depth 110's best before the joint teacher
# what JointRD adds: each JointRD row against the twin trained alone with the same ingredients
PAIRS = {'JointRD (reference loss)': 'twin alone', 'JointRD + Dirac': 'twin alone + Dirac',
         FADE50_ROW: 'twin alone + fade + teacher init', DEFAULT_ROW: ALONE_ROW, **dict.fromkeys(LOSS_VARIANTS, ALONE_ROW)}
# (record key, rows -> the row they are matched with, title, intro, row header, column): rows that change one field
# of a recipe, matched by seed and teacher with that recipe's runs
MATCHED = [
    ('vs_default', dict.fromkeys([*LOSS_VARIANTS, FADE50_ROW, 'JointRD + fade over 100 % + teacher init',
                                  'JointRD + staggered fade over 80 % (window 0.3) + teacher init',
                                  f'{DEFAULT_ROW}, fade power 0.5', f'{DEFAULT_ROW}, projections kept (paper variant)'],
                                 DEFAULT_ROW),
     f'## One field of the default recipe changed ({DEFAULT_ROW})',
     "Runs matched by seed and teacher with the default recipe's run.", 'row', 'variant vs default'),
    ('vs_fade50', dict.fromkeys(['JointRD + fade + teacher init + KD', 'JointRD + fade + teacher init, lr 0.02',
                                 'JointRD + Dirac + fade + teacher init'], FADE50_ROW),
     f'## One field of the earlier recipe changed ({FADE50_ROW}: fade over 50 %)',
     "Rows measured before the default moved to a fade over 80 %; runs matched by seed and teacher with that recipe's "
     'run.', 'row', 'variant vs fade over 50 %'),
    ('vs_eta1', dict.fromkeys([f'{ETA1_ROW}, joint teacher', f'{ETA1_ROW}, loss per stage'], ETA1_ROW),
     f'## One more field changed on {ETA1_ROW}', "Runs matched by seed and teacher with that row's run.", 'row',
     'variant vs eta held at 1'),
    ('vs_joint', dict.fromkeys([f'{JOINT_ROW}{suffix}' for suffix in JOINT_VARIANT_FIELDS], JOINT_ROW),
     f'## The joint teacher as the reference runs it, against ours ({JOINT_ROW})',
     'Ours: one simultaneous update, the hybrid paths on the pre-update teacher with batch BN statistics. Runs matched '
     "by seed and teacher with that row's run.", 'row', 'variant vs ours'),
]
# Xu et al. 2017, Table 1 (error %, median of 5 runs; WRN-40-10 teacher, WRN-10-4 student, full CIFAR, ~200 epochs)
XU2017_CIFAR10_ERROR = {'student alone': 7.46, 'best KD': 6.94, 'conditional adversarial KD': 6.09, 'teacher': 4.19}


def arch_of(record: dict) -> str:
    return record['meta'].get('settings', {}).get('arch') or record['args']['arch']


def run_key(label: str, seed: int, teacher_acc: float) -> str:
    return f'{label} s{seed} (teacher {teacher_acc:.2f})'


def write_page(question: str, name: str, record: dict, rows: Dict, out=RESULTS) -> None:
    """Write ``record`` with its page and plot as ``name`` (``rows``: label -> the question's Row, in order)."""
    write = dict(jointrd=jointrd_page, zoo=zoo_page, ablation=ablation_page)[question]
    record['meta']['question'] = question
    lines, plot = write(record, rows)
    write_report(name, record, lines + rows_lines(rows, record), plot, out)


def rows_lines(rows: Dict, record: dict) -> list:
    """What each row of the page trains: its run and recipe id (``accuracy.py subset --rows`` takes either)."""
    shown = set(record.get('rows', {})) | {r['label'] for r in record.get('runs', {}).values()}
    lines = ['', '## Rows', '', '| row | id (`--rows`) |', '|---|---|']
    return lines + [f'| {label} | `{row.id}` |' for label, row in rows.items() if label in shown]


def jointrd_page(record: dict, rows: Dict) -> tuple:
    meta, entries, arch = record['meta'], record['rows'], arch_of(record)
    teacher = entries['teacher']['test_acc']
    lines = [f'# CIFAR-10, {arch} and its shortcut-free twin: JointRD at CPU scale', '',
             f'Budget: {meta["budget"]}; same for every row. Machine: {meta["machine"]}. Command: `{meta["command"]}`.',
             '', '| row | test acc % (last epoch, 10k test) | gap to teacher (points) | s / epoch |', '|---|---|---|---|']
    lines += [f'| {label} | {r["test_acc"]:.2f} | {teacher - r["test_acc"]:+.2f} | {r["seconds_per_epoch"]} |'
              for label, r in entries.items()]
    gap_alone, gap_jointrd = (teacher - entries[k]['test_acc'] for k in ('twin alone', 'twin + JointRD'))
    closed = 100 * (gap_alone - gap_jointrd) / gap_alone if gap_alone > 0 else float('nan')
    lines += ['', f'JointRD closes {closed:.0f} % of the gap between the twin alone and the teacher '
                  f'({gap_alone:.2f} -> {gap_jointrd:.2f} points), one seed, this budget.']
    return lines, lambda path: curves_and_bars(
        entries, path, f'CIFAR-10 {arch}: {meta["budget"]}', short=lambda label: label.replace(' (', '\n('),
        colors=['#4c72b0', '#dd8452', '#55a868', '#8172b2'][:len(entries)])


def zoo_page(record: dict, rows: Dict) -> tuple:
    meta, entries, arch = record['meta'], record['rows'], arch_of(record)
    record.setdefault('xu2017_cifar10_error', XU2017_CIFAR10_ERROR)
    if 'twin_alone_over_seeds' not in record:  # the seed noise of this budget, from the ablation's twin-alone runs
        ablation = load_record('recipe_ablation') or {}
        record['twin_alone_over_seeds'] = sorted(r['test_acc'] for r in ablation.get('runs', {}).values()
                                                 if r['label'] == 'twin alone')
    alone, teacher = entries['twin alone']['test_acc'], entries['teacher']['test_acc']
    lines = [f'# CIFAR-10 distillation zoo: every method trains the shortcut-free twin plain_{arch}', '',
             f'Budget: {meta["budget"]}; same for every row. Teacher: {arch} (cross-entropy, same budget). '
             f'Machine: {meta["machine"]}, {meta["date"]}. Command: `{meta["command"]}`. One seed per row.', '',
             '| row | test acc % (last epoch, 10k test) | vs twin alone (points) | share of the gap closed | s / epoch |',
             '|---|---|---|---|---|']
    for label, r in entries.items():
        gain = r['test_acc'] - alone
        share = f'{100 * gain / (teacher - alone):.0f} %' if label not in ('teacher', 'twin alone') else ''
        lines.append(f'| {label} | {r["test_acc"]:.2f} | {gain:+.2f} | {share} | {r["seconds_per_epoch"]} |')
    methods = {k: v['test_acc'] for k, v in entries.items() if k not in ('teacher', 'twin alone')}
    best = max(methods, key=methods.get)
    worse = [k for k, v in methods.items() if v < alone]
    lines += ['', f'Best method here: {best} ({methods[best] - alone:+.2f} points over the twin alone, closing '
                  f'{100 * (methods[best] - alone) / (teacher - alone):.0f} % of the gap to the teacher). '
                  f'Below the twin alone: {", ".join(worse) or "none"}. {seed_noise(record["twin_alone_over_seeds"])}']
    lines += ['', 's / epoch is the wall time of each run as recorded; the rows ran at different times and some '
                  'shared the 2 cores with other jobs, so it is not a cost comparison (side-by-side step costs: '
                  '[training_cost.md](training_cost.md)).']
    lines += ['', 'For reference, Xu et al. 2017 (CIFAR-10, WRN-40-10 teacher -> WRN-10-4 student, full training set, '
                  'about 200 epochs on GPUs, median of 5 runs; a residual student, not a plain one). A different '
                  'scale entirely: compare the ordering of the methods, not the numbers.', '',
              '| Xu et al. row | error % | accuracy % |', '|---|---|---|']
    lines += [f'| {k} | {v:.2f} | {100 - v:.2f} |' for k, v in record['xu2017_cifar10_error'].items()]
    return lines, lambda path: curves_and_bars(
        entries, path, f'CIFAR-10, student plain_{arch}: {meta["budget"]}',
        short=lambda label: label.replace('twin + ', '+'),
        colors=['#4c72b0' if k == 'teacher' else '#dd8452' if k == 'twin alone' else '#55a868' for k in entries])


def seed_noise(alone: list) -> str:
    """What two seeds of the twin alone differ by (the ablation's runs on the same budget)."""
    if len(alone) < 2:
        return 'One seed per row: small differences may be seed noise (recipe_ablation.md measures the spread).'
    return (f'One seed per row, and seed noise is large at this budget: the twin alone scores '
            f'{" / ".join(f"{a:.2f}" for a in alone)} % over {len(alone)} seeds ([recipe_ablation.md]'
            f'(recipe_ablation.md), range {alone[-1] - alone[0]:.2f} points), so only differences well beyond that '
            'are findings.')


def paired(runs: dict, pairs: dict = None) -> dict:
    """{row: [(seed, teacher, row acc, baseline acc)]} over runs matched by seed and teacher (default: PAIRS, each
    JointRD row against the twin alone with the same ingredients)."""
    out = {}
    for with_rd, alone in (pairs or PAIRS).items():
        by = {(r['seed'], r['teacher_test_acc']): r['test_acc'] for r in runs.values() if r['label'] == alone}
        matched = [(r['seed'], r['teacher_test_acc'], r['test_acc'], by[(r['seed'], r['teacher_test_acc'])])
                   for r in runs.values() if r['label'] == with_rd and (r['seed'], r['teacher_test_acc']) in by]
        if matched:
            out[with_rd] = sorted(matched)
    return out


def summarise(runs: dict, labels) -> dict:
    """Per row (in ``labels`` order): mean, half range, sd, n, gap to its teacher, teachers, s / epoch of the least
    disturbed run (runs that shared the 2 cores with other jobs are slower)."""
    table = {}
    for label in labels:
        mine = [r for r in runs.values() if r['label'] == label]
        if mine:
            accs = [r['test_acc'] for r in mine]
            table[label] = dict(mean=statistics.mean(accs), spread=(max(accs) - min(accs)) / 2, n=len(accs),
                                sd=statistics.stdev(accs) if len(accs) > 1 else None, accs=accs,
                                gap=statistics.mean(r['teacher_test_acc'] - r['test_acc'] for r in mine),
                                teachers=sorted({r['teacher_test_acc'] for r in mine}),
                                seconds_per_epoch=min(r['seconds_per_epoch'] for r in mine))
    return table


def ablation_page(record: dict, rows: Dict) -> tuple:
    runs, meta, arch = record['runs'], record['meta'], arch_of(record)
    table = summarise(runs, rows)
    teachers = sorted({r['teacher_test_acc'] for r in runs.values()})
    record.update(teachers=teachers, table=table, paired=paired(runs))
    record.update({key: paired(runs, pairs) for key, pairs, *_ in MATCHED})
    lines = ablation_header(meta, arch, teachers) + ablation_table(table) + ablation_notes(runs)
    lines += matched_table(record['paired'], '## What JointRD adds over the twin alone with the same ingredients',
                           'Runs matched by seed and teacher (the twin alone never sees the teacher in its loss; with '
                           '"teacher init" it starts from the same teacher weights).', 'JointRD row', 'JointRD vs alone')
    for key, _, *words in MATCHED:
        lines += matched_table(record[key], *words)
    return lines, lambda png: ablation_plot(table, teachers, png, f'plain_{arch} <- {arch}, CIFAR-10: {meta["budget"]}')


def ablation_header(meta: dict, arch: str, teachers: list) -> list:
    lines = [f'# Recipe ablation: plain_{arch} trained from its teacher {arch}, CIFAR-10 at CPU scale', '',
             f'Budget per row: {meta["budget"]} (same for every row and for the teacher). Machine: {meta["machine"]}, '
             f'{meta["date"]}. Commands (every run recorded here; finished runs are read back): '
             + '; '.join(f'`{c}`' for c in meta['commands']) + f'. Teacher ({arch}, cross-entropy, same budget, '
             f'seed 0) test accuracy: ' + ', '.join(f'**{t:.2f} %**' for t in teachers) + '.', '']
    if len(teachers) > 1:
        lines += ['Runs come from more than one teacher: a work folder was lost between sessions and the teacher '
                  'retrained with the same command (CPU training here is not bit-reproducible across machines and '
                  'code versions). Every run records its teacher; "gap to its teacher" is the mean over the row\'s runs '
                  'of (its teacher - twin), which is what rows are compared by.', '']
    return lines + [
        'Accuracy: last epoch, full 10k test set, mean over runs with half the range (±) and the sample standard '
        'deviation (sd) (n = runs; a seed sets the data subset, split and init). Gap = teacher - twin (negative: the '
        'twin is above its teacher). Dirac rows: evaluated with the parametrisation folded into plain convs.', '',
        's / epoch: median epoch of the least disturbed run of the row (some runs shared the 2 cores with other jobs; '
        '[training_cost.md](training_cost.md) has clean side-by-side step costs).', '']


def ablation_table(table: dict) -> list:
    alone = table.get('twin alone', {}).get('mean')
    lines = ['| row | test acc % | ± | sd | n | teacher(s) % | gap to its teacher (points) | vs twin alone | s / epoch |',
             '|---|---|---|---|---|---|---|---|---|']
    for label, r in table.items():
        vs = f'{r["mean"] - alone:+.2f}' if alone is not None else ''
        sd = '' if r['sd'] is None else f'{r["sd"]:.2f}'
        lines.append(f'| {label} | {r["mean"]:.2f} | {r["spread"]:.2f} | {sd} | {r["n"]} | '
                     f'{", ".join(f"{t:.2f}" for t in r["teachers"])} | {r["gap"]:+.2f} | {vs} | '
                     f'{r["seconds_per_epoch"]} |')
    return lines


def ablation_notes(runs: dict) -> list:
    """The deployed twins whose BN statistics were recomputed, and the joint teachers' own accuracy."""
    lines = []
    recalibrated = [r for r in runs.values() if r.get('bn_recalibrated_batches')]
    if recalibrated:
        lines += ['', "BN statistics: these runs' faded twins were deployed with their BatchNorm statistics recomputed "
                  'on the training data (`runner.recalibrate_bn`); the table reads the deployed twin. As trained '
                  '(moving-average statistics) -> deployed: '
                  + '; '.join(f'{r["label"]} s{r["seed"]}: {r["test_acc_unfolded"]:.2f} -> {r["test_acc"]:.2f} %'
                              for r in recalibrated) + '.']
    joint = [r for r in runs.values() if r.get('joint_teacher_test_acc') is not None]
    if joint:
        lines += ['', 'Joint-teacher runs: the teacher keeps training on its own cross-entropy during the run; the twin '
                  'is still compared with the teacher it started from. The teacher trained along reached: '
                  + '; '.join(f'{r["label"]} s{r["seed"]}: {r["teacher_test_acc"]:.2f} -> '
                              f'{r["joint_teacher_test_acc"]:.2f} %' for r in joint) + '.']
    return lines


def matched_table(matched_rows, title: str, intro: str, row_header: str, versus: str) -> list:
    """Markdown lines of a table of runs matched by seed and teacher (:func:`paired`); none when nothing matched."""
    if not matched_rows:
        return []
    lines = ['', title, '', intro + ' SE: standard error of the mean difference (sd / sqrt(n)); t = mean / SE, read '
             'against Student\'s t with n - 1 degrees of freedom (5 % two-sided: 12.7 at n = 2, 2.57 at n = 6, '
             '2.26 at n = 10).', '',
             f'| {row_header} | matched runs (seed, teacher %: {versus}) | mean difference (points) | n | sd | SE | t '
             '| positive |', '|---|---|---|---|---|---|---|---|']
    for label, matched in matched_rows.items():
        cells = '; '.join(f's{seed}, {teacher:.2f}: {a:.2f} vs {b:.2f}' for seed, teacher, a, b in matched)
        d = difference_stats([a - b for _, _, a, b in matched])
        sd_se_t = ' | '.join('' if d[k] is None else f'{d[k]:.2f}' for k in ('sd', 'se', 't'))
        lines.append(f'| {label} | {cells} | {d["mean"]:+.2f} | {d["n"]} | {sd_se_t} | {d["positive"]} of {d["n"]} |')
    return lines


def difference_stats(diffs) -> dict:
    """Mean, sample sd, standard error, t = mean / SE and the count of positive values of matched differences
    (sd, SE and t are None below 2 differences, t also when they are all equal)."""
    diffs = list(diffs)
    if not diffs:
        raise ValueError('difference_stats needs at least one matched difference')
    n, mean = len(diffs), statistics.mean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else None
    se = sd / math.sqrt(n) if sd is not None else None
    return dict(n=n, mean=mean, sd=sd, se=se, t=mean / se if se else None, positive=sum(x > 0 for x in diffs))


def ablation_plot(table, teachers, path, title):
    plt = pyplot()
    labels = list(table)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.5))
    y = range(len(labels))
    ax.barh(y, [table[k]['mean'] for k in labels], xerr=[table[k]['spread'] for k in labels],
            color=['#c44e52' if k == DEFAULT_ROW else '#55a868' for k in labels])
    for i, k in enumerate(labels):
        ax.plot(table[k]['accs'], [i] * len(table[k]['accs']), 'k.', ms=4)
    for teacher, style in zip(teachers, ('--', ':', '-.', (0, (5, 1)), (0, (1, 3)), (0, (3, 1, 1, 1, 1, 1)))):
        ax.axvline(teacher, color='#4c72b0', ls=style, label=f'teacher {teacher:.2f} %')
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel('last-epoch test accuracy (%)')
    ax.legend(fontsize=8, loc='lower right')
    ax.set_title(title.replace(': ', ':\n', 1) + f'\n(red: the default recipe, {DEFAULT_ROW})', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')
    plt.close(fig)
