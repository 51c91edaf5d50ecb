"""The recipe path (fading twin -> JointRD -> deployed twin -> export) for every derivable architecture up to 30 M
parameters: one column per step in benchmarks/results/twin_coverage.{md,json}.

The architectures are those that benchmarks/twin_coverage.py derived and trained one step (its JSON record),
smallest first; each is checked by ``jointrd_timm.coverage.check_recipe_path`` and its result is written into the
record (``models[<arch>]['recipe']``) as soon as it is done, so an interrupted sweep resumes where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/recipe_coverage.py                 # all (~410 architectures, hours)
    python benchmarks/recipe_coverage.py --archs dla34 ghostnet_100 --redo  # re-check some
    python benchmarks/recipe_coverage.py --limit 20                         # the 20 smallest not yet checked
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import jointrd_timm  # noqa: F401  (registers plain_*)
from jointrd_timm.coverage import check_recipe_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from twin_coverage import ROOT, recipe_candidates, write_coverage  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='*', default=None, help='check exactly these (default: every candidate)')
    parser.add_argument('--limit', type=int, default=None, help='check at most this many (after resuming)')
    parser.add_argument('--redo', action='store_true', help='re-check architectures already recorded')
    parser.add_argument('--size', type=int, default=64, help='input size unless the model fixes it')
    parser.add_argument('--no-export', action='store_true', help='skip the folding / ONNX export column')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks/results'))
    parser.add_argument('--report-only', action='store_true', help='rewrite the markdown from the record')
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = Path(args.out) / 'twin_coverage.json'
    record = json.loads(path.read_text())
    results, meta = record['models'], record['meta']
    candidates = recipe_candidates(results)
    names = args.archs if args.archs else candidates
    unknown = [n for n in names if n not in candidates]
    if unknown:
        parser.error(f'not derivable architectures up to 30 M parameters in {path}: {unknown}')
    todo = [n for n in names if args.redo or 'recipe' not in results[n]]
    if args.limit is not None:
        todo = todo[:args.limit]
    if args.report_only:
        todo = []
    rmeta = meta.setdefault('recipe', dict(command='python benchmarks/recipe_coverage.py', seconds=0, size=args.size))
    if args.archs or args.limit is not None or args.redo:
        rmeta['command'] += ' (then ' + ' '.join(sys.argv[1:]) + ')'
    start, saved = time.time(), time.time()
    for i, name in enumerate(todo):
        t = time.time()
        try:
            results[name]['recipe'] = check_recipe_path(name, size=args.size, export=not args.no_export)
        except Exception as e:  # noqa: BLE001 - the teacher itself did not build: every step is a crash
            results[name]['recipe'] = {s: dict(status='crash', error=type(e).__name__, reason=str(e)[:300])
                                       for s in ('fade', 'jointrd', 'deploy', 'export')}
        statuses = ' '.join(f'{s}={r["status"]}' for s, r in results[name]['recipe'].items())
        print(f'[{time.time() - start:6.0f}s] {i + 1}/{len(todo)} {name} ({time.time() - t:.1f}s): {statuses}',
              flush=True)
        rmeta['seconds'] = round(rmeta.get('seconds', 0) + time.time() - saved)
        saved = time.time()
        _save(path, record)
    _save(path, record)


def _save(path: Path, record: dict) -> None:
    # atomic (report.write_report): an interrupted sweep never leaves a half-written record
    write_coverage(path.parent, record['models'], record['meta'])


if __name__ == '__main__':
    main()
