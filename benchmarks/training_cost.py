"""Training cost per step of the twin trained alone, Hinton KD and JointRD's variants on the same pair and batch:
median step time (methods interleaved, after warm-up) and peak memory of one step (a fresh process per method, peak
RSS above the state before the step, with glibc returning large blocks to the OS), at one or more architectures.

The goals it checks (issue 23): the default recipe's step <= 1.25x KD's, one sampled path <= 1.05x KD, the fading
twin alone <= 1.05x the plain twin's step, the lean memory mode's peak <= 1.15x KD's.

    python benchmarks/training_cost.py --arch resnet56_cifar resnet18_cifar --repeats 6
Writes benchmarks/results/training_cost.{json,md,png}.
"""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
from report import pyplot, write_report  # noqa: E402
from jointrd_timm.deploy.latency import paired_ratio  # noqa: E402
from jointrd_timm.recipes import DEFAULT_RECIPE as _DEFAULT  # noqa: E402

# label -> (kind, JointRDConfig fields). 'JointRD + fade' is the default recipe's loss (jointrd_timm.recipes); the
# cost does not depend on where eta is
DEFAULT_RECIPE = _DEFAULT.jointrd_fields()
METHODS = {
    'plain CE (twin alone)': ('ce', None),
    'Hinton KD': ('kd', None),
    'fading twin alone': ('fade', None),
    'residual model CE (the teacher alone)': ('residual', None),
    'JointRD (all paths)': ('jointrd', dict()),
    'JointRD (1 sampled path)': ('jointrd', dict(hybrid_paths=1)),
    'JointRD (all paths, lean memory off)': ('jointrd', dict(lean_memory=False)),
    'JointRD + fade (default recipe)': ('jointrd', dict(DEFAULT_RECIPE)),
    'JointRD + fade, lean memory off': ('jointrd', dict(DEFAULT_RECIPE, lean_memory=False)),
    'JointRD + fade, joint teacher': ('jointrd', dict(DEFAULT_RECIPE, teacher_mode='joint')),
}
# the page's fixed text (what was changed for the goals, and the count they are compared with); every number on the
# page comes from the record
READING = """## What the step does, and the floor the goals compare with

Changes for these goals (`methods/jointrd.py`, `twins/fade.py`), each tested for the same loss and gradients in
`tests/test_jointrd_cost.py` and `tests/test_fade.py`:
- the teacher's forward runs only where a term reads its logits or features (KD, lambda > 0, adversarial, joint
  teacher); with the default recipe (frozen teacher, CE terms only) only the teacher's tails run;
- a frozen teacher's tails run BN-folded (`fold_teacher_bn`): their convs save nothing for the backward (the input
  gradient needs only the weights) and their ReLUs a bool mask, whose backward is one multiply;
- the pre-activation taps copy features only when lambda > 0;
- `lean_memory` (on by default): each hybrid path's backward runs when the twin's own backward reaches the stage
  output it starts from, after the twin's later stages have freed their activations, instead of at the start of the
  backward, when all of them are alive (same computation, another order; DECISION in `JointRDConfig`);
- the frozen tails' convs backpropagate by a transposed conv of the gradient (no input-sized tensor first);
- the fading twin scales its shortcuts in one fused op (`addcmul`: no tensor for the scaled shortcut; at s = 1 the
  residual net's cost). It still computes the shortcut branch at s = 0: skipping it would leave the projections
  without gradients, which multi-GPU DDP rejects (DECISION in docs/design.md, "Shortcut fading").

The count the goals come from: a KD step is the twin's forward and backward (about 3 forward units) plus the
teacher's forward (1): 4 units. JointRD with all hybrid paths adds the tails' forward (stages k+1..n from each
h_k: about one network's forward at three stages of equal cost, 1.5 at four) and their input-gradient backward
(as much again, no weight gradients): 5 units, 1.25x KD, at three stages (resnet56_cifar); 6 units, 1.5x KD, at four
(resnet18_cifar), where the 1.25x goal is below the count. One sampled path adds about half of that. The fading twin
alone runs the residual graph (the shortcut additions, the projection shortcuts) while 0 < s < 1, which the plain
twin does not; its floor is the residual model's own step. Beyond that floor it only multiplies by s inside the
addition (and by s again in the backward), and it adds out of place where timm's blocks add in place (torch.fx
records `x += shortcut` as an addition, so the rewrite cannot tell where overwriting the branch tensor was safe).
Step times on a shared machine scatter by up to a quarter of their median (the IQR column), step to step, so a
difference of a few percent between two rows is within it at these repeats. A time goal this page leaves undecided
is read again by `benchmarks/step_ratios.py` with many more rounds and a bootstrap interval (the goals above take
its verdict, the table under them lists each reading): the fading twin's on
[training_cost_ratios.md](training_cost_ratios.md), which also times the fade's extra work op by op, one sampled
path's on [training_cost_ratios_sampled.md](training_cost_ratios_sampled.md), the default recipe's on
[training_cost_ratios_recipe.md](training_cost_ratios_recipe.md)."""
# (what, method, reference method, at most this ratio, 'time' or 'memory')
GOALS = [('default recipe step', 'JointRD + fade (default recipe)', 'Hinton KD', 1.25, 'time'),
         ('one sampled path step', 'JointRD (1 sampled path)', 'Hinton KD', 1.05, 'time'),
         ('fading twin alone step', 'fading twin alone', 'plain CE (twin alone)', 1.05, 'time'),
         ('lean mode peak memory (all paths)', 'JointRD (all paths)', 'Hinton KD', 1.15, 'memory'),
         ('lean mode peak memory (default recipe)', 'JointRD + fade (default recipe)', 'Hinton KD', 1.15, 'memory')]


def make_step(method: str, arch: str, batch: int, size: int, channels_last: bool = False, compile_backend=None):
    """A no-argument callable doing one full training step (forward, backward, SGD step) of ``method``; with
    ``compile_backend``, its models compiled as ``runner.compile`` does (``runner.compile_modules``; the first steps
    compile, so warm up before timing)."""
    import timm
    import torch.nn.functional as F
    import jointrd_timm  # noqa: F401
    from jointrd_timm.methods import JointRD, JointRDConfig
    from jointrd_timm.methods import FadingStudent
    from jointrd_timm.methods.base import hinton_kd
    kind, fields = METHODS[method]
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10).eval().requires_grad_(False)
    fading = kind == 'fade' or (kind == 'jointrd' and 'shortcut_fade' in fields)
    twin = timm.create_model(f'plain_{arch}', num_classes=10, **(dict(shortcut_fade=True) if fading else {})).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    if kind == 'jointrd':
        model = JointRD(twin, teacher, JointRDConfig(**fields)).train()
    elif kind == 'residual':  # the residual architecture trained on its own: what the fading twin computes mid-fade
        model = timm.create_model(arch, num_classes=10).train()
    elif kind == 'fade':
        model = FadingStudent(twin, _DEFAULT.shortcut_fade).train()
    else:
        model = twin
    if hasattr(model, 'set_epoch'):
        model.set_epoch(5, 100, 20)  # mid-fade (0 < s < 1): the fading blocks' scale multiply runs
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if compile_backend:
        from jointrd_timm.training.runner import compile_modules
        compile_modules(model, compile_backend)
        if kind == 'kd':
            compile_modules(teacher, compile_backend)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if kind == 'jointrd':
            loss = model(x, y)['loss']
            model.step_in_epoch.fill_(0)  # stay mid-run however many steps are timed
        elif kind == 'kd':
            with torch.no_grad():
                t = teacher(x)
            s = model(x)
            loss = 0.1 * F.cross_entropy(s, y) + 0.9 * hinton_kd(s, t, 4.0)
        else:
            loss = F.cross_entropy(model(x), y)
            if kind == 'fade':
                model.step_in_epoch.fill_(0)
        loss.backward()
        optimizer.step()
    return step


_PEAK = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[5])
from training_cost import make_step
torch.set_num_threads(int(sys.argv[4]))
step = make_step(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[6]), sys.argv[7] == '1')
step(); step()
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
open('/proc/self/clear_refs', 'w').write('5')
before = status('VmRSS')
step()
print(json.dumps(dict(peak=status('VmHWM') - before)))
'''


def measure(arch: str, args) -> dict:
    from jointrd_timm.deploy.latency import compare_latency
    steps = {m: make_step(m, arch, args.batch, args.size, args.channels_last) for m in METHODS}
    timed = compare_latency(steps, repeats=args.repeats, warmup=1, inference=False,
                            clock=time.process_time if args.clock == 'cpu' else time.perf_counter)
    del steps
    peaks = {}
    for m in METHODS:
        # large blocks through mmap: freed tensors go back to the OS, so RSS follows live memory step by step
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, '-c', _PEAK, m, arch, str(args.batch), str(args.threads),
                              str(Path(__file__).parent), str(args.size), str(int(args.channels_last))],
                             capture_output=True, text=True, check=True, env=env)
        peaks[m] = json.loads(out.stdout.strip().splitlines()[-1])['peak']
    kd, plain = timed['Hinton KD']['median_ms'], timed['plain CE (twin alone)']['median_ms']
    return {m: dict(step_ms=timed[m]['median_ms'], iqr_ms=timed[m]['iqr_ms'], times_ms=timed[m]['times_ms'],
                    peak_mb=peaks[m] / 2**20,
                    time_vs_kd=timed[m]['median_ms'] / kd, time_vs_plain=timed[m]['median_ms'] / plain,
                    memory_vs_kd=peaks[m] / peaks['Hinton KD']) for m in METHODS}


# a step-time median whose interquartile range exceeds this share of it is not a measurement (a loaded machine)
MAX_RELATIVE_IQR = 0.25


def scattered(median_ms: float, iqr_ms: float) -> bool:
    """Whether a step time is not a measurement by the rule above."""
    return iqr_ms > MAX_RELATIVE_IQR * median_ms


def interval_verdict(low: float, high: float, limit: float) -> str:
    """A goal ``ratio <= limit`` judged by an interval of the ratio: met when all of it is at or below the limit,
    missed when all of it is above, else undecided."""
    if high <= limit:
        return 'yes'
    if low > limit:
        return '**no**'
    return 'undecided (the interval contains the limit)'


def goal_rows(rows: dict) -> list:
    """The goals judged on ``rows``. A time goal, where the record holds the steps: by the 95 % bootstrap interval of
    the per-round ratio's median (unmeasured when the per-round ratios scatter by more than a quarter); else by the
    ratio of the medians (unmeasured when either scatters). A memory goal: by the ratio of the peaks."""
    out = []
    for what, method, reference, limit, kind in GOALS:
        if kind == 'time':
            ratio, spread, noisy, interval = time_ratio(rows, method, reference)
        else:
            ratio, spread, noisy, interval = rows[method]['peak_mb'] / rows[reference]['peak_mb'], None, False, None
        if noisy:
            met = 'unmeasured (IQR > 25 % of the median)'
        elif interval is not None:
            met = interval_verdict(*interval, limit)
        else:
            met = 'yes' if ratio <= limit else '**no**'
        out.append(dict(goal=what, method=method, reference=reference, limit=limit, ratio=ratio, ratio_iqr=spread,
                        interval=interval, met=met))
    return out


def verdict_lines(results: dict, shares: dict, longer: Optional[dict] = None) -> list:
    """The goals read from the record: which are met, which are not and by how much, which are not measurements.
    A time goal this record leaves undecided or unmeasured is judged by a run with more rounds where ``longer``
    (:func:`more_rounds`) has one."""
    longer = longer or {}
    lines = ['## Goals at a glance', '']
    for arch, rows in results.items():
        goals = [decided(g, arch, longer) for g in goal_rows(rows)]
        met = [g['goal'] + (g['where'] and f' ({g["where"]})') for g in goals if g['met'] == 'yes']
        missed = [f'{g["goal"]} ({g["ratio"]:.2f}x against {g["limit"]:.2f}x{g["where"] and "; " + g["where"]})'
                  for g in goals if g['met'] == '**no**']
        noisy = [g['goal'] for g in goals if g['met'].startswith('unmeasured')]
        undecided = [f'{g["goal"]} ({g["interval"][0]:.2f}-{g["interval"][1]:.2f}x against {g["limit"]:.2f}x'
                     f'{g["where"] and "; " + g["where"]})' for g in goals if g['met'].startswith('undecided')]
        lines.append(f'- {arch}: met: {", ".join(met) or "none"}; not met: {", ".join(missed) or "none"}'
                     + (f'; undecided (the interval of the ratio contains the limit): '
                        f'{", ".join(undecided)}' if undecided else '')
                     + (f'; not measured (the step times scatter by more than a quarter of their median, a loaded '
                        f'machine): {", ".join(noisy)}' if noisy else '') + '.')
    read_again = [(arch, g, longer[arch, g['goal']]) for arch, rows in results.items() for g in goal_rows(rows)
                  if (arch, g['goal']) in longer]
    if read_again:
        lines += ['', 'A goal this page leaves undecided or unmeasured is judged above by the run that read it with the '
                  'most rounds (the same methods, batch and image size, round by round, a 95 % bootstrap interval); '
                  'every such reading:', '',
                  '| pair | goal | here | more rounds | rounds | verdict | page |', '|---|---|---|---|---|---|---|']
        for arch, g, p in read_again:
            here = f'{g["ratio"]:.2f}x' + ('' if g['interval'] is None else
                                           f' ({g["interval"][0]:.2f}-{g["interval"][1]:.2f}x)')
            lines.append(f'| {arch} | {g["goal"]} | {here}, {g["met"]} | {p["median"]:.3f}x ({p["low"]:.3f}-'
                         f'{p["high"]:.3f}x) | {p["rounds"]} | {p["verdict"]} | [{p["page"]}.md]({p["page"]}.md) |')
    lines += ['', '## The fading twin against its floor', '',
              'Mid-fade (0 < s < 1) the fading twin computes the residual network: every shortcut addition, every '
              'projection shortcut, with the scale fused into the addition. The residual model\'s own CE step is that '
              'computation without the scale: the floor of the fading twin\'s step.', '',
              '| pair | fading twin / plain twin | residual model / plain twin | fading twin / residual model '
              '| goal (fading / plain) |',
              '|---|---|---|---|---|']
    for arch, rows in results.items():
        fade, residual = fading_floor(rows)
        lines.append(f'| {arch} | {fade} | {residual} | {fading_floor(rows, "residual model CE (the teacher alone)")[0]}'
                     f' | {GOALS[2][3]:.2f}x |')
    lines += ['', '## The default recipe against its floor', '',
              'The default recipe is the fading twin plus the teacher tails of JointRD. Two floors read from the same '
              'run: the sum of its measured parts (the fading twin\'s step + the tails, that is JointRD all paths - '
              'plain CE), and the count of the section below (the fading twin\'s step + the tails\' forward and '
              'input-gradient backward, each the tails\' FLOPs share of a teacher forward times one teacher forward, '
              'Hinton KD - plain CE: the forward KD adds). The share is counted, not timed: about 1 at three stages '
              'of equal cost, 1.5 at four. Sums of parts need the medians, so this table divides medians: it can '
              'differ from the goal\'s per-round ratio above by the scatter.', '',
              '| pair | default recipe / KD | sum of its parts / KD | the count / KD | goal |', '|---|---|---|---|---|']
    for arch, rows in results.items():
        f = default_floors(rows, shares[arch])
        lines.append(f'| {arch} | {f["measured"]:.2f}x | {f["parts"]:.2f}x | {f["count"]:.2f}x | '
                     f'{GOALS[0][3]:.2f}x |')
    lines += ['', 'Its peak memory against the same parts: the fading twin\'s own peak (mid-fade it holds the residual '
              'network\'s activations, the projection shortcuts\' included) plus what the lean tails add to the plain '
              'twin\'s (JointRD all paths - plain CE).', '',
              '| pair | default recipe peak / KD | fading twin + lean tails / KD | goal |', '|---|---|---|---|']
    for arch, rows in results.items():
        m = default_memory_floor(rows)
        lines.append(f'| {arch} | {m["measured"]:.2f}x | {m["parts"]:.2f}x | {GOALS[4][3]:.2f}x |')
    return lines


def more_rounds(out: Path, batch: int, size: int) -> dict:
    """The time goals read again on step_ratios pages (``training_cost_ratios*.json`` in ``out``) at this batch and
    image size: ``{(arch, goal): pair}``, each pair (ratio, interval, rounds, verdict) with its ``page``; where several
    records read the same goal, the one with the most rounds."""
    found = {}
    for path in sorted(out.glob('training_cost_ratios*.json')):
        record = json.loads(path.read_text())
        recorded = step_arguments('').parse_known_args(shlex.split(record['meta']['command'])[2:])[0]
        if (recorded.batch, recorded.size) != (batch, size):
            continue
        for arch, result in record['archs'].items():
            for pair in result['pairs']:
                for what, method, reference, _, kind in GOALS:
                    if kind != 'time' or (pair['method'], pair['reference']) != (method, reference):
                        continue
                    best = found.get((arch, what))
                    if best is None or pair['rounds'] > best['rounds']:
                        found[arch, what] = dict(pair, page=path.stem)
    return found


def decided(goal: dict, arch: str, longer: dict) -> dict:
    """``goal`` (a row of :func:`goal_rows`) as finally judged: this page's verdict, unless it is undecided or
    unmeasured here and a run with more rounds (:func:`more_rounds`) read it (whose verdict and narrower interval
    then stand, ``where`` naming that run)."""
    pair = longer.get((arch, goal['goal']))
    if goal['met'] in ('yes', '**no**') or pair is None:
        return dict(goal, where='')
    return dict(goal, met=pair['verdict'], ratio=pair['median'], interval=(pair['low'], pair['high']),
                where=f'{pair["rounds"]} rounds, [{pair["page"]}.md]({pair["page"]}.md)')


def time_ratio(rows: dict, method: str, reference: str) -> tuple:
    """``method``'s step time over ``reference``'s: ``(ratio, IQR, noisy, interval)``. Where the record holds the
    steps, round by round (both steps of a round ran under the same load): the median of the per-round ratios, their
    IQR, noisy when that IQR exceeds a quarter of the ratio, and the 95 % bootstrap interval of the median. Else the
    ratio of the medians (IQR and interval None), noisy when either median scatters."""
    a, b = rows[method], rows[reference]
    if 'times_ms' in a and 'times_ms' in b:
        paired = paired_ratio(a['times_ms'], b['times_ms'])
        return (paired['median'], paired['iqr'], scattered(paired['median'], paired['iqr']),
                (paired['low'], paired['high']))
    noisy = scattered(a['step_ms'], a['iqr_ms']) or scattered(b['step_ms'], b['iqr_ms'])
    return a['step_ms'] / b['step_ms'], None, noisy, None


def step_ratio(rows: dict, method: str, reference: str) -> str:
    """:func:`time_ratio` as the page writes it."""
    ratio, spread, _, _ = time_ratio(rows, method, reference)
    return f'{ratio:.2f}x' + ('' if spread is None else f' (IQR {spread:.2f})')


def fading_floor(rows: dict, reference: str = 'plain CE (twin alone)') -> tuple:
    """The fading twin's and the residual model's step over ``reference``'s (see :func:`step_ratio`)."""
    return (step_ratio(rows, 'fading twin alone', reference),
            step_ratio(rows, 'residual model CE (the teacher alone)', reference))


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


def tail_share(arch: str, size: int) -> float:
    """FLOPs of the n-1 teacher tails (stages k+1..n and the head, from each h_k) over one teacher forward: about
    (n-1)/2 for n stages of equal cost (1 at the 3-stage CIFAR ResNets, 1.5 at the 4-stage ResNet-18)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode
    import jointrd_timm  # noqa: F401
    from jointrd_timm.methods.stages import StageSplit
    model = timm.create_model(arch, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    split = StageSplit(model, x)

    def flops(fn, *a):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn(*a)
        return counter.get_total_flops()
    hs = split.features(x)
    return sum(flops(split, h, k) for k, h in enumerate(hs[:-1], start=1)) / flops(model, x)


def step_arguments(doc: str) -> argparse.ArgumentParser:
    """The command line of a step-cost benchmark: pairs, batch, image size, repeats, threads, clock."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', nargs='+', default=['resnet56_cifar', 'resnet18_cifar'])
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=6)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help="'cpu': the process's CPU time per step (time.process_time), which other jobs on a shared "
                             "machine barely change; with --threads 1 it is the single-core step time")
    return parser


def run_header(meta: dict, clock: str) -> str:
    """The opening of a step-cost page: machine, load average before and after, minutes, clock."""
    return (f'Machine: {meta["machine"]}; load average (1, 5, 15 min) '
            f'{", ".join(f"{v:.1f}" for v in meta["load_before"])} before, '
            f'{", ".join(f"{v:.1f}" for v in meta["load_after"])} after ({meta["minutes"]} min). Step time = '
            + ('CPU time of the process (time.process_time)' if clock == 'cpu' else 'wall time'))


def measure_each_arch(args, measure, lines_for, plot, out: Path = ROOT / 'benchmarks/results', **meta_fields) -> None:
    """Run ``measure(arch, args)`` for each ``args.arch`` in turn; after each, write the record (``meta``, ``archs``),
    the page ``lines_for(results, meta, args)`` and the plot, so a long run keeps what it measured."""
    torch.set_num_threads(args.threads)
    load_before, start, results = os.getloadavg(), time.time(), {}
    for arch in args.arch:
        results[arch] = measure(arch, args)
        meta = dict(machine=f'{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, '
                            f'torch {torch.__version__}',
                    load_before=load_before, load_after=os.getloadavg(), minutes=round((time.time() - start) / 60, 1),
                    clock=args.clock, **meta_fields)
        lines = lines_for(results, meta, args)
        write_report(args.name, dict(meta=meta, archs=results), lines, lambda png: plot(results, png), out)
        print('\n'.join(lines), flush=True)


def main():
    parser = step_arguments(__doc__)
    parser.add_argument('--channels-last', action='store_true', help='models and batch in channels_last')
    parser.add_argument('--name', default='training_cost', help='results file stem under benchmarks/results')
    parser.add_argument('--report-only', action='store_true', help='rewrite the report from the recorded JSON')
    args = parser.parse_args()
    if args.report_only:
        recorded = json.loads((ROOT / f'benchmarks/results/{args.name}.json').read_text())
        # the page describes the recorded run (its repeats, batch, size, clock), not this command line's defaults
        name = args.name
        args = parser.parse_args(shlex.split(recorded['meta']['command'])[2:] + ['--report-only'])
        args.clock, args.name = recorded['meta'].get('clock', 'wall'), name
        write({a: r['rows'] for a, r in recorded['archs'].items()}, args, recorded['meta']['load_before'], None,
              recorded['meta'])
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.time()
    results = {}
    for arch in args.arch:  # the report is rewritten after each architecture: a long run keeps what it measured
        results[arch] = measure(arch, args)
        write(results, args, load_before, start)


def write(results, args, load_before, start, meta=None):
    meta = meta or dict(command='python benchmarks/training_cost.py ' + ' '.join(
                    f'--{k.replace("_", "-")} {" ".join(v) if isinstance(v, list) else v}'
                    for k, v in vars(args).items() if k not in ('channels_last', 'name', 'report_only', 'clock'))
                + (f' --clock {args.clock}' if args.clock != 'wall' else '')
                + (' --channels-last' if args.channels_last else '') + f' --name {args.name}',
                machine=f'{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads',
                torch=torch.__version__, load_before=load_before, load_after=os.getloadavg(), clock=args.clock,
                minutes=round((time.time() - start) / 60, 1))
    out = ROOT / 'benchmarks/results'
    for rows in results.values():  # the time ratios of the table and the plot, round by round where recorded
        for m, row in rows.items():
            row['time_vs_kd'], row['time_vs_kd_iqr'], _, _ = time_ratio(rows, m, 'Hinton KD')
            row['time_vs_plain'], row['time_vs_plain_iqr'], _, _ = time_ratio(rows, m, 'plain CE (twin alone)')
    shares = {a: tail_share(a, args.size) for a in results}  # counted from the architecture, recorded with the run
    payload = dict(meta=meta, archs={a: dict(rows=r, goals=goal_rows(r), tail_share=shares[a])
                                     for a, r in results.items()})
    lines = [f'# Training cost per step: batch {args.batch}, {args.size} px'
             + (', channels_last' if args.channels_last else ''), '',
             f'Machine: {meta["machine"]}; torch {meta["torch"]}; load average (1, 5, 15 min) '
             f'{", ".join(f"{v:.1f}" for v in load_before)} before, {", ".join(f"{v:.1f}" for v in meta["load_after"])}'
             f' after ({meta["minutes"]} min). Step time = '
             + ('CPU time of the process (time.process_time)' if meta.get('clock') == 'cpu' else 'wall time')
             + f', median of {args.repeats} steps per method, methods interleaved, after one warm-up round (a time '
             'ratio, where the record holds the steps, is the median of the ratios of the two steps of each round; the '
             'goals give its IQR); peak '
             'memory = peak RSS of one step above the state before it, fresh process per method. Command: '
             f'`{meta["command"]}`.', '']
    for arch, r in results.items():
        lines += [f'## {arch} pair', '',
                  '| method | step ms (median) | IQR ms | / KD | / twin alone | peak memory of a step MB | / KD |',
                  '|---|---|---|---|---|---|---|']
        for m, row in r.items():
            lines.append(f'| {m} | {row["step_ms"]:.0f} | {row["iqr_ms"]:.0f} | {row["time_vs_kd"]:.2f}x | '
                         f'{row["time_vs_plain"]:.2f}x | {row["peak_mb"]:.0f} | {row["memory_vs_kd"]:.2f}x |')
        lines += ['', '| goal | measured | limit | met |', '|---|---|---|---|']
        for g in goal_rows(r):
            spread = '' if g.get('ratio_iqr') is None else f' (IQR {g["ratio_iqr"]:.2f}, 95 % interval ' \
                f'{g["interval"][0]:.2f}-{g["interval"][1]:.2f}x)'
            lines.append(f'| {g["goal"]} ({g["method"]} / {g["reference"]}) | {g["ratio"]:.2f}x{spread} | '
                         f'{g["limit"]:.2f}x | {g["met"]} |')
        lines.append('')
    longer = {} if args.channels_last else more_rounds(out, args.batch, args.size)  # step_ratios: no channels_last
    lines += verdict_lines(results, shares, longer) + ['', READING]
    write_report(args.name, payload, lines, lambda png: _plot(results, png), out)
    print('\n'.join(lines), flush=True)


def _plot(results, path):
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4 * len(results)), squeeze=False)
    for (arch, rows), (a, b) in zip(results.items(), axes):
        labels = list(rows)
        a.barh(labels, [r['time_vs_kd'] for r in rows.values()])
        a.axvline(1.0, color='k', lw=0.8)
        a.set_xlabel(f'{arch}: step time / KD (median)')
        b.barh(labels, [r['memory_vs_kd'] for r in rows.values()], color='#dd8452')
        b.axvline(1.0, color='k', lw=0.8)
        b.set_xlabel(f'{arch}: peak memory of a step / KD')
        for ax in (a, b):
            ax.tick_params(axis='y', labelsize=7)
            ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110, format='png')
    plt.close(fig)


if __name__ == '__main__':
    main()
