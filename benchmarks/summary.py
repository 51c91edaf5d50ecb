"""Results at a glance and the suite's README, generated: benchmarks/results/README.md from the benchmark records
(every number on it is a record's), benchmarks/README.md from the scripts of the folder (each script's docstring and
what it writes). Rerun after any benchmark; tests/test_benchmark_records.py checks that both committed pages are
what this script writes.

    python benchmarks/summary.py
"""
import ast
import json
from pathlib import Path

from accuracy_pages import ALONE_ROW, DEFAULT_ROW, difference_stats
from report import RESULTS, load_record

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / 'benchmarks'
_load = load_record


def _row(table: dict, label: str) -> str:
    r = table.get(label)
    if r is None:
        return 'not run'
    return f'{r["mean"]:.2f} % (n = {r["n"]}, gap to its teacher {r["gap"]:+.2f})'


def _paired(record: dict, label: str) -> str:
    matched = record.get('paired', {}).get(label)
    if not matched:
        return 'no matched runs'
    d = difference_stats([a - b for _, _, a, b in matched])
    if d['n'] < 2:
        return f'{d["mean"]:+.2f} (1 matched run)'
    return f'{d["mean"]:+.2f} (n = {d["n"]}, SE {d["se"]:.2f}, {d["positive"]} of {d["n"]} positive)'


def ablation_lines() -> list:
    lines = ['## The recipe at the CPU budget (CIFAR-10, 8,000 images, 5 epochs per run)', '',
             'The default recipe (`jointrd_timm.recipes.DEFAULT_RECIPE`: teacher init, shortcuts faded over 80 % of '
             'the run, JointRD) against the twin alone with the same ingredients, per pair. Gap: teacher - twin '
             '(negative: the twin is above its teacher). JointRD vs alone: mean difference of runs matched by seed and '
             'teacher.', '',
             '| pair (page) | teacher(s) % | default recipe | twin alone, same ingredients | JointRD vs alone (points) |',
             '|---|---|---|---|---|']
    for name, pair in (('recipe_ablation', 'resnet56_cifar'), ('recipe_ablation_resnet110', 'resnet110_cifar'),
                       ('recipe_ablation_resnet18', 'resnet18_cifar'), ('recipe_ablation_regnetx_002', 'regnetx_002')):
        record = _load(name)
        if record is None:
            continue
        teachers = ', '.join(f'{t:.2f}' for t in record['teachers'])
        lines.append(f'| {pair} ([{name}.md]({name}.md)) | {teachers} | {_row(record["table"], DEFAULT_ROW)} | '
                     f'{_row(record["table"], ALONE_ROW)} | {_paired(record, DEFAULT_ROW)} |')
    return lines


def full_cifar10_lines() -> list:
    pages = sorted(RESULTS.glob('full_cifar10_*.json'))
    if not pages:
        return []
    lines = ['', '## Full CIFAR-10 (published-twin budget)', '',
             '| pair (page) | run | epochs | test acc % | epochs done |', '|---|---|---|---|---|']
    for path in pages:
        record = json.loads(path.read_text())
        for r in record['runs']:
            acc = f'{r["test_acc"]:.2f}' if 'test_acc' in r else 'not finished'
            lines.append(f'| {record["meta"]["arch"]} ([{path.stem}.md]({path.stem}.md)) | {r["row"]} | '
                         f'{r["epochs"]} | {acc} | {r["epochs_done"]} of {r["epochs"]} |')
    return lines


def alternatives_lines() -> list:
    pages = sorted(RESULTS.glob('alternatives_*.json'))
    lines = []
    if pages:
        lines = ['', '## The nearest alternatives (full CIFAR-10)', '',
                 '| pair (page) | teacher | recipe twin | twin alone | step-wise removal | exact conversion | control |',
                 '|---|---|---|---|---|---|---|']
        for path in pages:
            record = json.loads(path.read_text())
            acc = {k: v['test_acc'] for k, v in record['accuracy'].items()}
            cells = [acc.get(k) for k in ('teacher (residual)', 'our recipe twin', 'twin alone',
                                          'step-wise removal (Tailor)')] + [record['exact']['exact'],
                                                                            acc.get('residual control')]
            lines.append(f'| {record["meta"]["arch"]} ([{path.stem}.md]({path.stem}.md)) | '
                         + ' | '.join('not run' if c is None else f'{c:.2f} %' for c in cells) + ' |')
    validate = _load('timm_validate')
    if validate:
        same = sum(1 for r in validate['rows'] if r.get('difference') == 0.0)
        lines += ['', f"timm's own validate.py reproduces {same} of {len(validate['rows'])} published cards' top-1 "
                  'exactly ([timm_validate.md](timm_validate.md)).']
    return lines


FROZEN_TEACHER_EVAL = '2026-12-06'  # from this date the runner puts a frozen KD / FitNets teacher in eval mode


def zoo_lines() -> list:
    record = _load('cifar10_zoo')
    if record is None:
        return []
    rows = record['rows']
    lines = ['', '## Distillation methods on one pair ([cifar10_zoo.md](cifar10_zoo.md))', '',
             f'Budget: {record["meta"]["budget"]}; one seed.', '', '| method | test acc % |', '|---|---|']
    lines += [f'| {label} | {r["test_acc"]:.2f} |' for label, r in rows.items()]
    if record['meta'].get('date', '') < FROZEN_TEACHER_EVAL:
        lines += ['', f'Recorded before {FROZEN_TEACHER_EVAL}, when the runner left the frozen teacher of the KD and '
                  'FitNets rows in train mode (soft targets and hints from batch statistics, its BatchNorm statistics '
                  'drifting): read those two rows as stale until they run again (`python benchmarks/accuracy.py '
                  'subset --question zoo`).']
    return lines


def coverage_lines() -> list:
    record = _load('twin_coverage')
    if record is None:
        return []
    counts = {}
    for model in record['models'].values():
        counts[model['status']] = counts.get(model['status'], 0) + 1
    lines = ['', '## Twin coverage ([twin_coverage.md](twin_coverage.md))', '', '| status | architectures |', '|---|---|']
    lines += [f'| {status} | {n} |' for status, n in sorted(counts.items())]
    recipe = [m['recipe'] for m in record['models'].values() if 'recipe' in m]
    if recipe:  # the recipe path of the derivable architectures up to 30 M parameters
        from jointrd_timm.coverage import recipe_outcome
        words = {'pass': 'every step passed', 'refused': 'refused by design at a step',
                 'failed': 'crashed or failed at a step'}
        outcome = {}
        for steps in recipe:
            key = words[recipe_outcome(steps)]
            outcome[key] = outcome.get(key, 0) + 1
        lines += ['', '| recipe path (fade, JointRD, deploy, export), derivable up to 30 M parameters | architectures |',
                  '|---|---|'] + [f'| {k} | {n} |' for k, n in sorted(outcome.items())]
    audit = _load('shortcut_audit')
    if audit is not None:  # the twins checked by the second detector (benchmarks/shortcut_audit.py)
        found = {}
        for model in audit['models'].values():
            found[model['status']] = found.get(model['status'], 0) + 1
        lines += ['', '| twins up to 30 M parameters, whole folded graph ([shortcut_audit.md](shortcut_audit.md)) '
                  '| twins |', '|---|---|'] + [f'| {k} | {n} |' for k, n in sorted(found.items())]
    torchvision = _load('torchvision_coverage')
    if torchvision is not None:  # benchmarks/torchvision_coverage.py
        from jointrd_timm.coverage import recipe_outcome
        rows = {}
        for model in torchvision['models'].values():
            key = model['status'] + (f', recipe path {recipe_outcome(model["recipe"])}' if 'recipe' in model else
                                     ', above 30 M parameters (recipe path not run)' if model['status'] == 'derivable'
                                     and model['params'] > 30e6 else
                                     ', recipe path not yet run' if model['status'] == 'derivable' else '')
            rows[key] = rows.get(key, 0) + 1
        lines += ['', '| torchvision classification models ([torchvision_coverage.md](torchvision_coverage.md)) '
                  '| models |', '|---|---|'] + [f'| {k} | {n} |' for k, n in sorted(rows.items())]
    return lines


def cost_lines() -> list:
    lines = []
    record = _load('training_cost')
    if record is not None:
        from step_cost_pages import time_ratio  # the page's own ratio and its rule for one that is not a measurement
        lines += ['', '## Training cost per step ([training_cost.md](training_cost.md))', '',
                  'Step-time ratios whose interquartile range exceeds a quarter of them are not shown (measured '
                  'on a loaded machine).', '',
                  '| pair | method | step time vs KD | peak memory vs KD |', '|---|---|---|---|']
        archs = record['archs'] if 'archs' in record else {record['meta'].get('arch', ''): record}
        for arch, measured in archs.items():
            for label, r in measured['rows'].items():
                ratio, _, noisy, _ = time_ratio(measured['rows'], label, 'Hinton KD')
                time = 'unmeasured' if noisy else f'{ratio:.2f}x'
                lines.append(f'| {arch} | {label} | {time} | {r["memory_vs_kd"]:.2f}x |')
    for path in sorted(RESULTS.glob('training_cost_ratios*.json')):  # one page per ratios run
        record = json.loads(path.read_text())
        lines += ['', f'## Step ratios with a confidence interval ([{path.stem}.md]({path.stem}.md))',
                  '', '| pair | ratio | median | 95 % interval | goal | verdict |', '|---|---|---|---|---|---|']
        for arch, result in record['archs'].items():
            for p in result['pairs']:
                goal = '' if p['limit'] is None else f'<= {p["limit"]:.2f}x'
                lines.append(f'| {arch} | {p["method"]} / {p["reference"]} | {p["median"]:.3f}x | '
                             f'{p["low"]:.3f}x - {p["high"]:.3f}x | {goal} | {p["verdict"]} |')
    record = _load('training_cost_channels_last')
    if record is not None:
        lines += ['', '## Training step in channels_last ([training_cost_channels_last.md]'
                  '(training_cost_channels_last.md))', '',
                  '| pair | method | channels_last / contiguous step time |', '|---|---|---|']
        for arch, rows in record['archs'].items():
            for label, r in rows.items():
                ratio = 'unmeasured' if r['noisy'] else f'{r["ratio"]:.2f}x'
                lines.append(f'| {arch} | {label} | {ratio} |')
    record = _load('deploy_bench')
    if record is not None:
        lines += ['', '## Deployment: residual model vs twin ([deploy_bench.md](deploy_bench.md))', '',
                  '| teacher | batch | eager speed-up | measured peak memory ratio |', '|---|---|---|---|']
        for result in record['results']:
            for batch, row in result['batches'].items():
                memory = row.get('memory_ratio_measured')
                lines.append(f'| {result["teacher"]} | {batch} | {row["speedup/eager"]:.2f}x | '
                             f'{"" if memory is None else f"{memory:.2f}x"} |')
    return lines


def render() -> str:
    lines = ['# Results at a glance', '',
             'Generated by `python benchmarks/summary.py` from the records in this folder (each table links its '
             'page, which states the machine, the budget and the command of every run). Do not edit by hand.', '']
    lines += ablation_lines() + full_cifar10_lines() + alternatives_lines() + zoo_lines() + coverage_lines() + cost_lines()
    return '\n'.join(lines) + '\n'


# every script of the suite and what it writes (globs under benchmarks/; none: a module the scripts share)
SUITE = {
    'accuracy.py': ['results/cifar10_jointrd.*', 'results/cifar10_zoo.*', 'results/recipe_ablation*.*',
                    'results/full_cifar10_*.*', 'runs/full_cifar10/'],
    'publish_cifar10.py': ['../registry/*.json', '../registry/weights/'],
    'alternatives.py': ['results/alternatives_*.*'],
    'timm_validate.py': ['results/timm_validate.*'],
    'deep_twin_screen.py': ['a JSON record per screen'],
    'deep_twin_report.py': ['results/deep_twin_diagnostics.*'],
    'conversion_lr.py': ['results/conversion_lr.*'],
    'step_cost.py': ['results/training_cost.*', 'results/training_cost_ratios*.*', 'results/training_cost_channels_last.*',
                     'results/training_cost_compile.*'],
    'deploy_bench.py': ['results/deploy_bench.*'],
    'twin_coverage.py': ['results/twin_coverage.*'],
    'recipe_coverage.py': ['columns of results/twin_coverage.*'],
    'shortcut_audit.py': ['results/shortcut_audit.*'],
    'torchvision_coverage.py': ['results/torchvision_coverage.*'],
    'summary.py': ['results/README.md', 'README.md'],
    'queue_runs.py': ['the tar files of --pack DIR', 'benchmarks/work/queue_logs/'],
    'scale_subset.py': [], 'scale_full.py': [], 'accuracy_pages.py': [], 'cifar_budget.py': [], 'step_cost_pages.py': [],
    'report.py': [],
}
# pages under results/ that no script of the suite writes, and what does
WRITTEN_ELSEWHERE = {'reliability.md': 'tests/test_reliability.py'}
# scripts replaced by the suite, as the commands of older records name them
REPLACED = {'cifar10_jointrd.py': 'accuracy.py subset --question jointrd',
            'cifar10_zoo.py': 'accuracy.py subset --question zoo',
            'recipe_ablation.py': 'accuracy.py subset --question ablation (--rows takes the same labels)',
            'accuracy_subset.py': 'accuracy.py subset (same options)',
            'full_cifar10.py': 'accuracy.py full (same options)',
            'training_cost.py': 'step_cost.py --question methods',
            'step_ratios.py': 'step_cost.py --question ratios',
            'channels_last_cost.py':
                'step_cost.py --question channels_last (`--variant compile`: `--question compile`)'}
README_NOTES = """Every script writes its record, page and plot through `report.py` (the JSON written atomically, the page
with the machine and command, the PNG where there is a plot). `accuracy.py` (both scales) and `step_cost.py` rewrite any
of their pages from its record alone (`--report-only`, with `--name <record>` or `--arch ARCH`). Timings on a shared
machine are noisy: every comparison is measured side by side in one run (interleaved, round by round). Scratch runs
go to `benchmarks/work/` (ignored by git).

`accuracy.py subset`'s questions share one work folder (`benchmarks/work/cifar10_jointrd/`): the teacher is trained
once, and a row whose run already finished (`final.json`) is read back instead of retrained, so a command resumes
after an interruption. `accuracy.py full` keeps its runs under `benchmarks/runs/`: the repository holds each run's
records (`metrics.jsonl`, `final.json`, `resumes.txt`) and the teachers' weights (every other run starts from them);
the weights of the other runs are not committed (`.gitignore`): a published twin's weights are in
`registry/weights/`, and `python benchmarks/accuracy.py full --arch ARCH --teacher-epochs N --only FOLDER` retrains
any other run from its teacher (same seed, same split; to the digit only under the code that ran it: the RegNet
teacher retrained under later code, `full_cifar10_rerun_regnetx_002.md`, did not reproduce its record's). A run longer
than a working session is resumed from its local `last.safetensors` on the same machine.

`queue_runs.py` runs a plan of such commands a few at a time until a deadline and packs what they wrote, for a machine
lent for minutes (a GPU runs many conversions side by side); its runs land in the same folders and pages.

`deploy_bench.py` needs the `bench` extra (`pip install -e '.[bench]'`, Torch-Pruning)."""


def first_sentence(script: Path) -> str:
    """The first sentence of a script's module docstring, on one line."""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ''
    paragraph = ' '.join(doc.split('\n\n')[0].split())
    return paragraph.split('. ')[0].rstrip('.') + '.'


def suite_readme() -> str:
    """benchmarks/README.md: one row per script of the folder (:data:`SUITE`), its docstring's first sentence and
    what it writes."""
    lines = ['# benchmarks/', '', 'Generated by `python benchmarks/summary.py` from the scripts of this folder (each '
             "script's docstring and what it writes); results at a glance: [results/README.md](results/README.md). "
             'Do not edit by hand.', '', '| script | what it answers or does | writes |', '|---|---|---|']
    for script, writes in SUITE.items():
        written = ', '.join(w if ' ' in w else f'`{w}`' for w in writes) or '(shared by the scripts)'
        lines.append(f'| `{script}` | {first_sentence(BENCHMARKS / script)} | {written} |')
    lines += ['', README_NOTES, '', 'Older records name scripts the suite replaced; the same runs now come from:', '',
              '| in an older record | now |', '|---|---|']
    for old, new in REPLACED.items():
        command, _, note = new.partition(' (')
        lines.append(f'| `benchmarks/{old}` | `benchmarks/{command}`' + (f' ({note}' if note else '') + ' |')
    return '\n'.join(lines) + '\n'


def main():
    (RESULTS / 'README.md').write_text(render())
    (BENCHMARKS / 'README.md').write_text(suite_readme())


if __name__ == '__main__':
    main()
