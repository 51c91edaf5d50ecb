"""Which timm architectures get a shortcut-free twin, and why not when they do not.

Every architecture in ``timm.list_models()`` is built on the meta device (no memory, no weights) and handed to
``make_plain(strict=True)``; a twin counts as derived when no shortcut addition is left (torch.fx count). Twins of
architectures up to ``--real-max-params`` parameters are then built for real (``timm.create_model('plain_...')``)
and must run forward and give every parameter a non-zero gradient at init (in train mode, or in eval
mode for a bias that a following BatchNorm cancels in train mode), or with every weight moved a little off its init
for a parameter whose gradient only the start of the others holds at zero: see ``verify.dead_parameters``.

Writes benchmarks/results/twin_coverage.{json,md}. (Which architectures are registered as plain_* is decided by
jointrd_timm/models/underivable.json, written by ``python -m jointrd_timm.models.underivable`` with the same
classifier, jointrd_timm.twins.coverage.classify.)

    python benchmarks/twin_coverage.py            # about 30-40 minutes on 2 CPU cores
"""
import argparse
import json
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
import timm

import jointrd_timm
from jointrd_timm.models.plain_twins import TWIN_MODULES, PREFIX
from jointrd_timm.twins import make_plain
from jointrd_timm.coverage import STEPS, input_size_for, recipe_outcome
from jointrd_timm.twins.coverage import classify
from report import write_report
from jointrd_timm.twins.verify import dead_parameters

ROOT = Path(__file__).resolve().parents[1]
# architecture -> the timm module that registers it (timm's public module index)
MODULE_OF = {name: module for module in timm.list_modules() for name in timm.list_models(module=module)}


def real_check(name: str) -> dict:
    """Build the twin of <name> for real (what plain_<name> builds, also before it is registered); forward +
    backward at a small input; every gradient non-zero."""
    torch.manual_seed(0)
    model = make_plain(timm.create_model(name, num_classes=10))
    x = torch.randn(4, *input_size_for(model))
    model.train()
    y = model(x)
    dead = dead_parameters(model, x)
    return dict(forward_ok=bool(torch.isfinite(y).all()), dead_params=len(dead), dead_examples=dead[:3])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--filter', default='*')
    parser.add_argument('--real-max-params', type=float, default=30e6)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks/results'))
    parser.add_argument('--names', nargs='*', default=None, help='with --reclassify: re-run exactly these rows')
    parser.add_argument('--reclassify', action='store_true',
                        help="re-run the recorded rows that did not derive or failed the real check, and add "
                             "architectures registered since (after a rule or classifier change)")
    args = parser.parse_args()
    if args.reclassify:
        return reclassify(Path(args.out), args.real_max_params, args.names)
    torch.set_num_threads(2)
    names = [n for n in timm.list_models(args.filter) if not n.startswith(PREFIX)]
    results = {}
    start = time.time()
    for i, name in enumerate(names):
        res = _checked(name, dict(classify(name), module=MODULE_OF.get(name, '?')), args.real_max_params)
        results[name] = res
        if i % 50 == 0:
            print(f'[{time.time() - start:6.0f}s] {i}/{len(names)} {name}: {res["status"]}', flush=True)
    meta = dict(command='python benchmarks/twin_coverage.py', timm=timm.__version__, torch=torch.__version__,
                jointrd_timm=jointrd_timm.__version__, machine=f'{platform.machine()} {platform.processor()}'.strip(),
                python=sys.version.split()[0], seconds=round(time.time() - start))
    _keep_recipe_results(Path(args.out), results, meta)
    _write(Path(args.out), results, meta)


def _keep_recipe_results(out: Path, results: dict, meta: dict) -> None:
    """A new classification keeps the recipe columns that benchmarks/recipe_coverage.py recorded (re-run it with
    --redo after a change that may affect them)."""
    path = out / 'twin_coverage.json'
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for name, row in old['models'].items():
        if 'recipe' in row and name in results:
            results[name]['recipe'] = row['recipe']
    if 'recipe' in old['meta']:
        meta['recipe'] = old['meta']['recipe']


def _checked(name: str, res: dict, real_max_params: float) -> dict:
    if res['status'] == 'derived' and res['params'] <= real_max_params and res['module'] in TWIN_MODULES:
        try:
            res.update(real_check(name))
        except Exception as e:  # noqa: BLE001
            res.update(forward_ok=False, real_error=f'{type(e).__name__}: {e}'[:200])
    return res


def reclassify(out: Path, real_max_params: float, names=None) -> None:
    recorded = json.loads((out / 'twin_coverage.json').read_text())
    results, meta = recorded['models'], recorded['meta']
    start = time.time()
    stale = [n for n, r in results.items() if r['status'] in ('no rule', 'transformer (refused)')
             or r.get('forward_ok') is False or r.get('dead_params')]
    new = [n for n in timm.list_models() if n not in results and not n.startswith(PREFIX)]
    if names:
        stale, new = list(names), []
        meta['command'] += f' (then --reclassify --names {" ".join(names)})'
    for name in stale + new:
        results[name] = _checked(name, dict(classify(name), module=MODULE_OF.get(name, '?')), real_max_params)
    meta['reclassified_seconds'] = meta.get('reclassified_seconds', 0) + round(time.time() - start)
    if not names:
        meta['command'] += ' (then --reclassify)'
    _write(out, results, meta)


def _write(out: Path, results: dict, meta: dict) -> None:
    write_coverage(out, results, meta)


def write_coverage(out: Path, results: dict, meta: dict) -> None:
    """twin_coverage.{json,md} through the benchmarks' shared report tail (recipe_coverage.py writes here too)."""
    write_report('twin_coverage', dict(meta=meta, models=results), markdown(results, meta), out=Path(out))


def markdown(results, meta) -> list:
    by_module = defaultdict(Counter)
    for r in results.values():
        by_module[r['module']][r['status']] += 1
    residual_cnn = {n: r for n, r in results.items() if r['status'] in ('derived', 'no rule')}
    real = [r for r in residual_cnn.values() if 'forward_ok' in r]
    real_ok = [r for r in real if r['forward_ok'] and not r.get('dead_params')]
    # derived = the rules leave no shortcut AND, where built for real, the twin trains
    derived = [n for n, r in residual_cnn.items() if r['status'] == 'derived'
               and ('forward_ok' not in r or (r['forward_ok'] and not r.get('dead_params')))]
    lines = [
        '# Twin coverage: every architecture in timm.list_models()', '',
        f'timm {meta["timm"]}, torch {meta["torch"]}, jointrd_timm {meta["jointrd_timm"]}; '
        f'command `{meta["command"]}` ({meta["seconds"]} s on {meta["machine"]}, 2 CPU threads).', '',
        f'**Residual CNN architectures: {len(derived)} of {len(residual_cnn)} derived '
        f'({100 * len(derived) / max(1, len(residual_cnn)):.1f} %).** '
        f'Built for real and trained one step (forward finite, every parameter a non-zero gradient at init or '
        f'just off it): '
        f'{len(real_ok)} of {len(real)} checked (twins up to 30 M parameters).', '',
        'A residual CNN is an architecture whose modules contain a shortcut addition (torch.fx, see '
        '`jointrd_timm/twins/verify.py`) and that has no token mixer. Networks that mix tokens (self-attention '
        'and its variants, focal modulation, recurrent / state-space mixers, MLP-Mixer token MLPs; see '
        '`jointrd_timm.twins.derive.token_mixers`) are transformers or hybrids and refused by design, their '
        'mixers named in the reason; "not residual" means no shortcut addition was found (plain already). '
        '"Derived" counts a twin only if no shortcut is left and, where it was built for real, it trains.', '',
        '## By timm module', '', '| module | derived | no rule | transformer (refused) | not residual | build failed |',
        '|---|---|---|---|---|---|']
    for module in sorted(by_module, key=lambda m: (-by_module[m]['derived'], m)):
        c = by_module[module]
        lines.append(f'| {module} | {c["derived"]} | {c["no rule"]} | {c["transformer (refused)"]} | '
                     f'{c["not residual"]} | {c["build failed"]} |')
    lines += ['', '## Residual CNN architectures not derived, and why', '']
    for name, r in sorted(residual_cnn.items()):
        if r['status'] != 'derived':
            lines.append(f'- `{name}` ({r["module"]}): {r["reason"]}')
    failed_real = [(n, r) for n, r in residual_cnn.items() if 'forward_ok' in r and not (r['forward_ok'] and not r.get('dead_params'))]
    lines += ['', '## Derived but failing the real check', '']
    for name, r in failed_real:
        why = r.get('real_error') or f'{r["dead_params"]} parameters with zero gradient, e.g. {r["dead_examples"]}'
        lines.append(f'- `{name}`: {why}')
    if not failed_real:
        lines.append('- none')
    refused = defaultdict(Counter)
    for r in results.values():
        if r['status'] == 'transformer (refused)':
            mixers = 'transformer blocks'
            if 'mixes tokens with ' in r['reason']:
                text = r['reason'].split('mixes tokens with ')[1]
                # the recorded reason is cut at 300 characters: keep only the mixer names that are whole
                mixers = text.split(';')[0] if ';' in text else (', '.join(text.split(', ')[:-1]) or text) + ' ...'
            refused[r['module']][mixers] += 1
    lines += ['', '## Refused by design (token mixers), by module', '']
    for module in sorted(refused):
        lines.append(f'- {module}: ' + '; '.join(f'{m} ({c})' for m, c in refused[module].most_common()))
    lines += ['', '## Derived architectures', '', ', '.join(f'`{n}`' for n in sorted(derived))]
    lines += recipe_markdown(results, meta)
    return lines


RECIPE_STEPS = STEPS  # the columns: jointrd_timm.coverage's steps, in order
RECIPE_MAX_PARAMS = 30e6


def recipe_candidates(results: dict) -> list:
    """The architectures whose recipe path is checked: derived twins (of a registered plain_* module) that passed
    the real check, up to 30 M parameters, smallest first."""
    ok = [(r['params'], n) for n, r in results.items() if r['status'] == 'derived' and r['module'] in TWIN_MODULES
          and r.get('params', 0) <= RECIPE_MAX_PARAMS and r.get('forward_ok') and not r.get('dead_params')]
    return [n for _, n in sorted(ok)]


def _cell(step: dict) -> str:
    status = step['status']
    if status == 'pass':
        if 'max_abs_diff' in step:
            return f'pass ({step["max_abs_diff"]:.1e})'
        if 'onnx_max_abs_error' in step:
            return f'pass ({step["onnx_max_abs_error"]:.1e}, BN {step["batchnorms_before"]}->{step["batchnorms_after"]})'
        return 'pass'
    return f'**{status}**' + (f' ({step.get("error", "")})' if step.get('error') else '')


def recipe_markdown(results: dict, meta: dict) -> list:
    """The recipe-path section (benchmarks/recipe_coverage.py): one column per step of jointrd_timm.coverage."""
    candidates = recipe_candidates(results)
    checked = [n for n in candidates if 'recipe' in results[n]]
    if not checked:
        return []
    rmeta = meta.get('recipe', {})
    outcome = {n: recipe_outcome(results[n]['recipe']) for n in checked}
    all_pass = [n for n in checked if outcome[n] == 'pass']
    refused = [n for n in checked if outcome[n] == 'refused']
    partial = len(checked) < len(candidates)
    lines = ['', '## Recipe path: teacher -> fading twin -> JointRD -> deployed twin', '',
             (f'**PARTIAL: {len(checked)} of {len(candidates)} architectures checked** (the sweep did not finish; '
              'the smallest architectures first). ' if partial else '') +
             f'Derivable architectures up to 30 M parameters: {len(candidates)}; checked {len(checked)}; '
             f'**every step passed: {len(all_pass)} ({100 * len(all_pass) / len(checked):.1f} %)**, refused by design '
             f'at a step: {len(refused)}, failed or crashed: {len(checked) - len(all_pass) - len(refused)}.', '',
             f'Command `{rmeta.get("command", "python benchmarks/recipe_coverage.py")}` '
             f'({rmeta.get("seconds", "?")} s, 1 thread; input {rmeta.get("size", 64)} px square unless the model '
             'fixes its input size, batch 2, num_classes 10, random init). The checks are '
             '`jointrd_timm.coverage.check_recipe_path`: **fade**: `plain_<arch>` with `shortcut_fade=True` and the '
             "teacher's weights (`load_teacher_weights`) equals the teacher at s = 1 in eval mode (max abs diff); "
             '**jointrd**: the stage split builds and one JointRD train step gives a finite loss and a gradient to '
             'every twin parameter the twin-alone step reaches; **deploy**: at s = 0 `deployable()` has no shortcut '
             'addition left, loads strictly into `plain_<arch>` and gives the same outputs (max abs diff); '
             '**export**: BN / Dirac folding and ONNX export checked by onnxruntime (max abs error, BatchNorms '
             'before -> after folding).', '',
             '| step | pass | fail | refused | crash | skipped |', '|---|---|---|---|---|---|']
    for step in RECIPE_STEPS:
        c = Counter(results[n]['recipe'][step]['status'] for n in checked)
        lines.append(f'| {step} | {c["pass"]} | {c["fail"]} | {c["refused"]} | {c["crash"]} | {c["skipped"]} |')
    problems = [(n, s, results[n]['recipe'][s]) for n in checked for s in RECIPE_STEPS
                if results[n]['recipe'][s]['status'] not in ('pass', 'skipped')]
    lines += ['', '### Steps that did not pass, and why', '']
    lines += [f'- `{n}` {s}: {st["status"]}: {st.get("error", "")} {st.get("reason", "")}'.rstrip()
              for n, s, st in problems] or ['- none']
    lines += ['', '### By architecture', '', '| architecture | module | params (M) | ' + ' | '.join(RECIPE_STEPS) + ' |',
              '|---|---|---|' + '---|' * len(RECIPE_STEPS)]
    for n in checked:
        r = results[n]
        lines.append(f'| `{n}` | {r["module"]} | {r["params"] / 1e6:.2f} | '
                     + ' | '.join(_cell(r['recipe'][s]) for s in RECIPE_STEPS) + ' |')
    return lines


if __name__ == '__main__':
    main()
