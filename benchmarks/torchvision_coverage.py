"""Which torchvision classification models get a shortcut-free twin, and the recipe path (fading twin -> JointRD ->
deployed twin -> export) of every one up to 30 M parameters.

Every model in ``torchvision.models.list_models(module=torchvision.models)`` is classified by the check that
``jointrd distill`` and ``jointrd derive`` run (``twin_refusal('torchvision:<name>')``: a transformer, not residual,
a block no rule handles, or derivable); each derivable one up to 30 M parameters (torchvision's own count for its
default weights) then goes through ``jointrd_timm.coverage.check_recipe_path``, the checks of
``benchmarks/recipe_coverage.py`` for timm, with random weights at a small input. Each result is written into the
record as soon as it is done, so an interrupted sweep resumes where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/torchvision_coverage.py              # all (minutes)
    python benchmarks/torchvision_coverage.py --names resnet18 --redo          # re-check some
    python benchmarks/torchvision_coverage.py --report-only                    # the page from the record
"""
import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torchvision

import jointrd_timm
from jointrd_timm.coverage import STEPS, check_recipe_path, recipe_outcome
from jointrd_timm.models.plain_twins import twin_refusal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import RESULTS, load_record, pyplot, save_figure, write_report  # noqa: E402

NAME = 'torchvision_coverage'
MAX_PARAMS = 30e6
OUTCOMES = ('pass', 'refused', 'failed')


def classify(name: str) -> dict:
    """What the twin check says of torchvision's ``name``: its family (builder module), parameter count and
    status (``derivable``, ``transformer (refused)``, ``not residual``, ``no rule``) with the reason."""
    builder = torchvision.models.get_model_builder(name)
    params = torchvision.models.get_model_weights(name).DEFAULT.meta['num_params']
    row = dict(family=builder.__module__.rpartition('.')[2], params=params)
    try:
        why = twin_refusal(f'torchvision:{name}')
    except Exception as e:  # noqa: BLE001 - recorded: a check that crashes is a finding, not the end of the sweep
        return dict(row, status='no rule', reason=f'the twin check crashed: {type(e).__name__}: {e}'[:300])
    if why is None:
        return dict(row, status='derivable')
    status = ('transformer (refused)' if 'is a transformer' in why else
              'not residual' if 'no shortcut addition' in why else 'no rule')
    return dict(row, status=status, reason=why[:300])


def markdown(models: dict, meta: dict) -> list:
    status = Counter(m['status'] for m in models.values())
    checked = {n: m for n, m in models.items() if 'recipe' in m}
    candidates = [n for n, m in models.items() if m['status'] == 'derivable' and m['params'] <= MAX_PARAMS]
    outcome = Counter(recipe_outcome(m['recipe']) for m in checked.values())
    lines = ['# Twin coverage: every torchvision classification model', '',
             f'torchvision {meta["torchvision"]}, jointrd_timm {meta["jointrd_timm"]}; {len(models)} models in '
             '`torchvision.models.list_models(module=torchvision.models)`, each classified by the check `jointrd '
             'distill` and `jointrd derive` run on a `torchvision:` name.', '',
             '| status | models |', '|---|---|'] + [f'| {s} | {c} |' for s, c in sorted(status.items())]
    lines += ['', '## Recipe path of the derivable models up to 30 M parameters', '',
              (f'**PARTIAL: {len(checked)} of {len(candidates)} checked.** ' if len(checked) < len(candidates) else '')
              + f'{len(candidates)} derivable models up to 30 M parameters; every step passed: {outcome["pass"]}, '
              f'refused by design at a step: {outcome["refused"]}, failed or crashed: {outcome["failed"]}.', '',
              f'Input {meta["size"]} px square (batch 2, 10 classes, random weights moved off their initial values), '
              '1 thread. The steps are those of timm\'s [twin_coverage.md](twin_coverage.md) '
              '(`jointrd_timm.coverage.check_recipe_path`): **fade**: the fading twin with the teacher\'s weights '
              'equals the teacher at s = 1; **jointrd**: the stage split builds and one JointRD step gives a finite '
              'loss and a gradient to every parameter the twin alone reaches; **deploy**: at s = 0 no shortcut is '
              'left and the deployed twin loads strictly into `plain_torchvision:<name>` with the same outputs; '
              '**export**: folding and ONNX export, checked by onnxruntime.', '',
              '| model | family | params (M) | ' + ' | '.join(STEPS) + ' | max abs diff at s = 1 | ONNX max abs error |',
              '|---|---|---|' + '---|' * (len(STEPS) + 2)]
    for name, m in sorted(checked.items(), key=lambda kv: kv[1]['params']):
        r = m['recipe']
        fade = r['fade'].get('max_abs_diff')
        onnx = r['export'].get('onnx_max_abs_error')
        lines.append(f'| `{name}` | {m["family"]} | {m["params"] / 1e6:.1f} | '
                     + ' | '.join(r[s]['status'] for s in STEPS)
                     + f' | {"" if fade is None else f"{fade:.1e}"} | {"" if onnx is None else f"{onnx:.1e}"} |')
    problems = [(n, s, m['recipe'][s]) for n, m in checked.items() for s in STEPS
                if m['recipe'][s]['status'] not in ('pass', 'skipped')]
    lines += ['', '### Steps that did not pass, and why', '']
    lines += [f'- `{n}` {s}: {st["status"]}: {st.get("error", "")} {st.get("reason", "")}'.rstrip()
              for n, s, st in problems] or ['- none']
    lines += ['', '## Models without a twin, and why', '']
    lines += [f'- `{n}` ({m["family"]}, {m["status"]}): {m["reason"]}' for n, m in sorted(models.items())
              if m['status'] != 'derivable']
    larger = sorted(n for n, m in models.items() if m['status'] == 'derivable' and m['params'] > MAX_PARAMS)
    lines += ['', f'Derivable, above 30 M parameters (classified, recipe path not run): '
              + (', '.join(f'`{n}`' for n in larger) or 'none') + '.']
    return lines


def plot(models: dict, path: Path) -> None:
    plt = pyplot()
    families = sorted({m['family'] for m in models.values()})
    kinds = ['recipe path passed', 'derivable, above 30 M', 'transformer or plain already', 'no rule / failed']

    def kind(m):
        if 'recipe' in m:
            return kinds[0] if recipe_outcome(m['recipe']) == 'pass' else kinds[3]
        if m['status'] == 'derivable':
            return kinds[1]
        return kinds[2] if m['status'] in ('transformer (refused)', 'not residual') else kinds[3]
    counts = {k: [sum(1 for m in models.values() if m['family'] == f and kind(m) == k) for f in families]
              for k in kinds}
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(families) + 1.5))
    left = [0] * len(families)
    for k, colour in zip(kinds, ('tab:green', 'tab:olive', 'tab:gray', 'tab:red')):
        ax.barh(families, counts[k], left=left, label=k, color=colour)
        left = [a + b for a, b in zip(left, counts[k])]
    ax.set_xlabel('torchvision models')
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc='lower right')
    ax.set_title('torchvision classification models: twin and recipe path')
    save_figure(fig, path)


def write(models: dict, meta: dict) -> None:
    write_report(NAME, dict(meta=meta, models=models), markdown(models, meta), plot=lambda p: plot(models, p))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--names', nargs='*', default=None, help='check exactly these torchvision models')
    parser.add_argument('--redo', action='store_true', help='re-check models already recorded')
    parser.add_argument('--size', type=int, default=64, help='input size unless the model needs more')
    parser.add_argument('--report-only', action='store_true', help='rewrite the page from the record')
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = load_record(NAME) or {}
    models = record.get('models', {})
    meta = record.get('meta', {})
    if args.report_only:
        args.size = meta.get('size', args.size)
    elif meta.get('size', args.size) != args.size and not (args.redo and not args.names):
        parser.error(f'the record was checked at {meta["size"]} px: --size {args.size} needs --redo over all models')
    meta.update(torchvision=torchvision.__version__, jointrd_timm=jointrd_timm.__version__, size=args.size)
    known = torchvision.models.list_models(module=torchvision.models)
    unknown = [n for n in args.names or [] if n not in known]
    if unknown:
        parser.error(f'not torchvision classification models: {unknown}')
    todo = [] if args.report_only else [n for n in args.names or known if args.redo or n not in models]
    start = time.time()
    for i, name in enumerate(todo):
        t = time.time()
        row = classify(name)
        if row['status'] == 'derivable' and row['params'] <= MAX_PARAMS:
            row['recipe'] = check_recipe_path(f'torchvision:{name}', size=args.size)
            row['size'] = args.size
        models[name] = row
        meta['seconds'] = round(meta.get('seconds', 0) + time.time() - t)
        steps = ' '.join(f'{s}={r["status"]}' for s, r in row.get('recipe', {}).items())
        print(f'[{time.time() - start:5.0f}s] {i + 1}/{len(todo)} {name}: {row["status"]} {steps}', flush=True)
        write(models, meta)  # after each model: an interrupted sweep resumes
    if not todo:
        write(models, meta)


if __name__ == '__main__':
    main()
