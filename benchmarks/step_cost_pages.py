"""The pages of step_cost.py, one per question, each generated from its own record only (``page``): the methods'
step time and memory with the goals judged on them; ratios with a bootstrap interval; a runner option against the
default. What the step computes, and the count the goals come from: docs/step_cost.md.
"""
from typing import Callable, Dict, List, Tuple

from jointrd_timm.deploy.latency import paired_ratio
from report import pyplot, save_figure

# (what, method, reference method, at most this ratio, 'time' or 'memory'): the step-cost goals of issue 23
GOALS = [('default recipe step', 'JointRD + fade (default recipe)', 'Hinton KD', 1.25, 'time'),
         ('one sampled path step', 'JointRD (1 sampled path)', 'Hinton KD', 1.05, 'time'),
         ('fading twin alone step', 'fading twin alone', 'plain CE (twin alone)', 1.05, 'time'),
         ('lean mode peak memory (all paths)', 'JointRD (all paths)', 'Hinton KD', 1.15, 'memory'),
         ('lean mode peak memory (default recipe)', 'JointRD + fade (default recipe)', 'Hinton KD', 1.15, 'memory')]
# a step-time ratio whose interquartile range exceeds this share of it is not a measurement (a loaded machine)
MAX_RELATIVE_IQR = 0.25
LEVEL = 0.95
UNMEASURED = 'unmeasured (IQR > 25 % of the median)'
# runner option: (name of the default, name of the option, what it changes in make_step, warm-up rounds)
OPTIONS = {'channels_last': ('contiguous', 'channels_last', dict(channels_last=True), 1),
           'compile': ('eager', 'compiled', dict(compile_backend='inductor'), 3)}
OPTION_METHODS = ('plain CE (twin alone)', 'Hinton KD', 'JointRD + fade (default recipe)')
OPTION_WORDS = {
    'channels_last': ('Training step in channels_last', 'channels_last: the models (teacher included) and the batch '
                      'converted once before the run. Below 1: channels_last is faster.'),
    'compile': ('Training step under torch.compile', 'compiled: `runner.compile_modules` with the inductor backend '
                '(what `runner.compile: true` does), the compilation done in the warm-up rounds, which are not timed. '
                'Below 1: compiled is faster.'),
}
# the pages that read a time goal again with more rounds (step_cost.py --question ratios)
RATIO_PAGES = {'fading twin alone step': ['training_cost_ratios'],
               'one sampled path step': ['training_cost_ratios_sampled', 'training_cost_ratios_sampled_long'],
               'default recipe step': ['training_cost_ratios_recipe']}


def scattered(median: float, iqr: float) -> bool:
    """Whether a step time (or ratio) is not a measurement: its IQR is above a quarter of its median."""
    return iqr > MAX_RELATIVE_IQR * median


def interval_verdict(low: float, high: float, limit: float) -> str:
    """A goal ``ratio <= limit`` judged by an interval of the ratio: met when all of it is at or below the limit,
    missed when all of it is above, else undecided."""
    if high <= limit:
        return 'yes'
    if low > limit:
        return '**no**'
    return 'undecided (the interval contains the limit)'


def time_ratio(rows: dict, method: str, reference: str) -> tuple:
    """``method``'s step time over ``reference``'s: ``(ratio, IQR, noisy, interval)``. Where the record holds the
    steps, round by round (both steps of a round ran under the same load): the median of the per-round ratios, their
    IQR, noisy when that IQR exceeds a quarter of the ratio, and the 95 % bootstrap interval of the median. Else the
    ratio of the medians (IQR and interval None), noisy when either median scatters."""
    a, b = rows[method], rows[reference]
    if 'times_ms' in a and 'times_ms' in b:
        p = paired_ratio(a['times_ms'], b['times_ms'], LEVEL)
        return p['median'], p['iqr'], scattered(p['median'], p['iqr']), (p['low'], p['high'])
    noisy = scattered(a['step_ms'], a['iqr_ms']) or scattered(b['step_ms'], b['iqr_ms'])
    return a['step_ms'] / b['step_ms'], None, noisy, None


def goal_rows(rows: dict) -> list:
    """The goals judged on ``rows``: a time goal by :func:`time_ratio` (its interval where the steps are recorded,
    unmeasured when it scatters); a memory goal by the ratio of the peaks."""
    out = []
    for what, method, reference, limit, kind in GOALS:
        if kind == 'time':
            ratio, spread, noisy, interval = time_ratio(rows, method, reference)
        else:
            ratio, spread, noisy, interval = rows[method]['peak_mb'] / rows[reference]['peak_mb'], None, False, None
        met = UNMEASURED if noisy else interval_verdict(*interval, limit) if interval else \
            'yes' if ratio <= limit else '**no**'
        out.append(dict(goal=what, method=method, reference=reference, limit=limit, ratio=ratio, ratio_iqr=spread,
                        interval=interval, met=met))
    return out


def run_header(meta: dict, clock: str) -> str:
    """The opening of a step-cost page: machine, load average before and after, minutes, clock."""
    torch = f'; torch {meta["torch"]}' if 'torch' in meta and 'torch' not in meta['machine'] else ''
    return (f'Machine: {meta["machine"]}{torch}; load average (1, 5, 15 min) '
            f'{", ".join(f"{v:.1f}" for v in meta["load_before"])} before, '
            f'{", ".join(f"{v:.1f}" for v in meta["load_after"])} after ({meta["minutes"]} min). Step time = '
            + ('CPU time of the process (time.process_time)' if clock == 'cpu' else 'wall time'))


def page(question: str, record: dict, settings: dict) -> Tuple[List[str], Callable]:
    """(page lines, plot) of a step-cost record; derived values (ratios, goals) are written into the record."""
    if question == 'methods':
        return methods_page(record, settings)
    if question == 'ratios':
        return ratios_page(record, settings)
    return option_page(question, record, settings)


# -- methods ------------------------------------------------------------------------------------------------------
def methods_page(record: dict, settings: dict) -> tuple:
    archs, meta = record['archs'], record['meta']
    for result in archs.values():  # the time ratios of the table and the plot, round by round where recorded
        rows = result['rows']
        for m, row in rows.items():
            row['time_vs_kd'], row['time_vs_kd_iqr'], _, _ = time_ratio(rows, m, 'Hinton KD')
            row['time_vs_plain'], row['time_vs_plain_iqr'], _, _ = time_ratio(rows, m, 'plain CE (twin alone)')
        result['goals'] = goal_rows(rows)
    lines = [f'# Training cost per step: batch {settings["batch"]}, {settings["size"]} px'
             + (', channels_last' if settings.get('channels_last') else ''), '',
             run_header(meta, settings['clock']) + f', median of {settings["repeats"]} steps per method, methods '
             'interleaved, after one warm-up round (a time ratio, where the record holds the steps, is the median of the '
             'ratios of the two steps of each round; the goals give its IQR); peak memory = peak RSS of one step above '
             f'the state before it, fresh process per method. Command: `{meta["command"]}`.', '']
    for arch, result in archs.items():
        lines += [f'## {arch} pair', '',
                  '| method | step ms (median) | IQR ms | / KD | / twin alone | peak memory of a step MB | / KD |',
                  '|---|---|---|---|---|---|---|']
        lines += [f'| {m} | {row["step_ms"]:.0f} | {row["iqr_ms"]:.0f} | {row["time_vs_kd"]:.2f}x | '
                  f'{row["time_vs_plain"]:.2f}x | {row["peak_mb"]:.0f} | {row["memory_vs_kd"]:.2f}x |'
                  for m, row in result['rows'].items()]
        lines += ['', '| goal | measured | limit | met |', '|---|---|---|---|']
        for g in result['goals']:
            spread = '' if g['ratio_iqr'] is None else \
                f' (IQR {g["ratio_iqr"]:.2f}, 95 % interval {g["interval"][0]:.2f}-{g["interval"][1]:.2f}x)'
            lines.append(f'| {g["goal"]} ({g["method"]} / {g["reference"]}) | {g["ratio"]:.2f}x{spread} | '
                         f'{g["limit"]:.2f}x | {g["met"]} |')
        lines.append('')
    lines += glance_lines(archs) + floor_lines(archs)
    lines += ['', 'What the step computes, what was changed for these goals, and the count they come from: '
                  '[docs/step_cost.md](../../docs/step_cost.md).']
    return lines, lambda png: methods_plot(archs, png)


def glance_lines(archs: dict) -> list:
    """Each pair's goals by verdict, and where an undecided time goal is read with more rounds."""
    lines = ['## Goals at a glance', '']
    undecided = set()
    for arch, result in archs.items():
        goals = result['goals']
        met = [g['goal'] for g in goals if g['met'] == 'yes']
        missed = [f'{g["goal"]} ({g["ratio"]:.2f}x against {g["limit"]:.2f}x)' for g in goals if g['met'] == '**no**']
        noisy = [g['goal'] for g in goals if g['met'] == UNMEASURED]
        open_ = [f'{g["goal"]} ({g["interval"][0]:.2f}-{g["interval"][1]:.2f}x against {g["limit"]:.2f}x)'
                 for g in goals if g['met'].startswith('undecided')]
        undecided |= {g['goal'] for g in goals if g['met'].startswith('undecided') or g['met'] == UNMEASURED}
        lines.append(f'- {arch}: met: {", ".join(met) or "none"}; not met: {", ".join(missed) or "none"}'
                     + (f'; undecided (the interval of the ratio contains the limit): {", ".join(open_)}'
                        if open_ else '')
                     + (f'; not measured (the step times scatter by more than a quarter of their median, a loaded '
                        f'machine): {", ".join(noisy)}' if noisy else '') + '.')
    again = [f'{goal}: ' + ', '.join(f'[{p}.md]({p}.md)' for p in RATIO_PAGES[goal])
             for goal in RATIO_PAGES if goal in undecided]
    if again:
        lines += ['', 'A time goal left undecided or unmeasured here is read again with more rounds and a bootstrap '
                  'interval (`step_cost.py --question ratios`; each page judges it on its own rounds): '
                  + '; '.join(again) + '.']
    return lines


def floor_lines(archs: dict) -> list:
    """The fading twin against the residual model's step, and the default recipe against its parts and the count."""
    lines = ['', '## The fading twin against its floor', '',
             'Mid-fade (0 < s < 1) the fading twin computes the residual network: every shortcut addition, every '
             'projection shortcut, with the scale fused into the addition. The residual model\'s own CE step is that '
             'computation without the scale: the floor of the fading twin\'s step.', '',
             '| pair | fading twin / plain twin | residual model / plain twin | fading twin / residual model '
             '| goal (fading / plain) |', '|---|---|---|---|---|']
    fade, residual, plain = 'fading twin alone', 'residual model CE (the teacher alone)', 'plain CE (twin alone)'
    for arch, result in archs.items():
        rows = result['rows']
        lines.append(f'| {arch} | {step_ratio(rows, fade, plain)} | {step_ratio(rows, residual, plain)} | '
                     f'{step_ratio(rows, fade, residual)} | {GOALS[2][3]:.2f}x |')
    lines += ['', '## The default recipe against its floor', '',
              'The default recipe is the fading twin plus the teacher tails of JointRD. Two floors read from the same '
              'run: the sum of its measured parts (the fading twin\'s step + the tails, that is JointRD all paths - '
              'plain CE), and the count (the fading twin\'s step + the tails\' forward and input-gradient backward, '
              'each the tails\' FLOPs share of a teacher forward times one teacher forward, Hinton KD - plain CE: the '
              'forward KD adds). The share is counted, not timed: about 1 at three stages of equal cost, 1.5 at four. '
              'Sums of parts need the medians, so this table divides medians: it can differ from the goal\'s per-round '
              'ratio above by the scatter.', '',
              '| pair | default recipe / KD | sum of its parts / KD | the count / KD | goal |', '|---|---|---|---|---|']
    for arch, result in archs.items():
        f = default_floors(result['rows'], result['tail_share'])
        lines.append(f'| {arch} | {f["measured"]:.2f}x | {f["parts"]:.2f}x | {f["count"]:.2f}x | {GOALS[0][3]:.2f}x |')
    lines += ['', 'Its peak memory against the same parts: the fading twin\'s own peak (mid-fade it holds the residual '
              'network\'s activations, the projection shortcuts\' included) plus what the lean tails add to the plain '
              'twin\'s (JointRD all paths - plain CE).', '',
              '| pair | default recipe peak / KD | fading twin + lean tails / KD | goal |', '|---|---|---|---|']
    for arch, result in archs.items():
        m = default_memory_floor(result['rows'])
        lines.append(f'| {arch} | {m["measured"]:.2f}x | {m["parts"]:.2f}x | {GOALS[4][3]:.2f}x |')
    return lines


def step_ratio(rows: dict, method: str, reference: str) -> str:
    """:func:`time_ratio` as the page writes it."""
    ratio, spread, _, _ = time_ratio(rows, method, reference)
    return f'{ratio:.2f}x' + ('' if spread is None else f' (IQR {spread:.2f})')


def default_memory_floor(rows: dict) -> dict:
    """The default recipe's peak memory over KD's: as measured, and as the fading twin's peak plus what the (lean)
    tails add to the plain twin's."""
    peak = {m: r['peak_mb'] for m, r in rows.items()}
    parts = peak['fading twin alone'] + peak['JointRD (all paths)'] - peak['plain CE (twin alone)']
    return dict(measured=peak['JointRD + fade (default recipe)'] / peak['Hinton KD'], parts=parts / peak['Hinton KD'])


def default_floors(rows: dict, tail_share: float = 1.0) -> dict:
    """The default recipe's step over KD's: as measured, as the sum of its measured parts, and by the count (the
    fading twin's step plus the tails' forward and input-gradient backward, each ``tail_share`` teacher forwards,
    a teacher forward being what KD adds to plain CE)."""
    ms = {m: r['step_ms'] for m, r in rows.items()}
    kd, plain, fade = ms['Hinton KD'], ms['plain CE (twin alone)'], ms['fading twin alone']
    tails = ms['JointRD (all paths)'] - plain
    return dict(measured=ms['JointRD + fade (default recipe)'] / kd, parts=(fade + tails) / kd,
                count=(fade + 2 * tail_share * (kd - plain)) / kd)


def methods_plot(archs: dict, path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(archs), 2, figsize=(12, 4 * len(archs)), squeeze=False)
    for (arch, result), (a, b) in zip(archs.items(), axes):
        rows = result['rows']
        bars(a, list(rows), [r['time_vs_kd'] for r in rows.values()], f'{arch}: step time / KD (median)')
        bars(b, list(rows), [r['memory_vs_kd'] for r in rows.values()], f'{arch}: peak memory of a step / KD',
             color='#dd8452')
    save_figure(fig, path, dpi=110)


def bars(ax, labels, values, xlabel, color=None) -> None:
    """Horizontal bars of ratios against a line at 1 (the reference)."""
    ax.barh(labels, values, color=color)
    ax.axvline(1.0, color='k', lw=0.8)
    ax.set_xlabel(xlabel)
    ax.tick_params(axis='y', labelsize=7)
    ax.invert_yaxis()


# -- ratios -------------------------------------------------------------------------------------------------------
def pair_rows(times: dict) -> list:
    """Every pair of the measured methods (later over earlier, in the order given): the per-round ratio's median,
    IQR and bootstrap interval, and the verdict on the goal for that pair, if there is one."""
    goals = {(method, reference): limit for _, method, reference, limit, kind in GOALS if kind == 'time'}
    names, rows = list(times), []
    for i, reference in enumerate(names):
        for method in names[i + 1:]:
            p = paired_ratio(times[method], times[reference], LEVEL)
            limit = goals.get((method, reference))
            rows.append(dict(method=method, reference=reference, median=p['median'], iqr=p['iqr'], low=p['low'],
                             high=p['high'], rounds=len(times[method]), limit=limit,
                             verdict='' if limit is None else interval_verdict(p['low'], p['high'], limit)))
    return rows


def ratios_page(record: dict, settings: dict) -> tuple:
    archs, meta = record['archs'], record['meta']
    for result in archs.values():
        result['pairs'] = pair_rows(result['times_ms'])
    lines = [f'# Training step ratios with a confidence interval: batch {settings["batch"]}, {settings["size"]} px', '',
             run_header(meta, settings['clock'])
             + f'; {settings["repeats"]} rounds, each running every method once (rotating order, after one warm-up '
             'round). Each pair is read round by round: the median of the per-round ratios, their IQR, and a '
             f'{LEVEL:.0%} percentile-bootstrap interval of that median. A goal (the same as on '
             '[training_cost.md](training_cost.md)) is met when the whole interval is at or below its limit. The '
             'methods are those of the methods question (same pair, batch and step).', '']
    for arch, result in archs.items():
        lines += [f'## {arch} pair', '', f'| ratio | median | IQR | {LEVEL:.0%} interval | rounds | goal | verdict |',
                  '|---|---|---|---|---|---|---|']
        for p in result['pairs']:
            goal = '' if p['limit'] is None else f'<= {p["limit"]:.2f}x'
            lines.append(f'| {p["method"]} / {p["reference"]} | {p["median"]:.3f}x | {p["iqr"]:.3f} | '
                         f'{p["low"]:.3f}x - {p["high"]:.3f}x | {p["rounds"]} | {goal} | {p["verdict"]} |')
        lines.append('')
    ops = {arch: r['fade_ops'] for arch, r in archs.items() if 'fade_ops' in r}
    if ops:
        lines += ['## What the fade adds to the residual model\'s step, op by op', '',
                  'Mid-fade the fading twin computes the residual network; beyond it, per faded shortcut, one '
                  '`addcmul(branch, shortcut, s)` (out of place) where the residual block adds in place, and one '
                  '`grad * s` in the backward where the residual addition passes the gradient through. Timed alone at '
                  'the pair\'s shapes (the sums over one step\'s shortcuts, interleaved, medians), against the plain '
                  'twin\'s step of the run above. The fading twin\'s step is the residual model\'s plus this.', '',
                  '| pair | faded shortcuts | fade ops ms | residual additions ms | extra ms per step | '
                  'extra / plain twin step |', '|---|---|---|---|---|---|']
        lines += [f'| {arch} | {o["shortcuts"]} | {o["fade_ops_ms"]:.1f} | {o["residual_ops_ms"]:.1f} | '
                  f'{o["extra_ms"]:.1f} | {o["of_plain_step"]:.2%} |' for arch, o in ops.items()]
        lines.append('')
    return lines, lambda png: ratios_plot(archs, png)


def ratios_plot(archs: dict, path) -> None:
    plt = pyplot()
    pairs = [(f'{arch}: {p["method"]} / {p["reference"]}', p) for arch, r in archs.items() for p in r['pairs']]
    fig, ax = plt.subplots(figsize=(10, 1 + 0.45 * len(pairs)))
    ax.errorbar([p['median'] for _, p in pairs], range(len(pairs)), fmt='o', capsize=4,
                xerr=[[p['median'] - p['low'] for _, p in pairs], [p['high'] - p['median'] for _, p in pairs]])
    ax.set_yticks(range(len(pairs)), [label for label, _ in pairs], fontsize=7)
    ax.axvline(1.0, color='k', lw=0.8)
    ax.set_xlabel(f'training step time ratio (median of per-round ratios, {LEVEL:.0%} bootstrap interval)')
    ax.invert_yaxis()
    save_figure(fig, path, dpi=110)


# -- a runner option against the default --------------------------------------------------------------------------
def option_ratio(row: dict, base_name: str, name: str) -> None:
    """The option's step over the default's, round by round where the record holds the steps (else as recorded):
    ``ratio``, ``ratio_iqr``, ``noisy``, and the bootstrap interval ``low``-``high``, written into ``row``."""
    if f'{name}_times_ms' in row:
        p = paired_ratio(row[f'{name}_times_ms'], row[f'{base_name}_times_ms'], LEVEL)
        row.update(ratio=p['median'], ratio_iqr=p['iqr'], noisy=scattered(p['median'], p['iqr']), low=p['low'],
                   high=p['high'])


def option_page(question: str, record: dict, settings: dict) -> tuple:
    archs, meta = record['archs'], record['meta']
    base_name, name, _, warmup = OPTIONS[question]
    title, what = OPTION_WORDS[question]
    lines = [f'# {title}: batch {settings["batch"]}, {settings["size"]} px', '',
             run_header(meta, settings['clock'])
             + f', median of {settings["repeats"]} full training steps (forward, backward, SGD) per method, both ways, '
             f'all interleaved, after {"one warm-up round" if warmup == 1 else f"{warmup} warm-up rounds"}. {what} The '
             'ratio, where the record holds the steps, is the median of the per-round ratios (both ways of a round ran '
             f'under the same load), with their IQR and the {LEVEL:.0%} bootstrap interval of that median.', '']
    for arch, rows in archs.items():
        lines += [f'## {arch} pair', '', f'| method | {base_name} ms (IQR) | {name} ms (IQR) | {name} / '
                  f'{base_name} |', '|---|---|---|---|']
        for m, r in rows.items():
            option_ratio(r, base_name, name)
            lines.append(f'| {m} | {r[base_name + "_ms"]:.0f} ({r[base_name + "_iqr_ms"]:.0f}) | '
                         f'{r[name + "_ms"]:.0f} ({r[name + "_iqr_ms"]:.0f}) | {option_cell(r)} |')
        lines.append('')
    return lines, lambda png: option_plot(archs, png, base_name, name)


def option_cell(r: dict) -> str:
    if r['noisy']:
        return UNMEASURED
    spread = f'IQR {r["ratio_iqr"]:.2f}' if r.get('ratio_iqr') is not None else ''
    interval = f'{LEVEL:.0%} interval {r["low"]:.2f}-{r["high"]:.2f}x' if 'low' in r else ''
    inside = '; '.join(x for x in (spread, interval) if x)
    return f'{r["ratio"]:.2f}x' + (f' ({inside})' if inside else '')


def option_plot(archs: Dict, path, base_name: str, name: str) -> None:
    plt = pyplot()
    labels = [f'{arch}: {m}' for arch, rows in archs.items() for m in rows]
    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * len(labels)))
    bars(ax, labels, [r['ratio'] for rows in archs.values() for r in rows.values()],
         f'training step time, {name} / {base_name} (median)')
    save_figure(fig, path, dpi=110)
