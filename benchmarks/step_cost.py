"""Training step cost, side by side: step time (methods interleaved, round by round) and peak memory of plain CE, KD
and JointRD's variants, and of the runner's options (channels_last, torch.compile), on the same pair and batch.

Questions (``--question``), each with its record and page under benchmarks/results/ (step_cost_pages.py):

- ``methods`` (``training_cost``): every method's step time and peak memory (a fresh process per method, peak RSS
  above the state before the step), and the step-cost goals of issue 23 judged on them;
- ``ratios`` (``training_cost_ratios``; ``--name`` for another): a few ``--methods`` with many rounds, every pair's
  per-round ratio with a 95 % bootstrap interval of its median, and the goals judged by that interval;
- ``channels_last`` / ``compile`` (``training_cost_channels_last`` / ``training_cost_compile``): three methods with
  the option and without it, interleaved, the option's per-round ratio.

    python benchmarks/step_cost.py --question methods --arch resnet56_cifar resnet18_cifar --repeats 10 --threads 1 \\
        --clock cpu
    python benchmarks/step_cost.py --question ratios --arch resnet56_cifar --repeats 50 --threads 1 --clock cpu \\
        --methods 'plain CE (twin alone)' 'fading twin alone' 'residual model CE (the teacher alone)'
    python benchmarks/step_cost.py --question compile --arch resnet20_cifar --repeats 10 --threads 1 --clock cpu
    python benchmarks/step_cost.py --report-only --name training_cost_ratios_sampled     # the page from its record
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_cost_pages as pages  # noqa: E402
from jointrd_timm.recipes import DEFAULT_RECIPE  # noqa: E402
from report import RESULTS, load_record, this_command, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# label -> (kind, JointRDConfig fields). 'JointRD + fade' is the default recipe's loss; its cost does not depend on eta
DEFAULT_FIELDS = DEFAULT_RECIPE.jointrd_fields()
METHODS = {
    'plain CE (twin alone)': ('ce', None),
    'Hinton KD': ('kd', None),
    'fading twin alone': ('fade', None),
    'residual model CE (the teacher alone)': ('residual', None),
    'JointRD (all paths)': ('jointrd', dict()),
    'JointRD (1 sampled path)': ('jointrd', dict(hybrid_paths=1)),
    'JointRD (all paths, lean memory off)': ('jointrd', dict(lean_memory=False)),
    'JointRD + fade (default recipe)': ('jointrd', dict(DEFAULT_FIELDS)),
    'JointRD + fade, lean memory off': ('jointrd', dict(DEFAULT_FIELDS, lean_memory=False)),
    'JointRD + fade, joint teacher': ('jointrd', dict(DEFAULT_FIELDS, teacher_mode='joint')),
}
# question -> default record name
NAMES = dict(methods='training_cost', ratios='training_cost_ratios', channels_last='training_cost_channels_last',
             compile='training_cost_compile')
RATIO_METHODS = ('plain CE (twin alone)', 'fading twin alone', 'residual model CE (the teacher alone)')


def _models(kind: str, fields, arch: str):
    """(the trained model, the frozen teacher) of one method."""
    import timm

    import jointrd_timm  # noqa: F401
    from jointrd_timm.methods import FadingStudent, JointRD, JointRDConfig
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10).eval().requires_grad_(False)
    fading = kind == 'fade' or (kind == 'jointrd' and 'shortcut_fade' in fields)
    twin = timm.create_model(f'plain_{arch}', num_classes=10, **(dict(shortcut_fade=True) if fading else {})).train()
    if kind == 'jointrd':
        model = JointRD(twin, teacher, JointRDConfig(**fields)).train()
    elif kind == 'residual':  # the residual architecture trained on its own: what the fading twin computes mid-fade
        model = timm.create_model(arch, num_classes=10).train()
    elif kind == 'fade':
        model = FadingStudent(twin, DEFAULT_RECIPE.shortcut_fade).train()
    else:
        model = twin
    if hasattr(model, 'set_epoch'):
        model.set_epoch(5, 100, 20)  # mid-fade (0 < s < 1): the fading blocks' scale multiply runs
    return model, teacher


def make_step(method: str, arch: str, batch: int, size: int, channels_last: bool = False, compile_backend=None):
    """A no-argument callable doing one full training step (forward, backward, SGD step) of ``method``; with
    ``compile_backend``, its models compiled as ``runner.compile`` does (the first steps compile: warm up first)."""
    import torch.nn.functional as F

    from jointrd_timm.methods.base import hinton_kd
    kind, fields = METHODS[method]
    model, teacher = _models(kind, fields, arch)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
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
from step_cost import make_step
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


def peak_memory(method: str, arch: str, args) -> int:
    """Peak RSS (bytes) of one training step of ``method`` above the state before it, in a fresh process."""
    # large blocks through mmap: freed tensors go back to the OS, so RSS follows live memory step by step
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, '-c', _PEAK, method, arch, str(args.batch), str(args.threads),
                          str(Path(__file__).parent), str(args.size), str(int(args.channels_last))],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])['peak']


def _clock(args):
    return time.process_time if args.clock == 'cpu' else time.perf_counter


def measure_methods(arch: str, args) -> dict:
    """Every method: the steps of each round, median and IQR, and the peak memory of a step."""
    from jointrd_timm.deploy.latency import compare_latency
    steps = {m: make_step(m, arch, args.batch, args.size, args.channels_last) for m in METHODS}
    timed = compare_latency(steps, repeats=args.repeats, warmup=1, inference=False, clock=_clock(args))
    del steps
    peaks = {m: peak_memory(m, arch, args) for m in METHODS}
    rows = {m: dict(step_ms=timed[m]['median_ms'], iqr_ms=timed[m]['iqr_ms'], times_ms=timed[m]['times_ms'],
                    peak_mb=peaks[m] / 2**20, memory_vs_kd=peaks[m] / peaks['Hinton KD']) for m in METHODS}
    return dict(rows=rows, tail_share=tail_share(arch, args.size))


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


def measure_ratios(arch: str, args) -> dict:
    """``args.methods``' steps round by round, and (with the fading and the plain twin) the fade's ops alone."""
    from jointrd_timm.deploy.latency import compare_latency
    steps = {m: make_step(m, arch, args.batch, args.size) for m in args.methods}
    timed = compare_latency(steps, repeats=args.repeats, warmup=1, inference=False, clock=_clock(args))
    times = {m: timed[m]['times_ms'] for m in args.methods}
    result = dict(times_ms=times)
    if 'fading twin alone' in times and 'plain CE (twin alone)' in times:
        ops = fade_op_overhead(arch, args.batch, args.size, max(args.repeats, 30), _clock(args))
        ops['of_plain_step'] = ops['extra_ms'] / statistics.median(times['plain CE (twin alone)'])
        result['fade_ops'] = ops
    return result


def measure_option(arch: str, args) -> dict:
    """Each of ``pages.OPTION_METHODS`` with the runner option ``args.question`` and without it, interleaved."""
    from jointrd_timm.deploy.latency import compare_latency
    base_name, name, change, warmup = pages.OPTIONS[args.question]
    steps = {f'{m} | {way}': make_step(m, arch, args.batch, args.size, **(change if way == name else {}))
             for m in pages.OPTION_METHODS for way in (base_name, name)}
    timed = compare_latency(steps, repeats=args.repeats, warmup=warmup, inference=False, clock=_clock(args))
    rows = {}
    for m in pages.OPTION_METHODS:
        base, other = timed[f'{m} | {base_name}'], timed[f'{m} | {name}']
        rows[m] = {f'{base_name}_ms': base['median_ms'], f'{base_name}_iqr_ms': base['iqr_ms'],
                   f'{name}_ms': other['median_ms'], f'{name}_iqr_ms': other['iqr_ms'],
                   f'{base_name}_times_ms': base['times_ms'], f'{name}_times_ms': other['times_ms']}
    return rows


def fade_op_overhead(arch: str, batch: int, size: int, repeats: int, clock=time.process_time) -> dict:
    """What a fading twin's step computes beyond the residual model's, timed op by op at this pair's shapes: per
    faded shortcut, ``addcmul(branch, shortcut, s)`` (out of place) in the forward and ``grad * s`` in the backward,
    where the residual block adds in place (timm's ``x += shortcut``). Both sums over all faded shortcuts of one
    step, interleaved, ``repeats`` times; returns their medians (ms) and the difference."""
    import timm

    import jointrd_timm  # noqa: F401
    from jointrd_timm.twins.fade import FadingGraphBlock, _is_fade
    twin = timm.create_model(f'plain_{arch}', num_classes=10, shortcut_fade=True)
    shapes = []  # one per faded shortcut, at its block's output shape
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.extend(
        [tuple(o.shape)] * sum(1 for n in m.graph.nodes if _is_fade(n))))
        for m in twin.modules() if isinstance(m, FadingGraphBlock)]
    with torch.no_grad():
        twin(torch.randn(batch, 3, size, size))
    for h in hooks:
        h.remove()
    s = torch.tensor(0.5)
    tensors = [(torch.randn(shape), torch.randn(shape), torch.randn(shape)) for shape in shapes]

    def fade_ops():
        for branch, shortcut, grad in tensors:
            torch.addcmul(branch, shortcut, s)
            grad.mul(s)

    def residual_ops():  # adds the same shortcut again each round: the values grow linearly, far from overflow
        for branch, shortcut, _ in tensors:
            branch.add_(shortcut)
    samples, runners = {'fade': [], 'residual': []}, {'fade': fade_ops, 'residual': residual_ops}
    for r in range(repeats + 1):
        for name in (list(runners) if r % 2 else list(runners)[::-1]):
            start = clock()
            runners[name]()
            if r:  # the first round warms up
                samples[name].append(1e3 * (clock() - start))
    fade, residual = statistics.median(samples['fade']), statistics.median(samples['residual'])
    return dict(shortcuts=len(shapes), fade_ops_ms=fade, residual_ops_ms=residual, extra_ms=fade - residual)


MEASURE = dict(methods=measure_methods, ratios=measure_ratios, channels_last=measure_option, compile=measure_option)


def measure_each_arch(args, measure, write, out: Path = None) -> None:
    """Run ``measure(arch, args)`` for each ``args.arch`` in turn; after each, ``write(name, record, out)`` the record
    (``meta``, ``archs``), so a long run keeps what it measured."""
    torch.set_num_threads(args.threads)
    load_before, start, results = os.getloadavg(), time.time(), {}
    for arch in args.arch:
        results[arch] = measure(arch, args)
        meta = dict(machine=f'{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, '
                            f'torch {torch.__version__}',
                    load_before=load_before, load_after=os.getloadavg(), minutes=round((time.time() - start) / 60, 1),
                    clock=args.clock, question=args.question, settings=settings(args), command=this_command())
        write(args.name, dict(meta=meta, archs=dict(results)), out)


def settings(args) -> dict:
    """What a step-cost page describes of its run (batch, image size, rounds, clock, and the question's own)."""
    keys = dict(methods=('channels_last',), ratios=('methods',)).get(args.question, ())
    return dict(batch=args.batch, size=args.size, repeats=args.repeats, clock=args.clock,
                **{k: getattr(args, k) for k in keys})


def write(name: str, record: dict, out: Path = None) -> None:
    """The record, page and plot of a step-cost record (its question in ``meta``), under ``out`` (default
    :data:`RESULTS`)."""
    meta = record['meta']
    lines, plot = pages.page(meta['question'], record, meta['settings'])
    write_report(name, record, lines, plot, out or RESULTS)
    print('\n'.join(lines), flush=True)


def recorded(name: str, parser: argparse.ArgumentParser) -> dict:
    """A step-cost record with its question and settings; for records written before they were stored, both read
    back from its name, shape and recorded command line."""
    record = load_record(name, RESULTS)
    if record is None:
        parser.error(f'--report-only: no record {RESULTS / (name + ".json")}; run the benchmark first or give the '
                     '--name of a record.')
    meta = record['meta']
    if 'question' not in meta:
        first = next(iter(record['archs'].values()))
        meta['question'] = ('ratios' if 'pairs' in first or 'times_ms' in first else 'methods' if 'rows' in first
                            else 'compile' if 'compiled_ms' in next(iter(first.values())) else 'channels_last')
    if 'settings' not in meta:
        given = parser.parse_known_args(shlex.split(meta['command'])[2:])[0]
        given.question, given.clock = meta['question'], meta.get('clock', given.clock)
        meta['settings'] = settings(given)
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--question', choices=sorted(NAMES), default='methods')
    p.add_argument('--arch', nargs='+', default=['resnet56_cifar', 'resnet18_cifar'])
    p.add_argument('--batch', type=int, default=128)
    p.add_argument('--size', type=int, default=32)
    p.add_argument('--repeats', type=int, default=None, help='rounds (default: 40 for ratios, 6 otherwise)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                   help="'cpu': the process's CPU time per step (time.process_time), which other jobs on a shared "
                        "machine barely change; with --threads 1 it is the single-core step time")
    p.add_argument('--methods', nargs='+', default=list(RATIO_METHODS), choices=list(METHODS), metavar='METHOD',
                   help='ratios: the methods compared, every pair')
    p.add_argument('--channels-last', action='store_true', help='methods: models and batch in channels_last')
    p.add_argument('--name', default=None, help="record name under benchmarks/results (default: the question's)")
    p.add_argument('--report-only', action='store_true', help='rewrite page and plot from the record')
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.report_only:
        name = args.name or NAMES[args.question]
        write(name, recorded(name, p))
        return
    args.name = args.name or NAMES[args.question]
    args.repeats = args.repeats or (40 if args.question == 'ratios' else 6)
    if args.question == 'ratios' and (len(args.methods) < 2 or args.repeats < 4):
        p.error(f'need at least two methods (got {len(args.methods)}) and four rounds (--repeats, got '
                f'{args.repeats}): every pair is read round by round.')
    measure_each_arch(args, MEASURE[args.question], write)


if __name__ == '__main__':
    main()
