"""Run a plan of benchmark commands a few at a time until a deadline, and pack what they wrote for the trip back from
a borrowed machine (a GPU lent for minutes: one call, many conversions side by side).

A plan is a text file, one command per line in priority order (``#`` starts a comment): the arguments of
``benchmarks/accuracy.py``, e.g.

    full --arch resnet56_cifar --fractions 0.5 --variant b5=kd_weight:1,lr_scale:0.2,block_loss_weight:5 --only twin-jointrd-e4-b5 --threads 1
    full --arch resnet56_cifar --fractions 0.5 --variant b5=kd_weight:1,lr_scale:0.2,block_loss_weight:5 --only twin-jointrd-e4-b5-s1 --seed 1 --threads 1

``--parallel`` commands run at once (a new one starts as one ends, in plan order); at ``--deadline`` seconds the
ones still running are stopped (an ``accuracy.py full`` run keeps its checkpoint and resumes on the same machine).
Each command's output goes to its own log. With ``--pack DIR``, what the runs wrote since the start is packed into
DIR as a few tar files, rewritten (atomically) as runs end: ``records.tar`` (every ``metrics.jsonl``,
``final.json`` and ``resumes.txt`` under ``--runs``, the last lines of each log, ``status.json``: each command's
exit code, seconds and epochs done) and, at the end, ``weights-N.tar`` (the ``model/`` folders of the runs that
finished, in chunks under ``--chunk-mb``). Unpack them into ``--runs`` (``tar xf records.tar -C benchmarks/runs``)
and regenerate the pages with ``accuracy.py full --report-only``.

    python benchmarks/queue_runs.py plan.txt --parallel 10 --deadline 500 --pack $OUT
"""
import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD_FILES = ('metrics.jsonl', 'final.json', 'resumes.txt')


def read_plan(path: Path) -> list:
    """The plan's commands (argument lists), in order; a line's ``#`` comment and blank lines dropped."""
    import shlex
    commands = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split('#', 1)[0].strip()
        if line:
            try:
                commands.append(shlex.split(line))
            except ValueError as e:
                raise SystemExit(f'{path}:{number}: {e} in {line!r}') from None
    if not commands:
        raise SystemExit(f'{path}: no command in the plan (one line of accuracy.py arguments per run).')
    return commands


def changed_since(runs: Path, start: float, names=RECORD_FILES) -> list:
    """Files named ``names`` under ``runs`` modified at or after ``start``, sorted."""
    return sorted(p for name in names for p in runs.rglob(name) if p.stat().st_mtime >= start)


def _tar(path: Path, members: list) -> None:
    """Write the tar ``path`` of (file, name in the archive), atomically (a reader never sees half of it)."""
    from jointrd_timm.io import atomic_write

    def write(tmp):
        with tarfile.open(tmp, 'w') as tar:
            for file, name in members:
                tar.add(file, arcname=name)
    atomic_write(path, write)


def log_tail(log: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, progress bars' carriage returns read as line ends."""
    text = log.read_text(errors='replace').replace('\r', '\n')
    return '\n'.join([line for line in text.splitlines() if line.strip()][-lines:]) + '\n'


def pack_records(out: Path, runs: Path, logs: Path, start: float, status: dict) -> None:
    (logs / 'status.json').write_text(json.dumps(status, indent=1))
    members = [(p, str(p.relative_to(runs))) for p in changed_since(runs, start)]
    for log in sorted(logs.glob('*.log')):
        tail = logs / f'{log.stem}.tail'
        tail.write_text(log_tail(log))
        members.append((tail, f'logs/{tail.name}'))
    members.append((logs / 'status.json', 'status.json'))
    _tar(out / 'records.tar', members)


def pack_weights(out: Path, runs: Path, start: float, chunk_mb: float, max_chunks: int) -> list:
    """The ``model/`` folders of the runs that finished since ``start`` (their ``final.json`` is newer), in tar
    files under ``chunk_mb`` each, at most ``max_chunks`` (the rest left out and returned by name)."""
    chunks, sizes, left_out = [], [], []
    for final in changed_since(runs, start, ('final.json',)):
        model = final.parent / 'model'
        files = sorted(p for p in model.glob('*') if p.is_file()) if model.is_dir() else []
        size = sum(p.stat().st_size for p in files) / 1e6
        if not files:
            continue
        if size > chunk_mb:
            left_out.append(str(final.parent.relative_to(runs)))
            continue
        if not chunks or sizes[-1] + size > chunk_mb:
            if len(chunks) == max_chunks:
                left_out.append(str(final.parent.relative_to(runs)))
                continue
            chunks.append([])
            sizes.append(0.0)
        chunks[-1] += [(p, str(p.relative_to(runs))) for p in files]
        sizes[-1] += size
    for n, members in enumerate(chunks, 1):
        _tar(out / f'weights-{n}.tar', members)
    return left_out


def epochs_done(runs: Path, start: float) -> dict:
    return {str(p.parent.relative_to(runs)): len(p.read_text().splitlines()) for p in changed_since(
        runs, start, ('metrics.jsonl',))}


def run_queue(commands: list, parallel: int, deadline: float, logs: Path, script: Path, on_change=None,
              every: float = 60.0, python: str = sys.executable) -> dict:
    """Run ``commands`` (argument lists for ``script``), ``parallel`` at once in order, until ``deadline``
    seconds; returns each command's status by its plan position (exit code, seconds; 'stopped at the deadline').
    ``on_change(status)`` is called as each command ends and every ``every`` seconds (what a run wrote so far is
    packed even if the machine is taken away before the end)."""
    logs.mkdir(parents=True, exist_ok=True)
    start, queue, running, status = time.time(), list(enumerate(commands, 1)), {}, {}
    last = start
    while (queue or running) and time.time() - start < deadline:
        if on_change and time.time() - last >= every:
            on_change(status)
            last = time.time()
        while queue and len(running) < parallel:
            n, args = queue.pop(0)
            log = open(logs / f'{n:02d}.log', 'w')
            running[n] = (subprocess.Popen([python, str(script), *args], stdout=log, stderr=subprocess.STDOUT,
                                           cwd=ROOT), time.time(), log)
            status[n] = dict(command=' '.join(args), started=round(time.time() - start, 1))
        time.sleep(0.2)
        for n, (proc, began, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[n]
                status[n].update(rc=proc.returncode, seconds=round(time.time() - began, 1))
                print(f'[{time.time() - start:.0f} s] {n}: exit {proc.returncode}: {status[n]["command"]}', flush=True)
                if on_change:
                    on_change(status)
                    last = time.time()
    for n, (proc, began, log) in running.items():
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        status[n].update(rc='stopped at the deadline', seconds=round(time.time() - began, 1))
    for n, _ in queue:
        status[n] = dict(command=' '.join(commands[n - 1]), rc='not started')
    return status


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('plan', type=Path)
    p.add_argument('--parallel', type=int, default=2, help='commands at once (default 2)')
    p.add_argument('--deadline', type=float, default=3600.0, help='seconds until running commands are stopped')
    p.add_argument('--pack', type=Path, default=None, metavar='DIR', help='pack what the runs wrote into DIR')
    p.add_argument('--runs', type=Path, default=ROOT / 'benchmarks/runs', help='where the runs write (packed)')
    p.add_argument('--logs', type=Path, default=ROOT / 'benchmarks/work/queue_logs')
    p.add_argument('--chunk-mb', type=float, default=15.0)
    p.add_argument('--max-chunks', type=int, default=6)
    p.add_argument('--script', type=Path, default=ROOT / 'benchmarks/accuracy.py', help=argparse.SUPPRESS)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.parallel < 1 or args.deadline <= 0:
        raise SystemExit(f'--parallel must be >= 1 and --deadline > 0 (got {args.parallel}, {args.deadline}).')
    commands = read_plan(args.plan)
    start = time.time() - 1  # file times may be rounded to the second
    args.runs.mkdir(parents=True, exist_ok=True)
    if args.pack:
        args.pack.mkdir(parents=True, exist_ok=True)
    pack = (lambda status: pack_records(args.pack, args.runs, args.logs, start, status)) if args.pack else None
    status = run_queue(commands, args.parallel, args.deadline, args.logs, args.script, on_change=pack)
    summary = dict(commands=status, epochs_done=epochs_done(args.runs, start))
    if args.pack:
        summary['weights_left_out'] = pack_weights(args.pack, args.runs, start, args.chunk_mb, args.max_chunks)
        pack_records(args.pack, args.runs, args.logs, start, summary)
    print(json.dumps(summary, indent=1), flush=True)
    return summary


if __name__ == '__main__':
    main()
