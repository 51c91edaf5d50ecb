"""Training cost per step of plain training, Hinton KD and JointRD (all hybrid paths, one sampled path), on the same
pair and batch: median step time (interleaved, after warm-up) and peak memory of one step (fresh process per
method, peak RSS above the state before the step, with glibc returning large blocks to the OS). The figure we track: JointRD step time / KD step time (<= 1.5).

    python benchmarks/training_cost.py            # resnet56_cifar pair, batch 128, about 5 minutes
Writes benchmarks/results/training_cost.{json,md,png}.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ('plain CE', 'Hinton KD', 'JointRD (all paths)', 'JointRD (1 sampled path)')


def make_step(method: str, arch: str, batch: int, size: int):
    """A no-argument callable doing one full training step (forward, backward, SGD step) of ``method``."""
    import timm
    import torch.nn.functional as F
    import jointrd_timm  # noqa: F401
    from jointrd_timm.methods import JointRD, JointRDConfig
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10).eval().requires_grad_(False)
    twin = timm.create_model(f'plain_{arch}', num_classes=10).train()
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    if method.startswith('JointRD'):
        model = JointRD(twin, teacher, JointRDConfig(hybrid_paths=1 if 'sampled' in method else None)).train()
    else:
        model = twin
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if method.startswith('JointRD'):
            loss = model(x, y)['loss']
        elif method == 'Hinton KD':
            with torch.no_grad():
                t = teacher(x)
            s = model(x)
            loss = 0.1 * F.cross_entropy(s, y) + 0.9 * 16 * F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1),
                                                                     reduction='batchmean')
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return step


_PEAK = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[5])
from training_cost import make_step
torch.set_num_threads(int(sys.argv[4]))
step = make_step(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[6]))
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='resnet56_cifar')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from jointrd_timm.deploy.latency import compare_latency
    steps = {m: make_step(m, args.arch, args.batch, args.size) for m in METHODS}
    timed = compare_latency(steps, repeats=args.repeats, warmup=1, inference=False)
    peaks = {}
    for m in METHODS:
        # large blocks through mmap: freed tensors go back to the OS, so RSS follows live memory step by step
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536')
        out = subprocess.run([sys.executable, '-c', _PEAK, m, args.arch, str(args.batch), str(args.threads),
                              str(Path(__file__).parent), str(args.size)], capture_output=True, text=True, check=True,
                             env=env)
        peaks[m] = json.loads(out.stdout.strip().splitlines()[-1])['peak']
    kd = timed['Hinton KD']['median_ms']
    rows = {m: dict(step_ms=timed[m]['median_ms'], iqr_ms=timed[m]['iqr_ms'], peak_mb=peaks[m] / 2**20,
                    time_vs_kd=timed[m]['median_ms'] / kd, memory_vs_kd=peaks[m] / peaks['Hinton KD'])
            for m in METHODS}
    meta = dict(command='python benchmarks/training_cost.py ' + ' '.join(f'--{k} {v}' for k, v in vars(args).items()),
                machine=f'{platform.machine()}, {args.threads} threads', torch=torch.__version__)
    out = ROOT / 'benchmarks/results'
    (out / 'training_cost.json').write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f'# Training cost per step: {args.arch} pair, batch {args.batch}, {args.size} px', '',
             f'Machine: {meta["machine"]}; torch {meta["torch"]}; median of {args.repeats} interleaved steps after '
             f'warm-up; peak memory = peak RSS of one step above the state before it, fresh process per method. '
             f'Command: `{meta["command"]}`.', '',
             '| method | step ms (median) | IQR ms | / KD | peak memory of a step MB | / KD |', '|---|---|---|---|---|---|']
    for m, r in rows.items():
        lines.append(f'| {m} | {r["step_ms"]:.0f} | {r["iqr_ms"]:.0f} | {r["time_vs_kd"]:.2f}x | {r["peak_mb"]:.0f} | '
                     f'{r["memory_vs_kd"]:.2f}x |')
    (out / 'training_cost.md').write_text('\n'.join(lines) + '\n')
    _plot(rows, out / 'training_cost.png')
    print('\n'.join(lines))


def _plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = list(rows)
    a.bar(labels, [r['step_ms'] for r in rows.values()])
    a.set_ylabel('step time (ms, median)')
    b.bar(labels, [r['peak_mb'] for r in rows.values()], color='#dd8452')
    b.set_ylabel('peak memory of a step (MB)')
    for ax in (a, b):
        ax.tick_params(axis='x', labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    main()
