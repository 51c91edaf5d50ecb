"""Publish CIFAR-10 teachers and twins trained by the benchmarks into registry/ (timm Hub format + catalogue
entries whose numbers are copied from the benchmark's record, never typed in).

From ``accuracy.py full``'s record ``benchmarks/results/full_cifar10_<ARCH>.json`` (the full training set): the
teacher as ``<ARCH>.ce_full_cifar10`` and the best finished twin (chosen on the held-out validation split: the highest
last-epoch validation accuracy among the twin rows; the test set chooses nothing) as
``plain_<ARCH>.<jointrd|fade>_full_cifar10``, each card stating the budget, the teacher's and the equal-compute
control's numbers. (The earlier 8,000-image toy entries, ``*.ce_cifar10`` / ``*.jointrd_cifar10``, are retired; their
runs stay on benchmarks/results/cifar10_jointrd.md.)

    python benchmarks/publish_cifar10.py --full resnet20_cifar
    python benchmarks/publish_cifar10.py --full resnet56_cifar --name full_cifar10_t32   # another record's runs
Then: jointrd eval plain_resnet20_cifar.<tag> --dataset PATH_TO_CIFAR10   (reproduces the card's top-1; the Hub
id uoft-cs/cifar10 where the Hub is reachable)
"""
import argparse
import json
from pathlib import Path
from typing import Optional

import jointrd_timm  # noqa: F401
from jointrd_timm.integrations.hub import load_model, model_card, save_trained_model

ROOT = Path(__file__).resolve().parents[1]
ORG = 'jointrd-timm'
COMMON = dict(dataset='CIFAR-10 (Krizhevsky 2009; uoft-cs/cifar10 layout)', hf_dataset='uoft-cs/cifar10',
              num_classes=10, license='apache-2.0',
              eval=dict(dataset='uoft-cs/cifar10', split='test', transform='cifar'))
TEST_SPLIT = 'test (10,000 images), last epoch'
# the twin rows of accuracy.py full -> (tag prefix, method line)
TWIN_ROWS = {'twin + JointRD': ('jointrd', 'JointRD (Li et al., "Residual Distillation", NeurIPS 2020), recipe `{recipe}` '
                                           '(teacher init, shortcuts faded out, frozen teacher)'),
             'twin alone': ('fade', 'the twin alone with the recipe `{recipe}` ingredients: teacher init and shortcuts '
                                    'faded out, cross-entropy only (no JointRD terms)')}


def require_weights(folder: Path, recreate: str) -> None:
    """Refuse, before anything is written, a run to publish whose weights this checkout lacks."""
    if not (folder / 'model.safetensors').is_file():
        run = folder.parent.relative_to(ROOT)
        raise SystemExit(f'the weights of the run to publish ({run}) are not in this checkout (run weights are not '
                         f'committed, see .gitignore); nothing was published. Recreate them: move {run} aside and run '
                         f'`{recreate}` (it rewrites the run\'s row in the record), then publish again.')


def publish(entry: dict, folder: Path) -> None:
    entry['name'] = f'{entry["architecture"]}.{entry["tag"]}'
    entry['hf_hub_id'] = f'{ORG}/{entry["name"]}'
    entry['weights'] = f'weights/{entry["name"]}'
    save_trained_model(load_model(str(folder)), ROOT / 'registry' / entry['weights'], model_card=model_card(entry),
                       tag=entry['tag'])
    (ROOT / 'registry' / f'{entry["name"]}.json').write_text(json.dumps(entry, indent=1) + '\n')
    print('published', entry['name'], entry['metrics']['top1_test'])


# DECISION: a published twin costs at most half its teacher's epochs (the product's budget: longer conversions are
# measured on the pages, not published in place of it)
MAX_FRACTION = 0.5


def best_twin(runs: list, teacher_epochs: int, max_fraction: float = MAX_FRACTION, arch: Optional[str] = None) -> dict:
    """The finished twin run of at most ``max_fraction`` of the teacher's epochs with the highest last-epoch accuracy
    on the held-out validation split (ties: the shorter run, then a run of ``arch``'s recommended recipe, the one
    ``jointrd distill`` trains, then JointRD); the test accuracy, which the card reports, plays no part in the
    choice."""
    from jointrd_timm.recipes import get_recipe, recipe_for
    done = [r for r in runs if r['row'].split(',')[0] in TWIN_ROWS and 'test_acc' in r and r.get('val_acc') is not None
            and r['epochs'] <= max_fraction * teacher_epochs]
    if not done:
        raise SystemExit(f'no finished twin run of at most {max_fraction:g} x {teacher_epochs} epochs in the record: '
                         'run benchmarks/accuracy.py full first')
    recommended = recipe_for(arch) if arch else None

    def recommended_recipe(run: dict) -> bool:  # the same ingredients, however the record names them
        try:
            recipe = get_recipe(run.get('recipe') or '')
        except (ValueError, TypeError):
            return False
        return recommended is not None and recipe.same_ingredients(recommended)
    return max(done, key=lambda r: (r['val_acc'], -r['epochs'], recommended_recipe(r),
                                    r['row'].startswith('twin + JointRD')))


RECORD = 'full_cifar10'  # accuracy.py full's default record name (--name) and work folder


def record_options(name: str) -> str:
    """The accuracy.py full options that train into the record ``name`` (none for the default record)."""
    return '' if name == RECORD else f' --name {name} --work-dir benchmarks/runs/{name}'


def twin_command(arch: str, meta: dict, twin: dict, name: str = RECORD) -> str:
    """The accuracy.py full command that trains ``twin`` (its fraction, recipe variant and seed) from the teacher,
    into the record ``name`` (named with its work folder where it is not the default)."""
    run, _, seed = twin['folder'].rpartition('-s')
    if not seed.isdigit():
        run, seed = twin['folder'], '0'
    command = (f'python benchmarks/accuracy.py full --arch {arch} --teacher-epochs {meta["teacher_epochs"]}'
               f'{record_options(name)} --fractions {twin["epochs"] / meta["teacher_epochs"]:g}')
    # the variant is the folder's whole suffix after its epochs ('kd-lr02', not the 'lr02' it ends with)
    suffix = run.split(f'-e{twin["epochs"]}-', 1)[1] if f'-e{twin["epochs"]}-' in run else None
    command += ''.join(f' --variant {v}' for v in meta.get('variants', []) if v.split('=')[0] == suffix)
    return command + (f' --seed {seed}' if seed != '0' else '') + f' --only {twin["folder"]}'


def publish_full(arch: str, name: str = RECORD) -> None:
    """Publish the teacher and the best twin of the record ``benchmarks/results/<name>_<arch>.json`` (run weights
    under ``benchmarks/runs/<name>/<arch>``); a record of another name replaces the entries of the same tags."""
    source = f'benchmarks/results/{name}_{arch}.json'
    if not (ROOT / source).is_file():
        raise SystemExit(f'no record {source}: run `python benchmarks/accuracy.py full --arch {arch}'
                         f'{record_options(name)}` first, or name an existing record with --name')
    record = json.loads((ROOT / source).read_text())
    meta, runs = record['meta'], record['runs']
    teacher = next(r for r in runs if r['row'] == 'teacher')
    if 'test_acc' not in teacher:
        raise SystemExit(f'the teacher of {source} has not finished')
    twin = best_twin(runs, meta['teacher_epochs'], arch=arch)
    control = next((r for r in runs if r['row'] == 'control' and r['epochs'] == twin['epochs'] and 'test_acc' in r),
                   None)
    work = ROOT / 'benchmarks/runs' / name / arch
    command = twin_command(arch, meta, twin, name)
    teacher_command = f'{command.split(" --fractions")[0]} --rows teacher'
    require_weights(work / teacher['folder'] / 'model', teacher_command)
    require_weights(work / twin['folder'] / 'model', command)
    data = f'{meta["data"]}; {meta["budget"]}'
    teacher_tag = 'ce_full_cifar10'
    publish(dict(COMMON, architecture=arch, tag=teacher_tag, teacher='(none: the residual teacher itself)',
                 method='cross-entropy', description=f'Residual {arch} trained on the full CIFAR-10 training set by '
                 "jointrd-timm's benchmark: the teacher its published shortcut-free twin was converted from.",
                 training=dict(command=teacher_command, budget=f'{meta["teacher_epochs"]} epochs; {data}',
                               source=source),
                 metrics=dict(top1_test=teacher['test_acc'], source=source, split=TEST_SPLIT)),
            work / teacher['folder'] / 'model')
    prefix, method = TWIN_ROWS[twin['row'].split(',')[0]]
    metrics = dict(top1_test=twin['test_acc'], teacher_top1_test=teacher['test_acc'],
                   gap_to_teacher=round(teacher['test_acc'] - twin['test_acc'], 2))
    if control is not None:
        metrics['control_top1_test'] = control['test_acc']
    metrics.update(source=source, split=TEST_SPLIT)
    publish(dict(COMMON, architecture=f'plain_{arch}', tag=f'{prefix}_full_cifar10', teacher=f'{arch}.{teacher_tag}',
                 method=method.format(recipe=twin.get('recipe', meta['recipe'])),
                 description=f'Shortcut-free twin of {arch} (no residual additions at all), converted from its '
                 f'teacher `{arch}.{teacher_tag}` in {twin["epochs"]} epochs on the full CIFAR-10 training set '
                 '(the best of the conversions on the held-out validation split).' + (
                     ' `control_top1_test`: the residual teacher trained for the same extra epochs instead (equal '
                     'compute).' if control is not None else ''),
                 training=dict(command=command, budget=f'teacher {meta["teacher_epochs"]} epochs, then the twin '
                               f'{twin["epochs"]} epochs; {data}', source=source),
                 metrics=metrics),
            work / twin['folder'] / 'model')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--full', metavar='ARCH', required=True,
                        help="publish accuracy.py full's teacher and best twin of ARCH (e.g. resnet20_cifar)")
    parser.add_argument('--name', default=RECORD,
                        help="the record to publish from: benchmarks/results/<NAME>_<ARCH>.json, its runs under "
                             "benchmarks/runs/<NAME> (accuracy.py full's --name; default %(default)s)")
    args = parser.parse_args()
    publish_full(args.full, args.name)


if __name__ == '__main__':
    main()
