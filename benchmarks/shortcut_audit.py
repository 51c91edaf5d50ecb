"""Are the twins really shortcut-free? Every derived twin up to 30 M parameters, checked by a second detector.

The twins are derived and checked by one detector (``twins/verify.py``: each block's own forward, traced with its
submodules opaque). This audit builds each twin for real, folds it for deployment and looks for shortcut additions
on the whole model's graph with the activation-memory analysis (``deploy/memory.py``), which finds them by another
route (two operands forking from one tensor, one through at most two convolutions, the other through more). A twin
that the second route finds a shortcut in is a derivation hole (the route found Xception's and MetaFormer's). A twin
that torch.fx cannot trace through as a whole (TF 'same' padding, CondConv) is traced with timm's untraceable layers
kept whole (none of them holds a shortcut: the analysis traces through one that does); a twin untraceable even so is
listed as not checked.

    python benchmarks/shortcut_audit.py            # about 10 minutes on one CPU thread
    python benchmarks/shortcut_audit.py --names tf_efficientnet_b0 ...   # these rows again, the others kept
"""
import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks/results'


def audit(name: str) -> dict:
    """``plain_<name>`` built (seed 0), folded and analysed at the coverage real check's input: the shortcut
    additions the whole-graph route finds in it, or why it could not look."""
    import timm
    import jointrd_timm  # noqa: F401 - registers plain_*
    from jointrd_timm.deploy.fold import fold_for_deployment
    from jointrd_timm.deploy.memory import MemoryAnalysisError, analyze_activation_memory
    from jointrd_timm.coverage import input_size_for
    torch.manual_seed(0)
    twin = timm.create_model(f'plain_{name}', num_classes=10).eval()
    folded, report = fold_for_deployment(twin)
    try:
        with torch.no_grad():
            found = analyze_activation_memory(folded, torch.randn(1, *input_size_for(twin)))
    except MemoryAnalysisError as e:  # the trace error it wraps
        return dict(status='not traceable', reason=f'{type(e.__cause__).__name__}: {str(e.__cause__)[:120]}')
    return dict(status='clean' if found.shortcut_additions == 0 else 'shortcut left',
                shortcut_additions=found.shortcut_additions, folded=report['traced'],
                layers_kept_whole=found.layers_kept_whole)


def candidates(coverage: dict, max_params: float) -> list:
    """Derived twins that the coverage real check built, up to ``max_params``, smallest first."""
    ok = [(r['params'], n) for n, r in coverage.items() if r['status'] == 'derived' and 'forward_ok' in r
          and r.get('params', 0) <= max_params]
    return [n for _, n in sorted(ok)]


def markdown(results: dict, coverage: dict) -> list:
    counts = Counter(r['status'] for r in results.values())
    lines = ['# Shortcut audit: every derived twin checked by a second detector', '',
             f'**{counts["clean"]} of {len(results)} twins have no shortcut addition on their whole folded graph; '
             f'{counts["shortcut left"]} have one; {counts["not traceable"]} could not be traced as a whole** '
             '(the derived twins up to 30 M parameters that the real check of '
             '[twin_coverage.md](twin_coverage.md) builds).',
             '', 'How: see the script\'s docstring (`benchmarks/shortcut_audit.py`); the first detector is the one '
             'that derives the twins (`jointrd_timm/twins/verify.py`).', '']
    kept = [n for n, r in results.items() if r.get('layers_kept_whole')]
    if kept:
        lines += [f'{len(kept)} of them were traced with timm\'s untraceable layers kept whole (TF \'same\' padding, '
                  'CondConv, bilinear attention; none holds a shortcut): ' + ', '.join(f'`{n}`' for n in kept) + '.',
                  '']
    lines += ['| module | clean | shortcut left | not traceable |', '|---|---|---|---|']
    by_module = defaultdict(Counter)
    for n, r in results.items():
        by_module[coverage[n]['module']][r['status']] += 1
    for module in sorted(by_module, key=lambda m: (-sum(by_module[m].values()), m)):
        c = by_module[module]
        lines.append(f'| {module} | {c["clean"]} | {c["shortcut left"]} | {c["not traceable"]} |')
    for status in ('shortcut left', 'not traceable'):
        names = [n for n, r in results.items() if r['status'] == status]
        if names:
            lines += ['', f'## {status.capitalize()}', '']
            lines += [f'- `{n}`: ' + (f'{results[n]["shortcut_additions"]} shortcut additions'
                                      if status == 'shortcut left' else results[n]['reason']) for n in names]
    return lines


def main():
    from report import pyplot, this_command, write_report
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--max-params', type=float, default=30e6)
    parser.add_argument('--names', nargs='*', default=None, help='audit only these architectures')
    parser.add_argument('--out', default=str(RESULTS))
    args = parser.parse_args()
    coverage = json.loads((RESULTS / 'twin_coverage.json').read_text())['models']
    names = args.names or candidates(coverage, args.max_params)
    previous = Path(args.out) / 'shortcut_audit.json'
    # --names: those rows again, every other row of the record kept (and the command that wrote them)
    kept = json.loads(previous.read_text()) if args.names and previous.is_file() else dict(meta={}, models={})
    start, results = time.time(), dict(kept['models'])
    for i, name in enumerate(names):
        results[name] = audit(name)
        print(f'[{time.time() - start:6.0f}s] {i + 1}/{len(names)} {name}: {results[name]["status"]}', flush=True)

    def plot(path):
        plt = pyplot()
        counts = Counter(r['status'] for r in results.values())
        labels = ['clean', 'shortcut left', 'not traceable']
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.barh(labels, [counts[k] for k in labels], color=['tab:green', 'tab:red', 'tab:gray'])
        ax.set_xlabel('derived twins up to 30 M parameters')
        ax.set_title('Shortcut additions found on the whole folded graph')
        fig.tight_layout()
        fig.savefig(path, format='png')
        plt.close(fig)

    meta = dict(torch=torch.__version__, seconds=round(time.time() - start), threads=torch.get_num_threads())
    if kept['meta'].get('command'):
        meta['command'] = f"{kept['meta']['command']} (then {this_command().removeprefix('python ')})"
        meta['seconds'] += kept['meta'].get('seconds', 0)
    write_report('shortcut_audit', dict(meta=meta, models=results), markdown(results, coverage), plot=plot,
                 out=Path(args.out))


if __name__ == '__main__':
    main()
