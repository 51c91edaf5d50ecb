"""The benchmark records and their pages: every committed page is what its script writes from its record now (numbers
and structure), the suite's README matches the folder, and a record stays at one pair and budget
(benchmarks/cifar_budget.py)."""
import glob
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / 'benchmarks'
RESULTS = BENCHMARKS / 'results'
sys.path.insert(0, str(BENCHMARKS))
from cifar_budget import budget_parser, budget_settings, check_record, recorded_settings  # noqa: E402

ACCURACY = sorted(['cifar10_jointrd', 'cifar10_zoo', *(p.stem for p in RESULTS.glob('recipe_ablation*.json'))])
STEP_COST = sorted(p.stem for p in RESULTS.glob('training_cost*.json'))
CELL = re.compile(r'^\|.*\|$')


def table(lines, header_start: str) -> list:
    """The rows (lists of cells) of the first markdown table whose header starts with ``header_start``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not CELL.match(line):
            break
        rows.append([c.strip() for c in line.strip('|').split(' | ')])
    return rows


# -- every page regenerates from its record ------------------------------------------------------------------------
@pytest.mark.parametrize('name', ACCURACY)
def test_accuracy_page_regenerates_from_its_record(name, tmp_path):
    import accuracy_pages
    import scale_subset
    record = json.loads((RESULTS / f'{name}.json').read_text())
    question = scale_subset.question_of(record)
    rows = {row.label: row for row in scale_subset.QUESTIONS[question]}
    accuracy_pages.write_page(question, name, record, rows, tmp_path)
    assert (tmp_path / f'{name}.md').read_text() == (RESULTS / f'{name}.md').read_text(), \
        f'stale: python benchmarks/accuracy.py subset --report-only --name {name}'
    assert json.loads((tmp_path / f'{name}.json').read_text()) == json.loads((RESULTS / f'{name}.json').read_text())


@pytest.mark.parametrize('name', STEP_COST)
def test_step_cost_page_regenerates_from_its_record(name, tmp_path, monkeypatch):
    import step_cost
    monkeypatch.setattr(step_cost, 'RESULTS', RESULTS)
    step_cost.write(name, step_cost.recorded(name, step_cost.parser()), tmp_path)
    assert (tmp_path / f'{name}.md').read_text() == (RESULTS / f'{name}.md').read_text(), \
        f'stale: python benchmarks/step_cost.py --report-only --name {name}'
    assert json.loads((tmp_path / f'{name}.json').read_text()) == json.loads((RESULTS / f'{name}.json').read_text())


def test_torchvision_coverage_page_regenerates_from_its_record_and_counts_its_rows():
    """benchmarks/results/torchvision_coverage.md is what its script writes from the record now; its summary line
    counts the per-model rows of the record (a model whose recipe path did not pass would be named)."""
    import torchvision_coverage
    from jointrd_timm.coverage import STEPS, recipe_outcome
    record = json.loads((RESULTS / 'torchvision_coverage.json').read_text())
    lines = torchvision_coverage.markdown(record['models'], record['meta'])
    page = (RESULTS / 'torchvision_coverage.md').read_text().splitlines()
    assert page[:len(lines)] == lines, 'stale: python benchmarks/torchvision_coverage.py --report-only'
    checked = {n: m for n, m in record['models'].items() if 'recipe' in m}
    rows = table(page, '| model |')
    assert sorted(r[0].strip('`') for r in rows) == sorted(checked)
    for row in rows:
        steps = checked[row[0].strip('`')]['recipe']
        assert row[3:3 + len(STEPS)] == [steps[s]['status'] for s in STEPS]
    passed = sum(recipe_outcome(m['recipe']) == 'pass' for m in checked.values())
    assert f'every step passed: {passed},' in '\n'.join(page)


def test_results_summary_and_suite_readme_are_generated():
    """benchmarks/results/README.md holds only numbers read from the records, benchmarks/README.md lists the
    scripts of the folder: both are what summary.py writes now."""
    import summary
    assert (RESULTS / 'README.md').read_text() == summary.render(), 'stale: run python benchmarks/summary.py'
    assert (BENCHMARKS / 'README.md').read_text() == summary.suite_readme(), 'stale: run python benchmarks/summary.py'
    record = summary._load('recipe_ablation')
    rows = {r[0]: r for r in table(summary.render().splitlines(), '| pair (page) | teacher(s) % |')}
    assert rows['resnet56_cifar ([recipe_ablation.md](recipe_ablation.md))'][2].startswith(
        f'{record["table"][summary.DEFAULT_ROW]["mean"]:.2f} %')


def test_suite_readme_lists_every_script_once_and_what_each_writes():
    import summary
    scripts = sorted(p.name for p in BENCHMARKS.glob('*.py'))
    assert sorted(summary.SUITE) == scripts
    listed = [r[0].strip('`') for r in table(summary.suite_readme().splitlines(), '| script |')]
    assert sorted(listed) == scripts and len(listed) == len(set(listed))
    # every results file is written by exactly one script (or, named, elsewhere); every glob finds a file
    owners = {}
    for script, writes in summary.SUITE.items():
        for pattern in writes:
            if pattern.startswith('results/'):
                found = glob.glob(str(BENCHMARKS / pattern))
                assert found, (script, pattern)
                for path in found:
                    owners.setdefault(Path(path).name, []).append(script)
    for path in RESULTS.iterdir():
        if path.name.startswith('.') or path.name in summary.WRITTEN_ELSEWHERE:
            continue
        assert len(owners.get(path.name, [])) == 1, (path.name, owners.get(path.name))
    for old in summary.REPLACED:
        assert not (BENCHMARKS / old).exists() and old not in summary.SUITE


@pytest.mark.parametrize('page', sorted(p.name for p in RESULTS.glob('*.md')))
def test_page_links_resolve(page):
    text = (RESULTS / page).read_text()
    for target in re.findall(r'\]\(([^)#\s]+)\)', text):
        if not target.startswith('http'):
            assert (RESULTS / target).exists(), (page, target)


# -- the numbers of the pages, read back from the records ----------------------------------------------------------
def test_accuracy_tables_read_their_numbers_from_the_records():
    page = (RESULTS / 'cifar10_jointrd.md').read_text().splitlines()
    record = json.loads((RESULTS / 'cifar10_jointrd.json').read_text())
    rows = table(page, '| row | test acc %')
    teacher = record['rows']['teacher']['test_acc']
    assert [r[0] for r in rows] == list(record['rows'])
    for label, acc, gap, secs in rows:
        r = record['rows'][label]
        assert (float(acc), float(gap), float(secs)) == (round(r['test_acc'], 2), round(teacher - r['test_acc'], 2),
                                                         r['seconds_per_epoch'])
    zoo = json.loads((RESULTS / 'cifar10_zoo.json').read_text())
    rows = table((RESULTS / 'cifar10_zoo.md').read_text().splitlines(), '| row | test acc %')
    alone = zoo['rows']['twin alone']['test_acc']
    assert {r[0]: float(r[2]) for r in rows} == {k: round(v['test_acc'] - alone, 2) for k, v in zoo['rows'].items()}
    assert len(table((RESULTS / 'cifar10_zoo.md').read_text().splitlines(), '| Xu et al. row')) == 4
    ablation = json.loads((RESULTS / 'recipe_ablation.json').read_text())
    lines = (RESULTS / 'recipe_ablation.md').read_text().splitlines()
    rows = table(lines, '| row | test acc % | ± |')
    assert [r[0] for r in rows] == list(ablation['table'])
    for r in rows:
        t = ablation['table'][r[0]]
        assert (float(r[1]), int(r[4]), float(r[6])) == (round(t['mean'], 2), t['n'], round(t['gap'], 2))
    ids = {r[0]: r[1].strip('`') for r in table(lines, '| row | id (`--rows`) |')}
    assert ids['JointRD + fade over 80 % + teacher init'].startswith('jointrd:')
    assert set(ids) == {r['label'] for r in ablation['runs'].values()}


def test_step_cost_tables_read_their_numbers_from_the_records():
    from step_cost_pages import GOALS
    record = json.loads((RESULTS / 'training_cost.json').read_text())
    lines = (RESULTS / 'training_cost.md').read_text().splitlines()
    for arch, result in record['archs'].items():
        start = lines.index(f'## {arch} pair')
        rows = table(lines[start:], '| method | step ms')
        assert [r[0] for r in rows] == list(result['rows'])
        for r in rows:
            row = result['rows'][r[0]]
            assert (int(r[1]), r[3], int(r[5])) == (round(row['step_ms']), f'{row["time_vs_kd"]:.2f}x',
                                                    round(row['peak_mb']))
        goals = table(lines[start:], '| goal | measured |')
        assert [g[3] for g in goals] == [g['met'] for g in result['goals']] and len(goals) == len(GOALS)
    ratios = json.loads((RESULTS / 'training_cost_ratios.json').read_text())
    lines = (RESULTS / 'training_cost_ratios.md').read_text().splitlines()
    for arch, result in ratios['archs'].items():
        rows = table(lines[lines.index(f'## {arch} pair'):], '| ratio | median |')
        assert [(r[1], r[4], r[6]) for r in rows] == [(f'{p["median"]:.3f}x', str(p['rounds']), p['verdict'])
                                                      for p in result['pairs']]
    compiled = json.loads((RESULTS / 'training_cost_compile.json').read_text())
    rows = table((RESULTS / 'training_cost_compile.md').read_text().splitlines(), '| method | eager ms')
    assert [r[3].split('x')[0] for r in rows] == [f'{r["ratio"]:.2f}' for r in compiled['archs']['resnet20_cifar'].values()]


# -- a record stays at one pair and budget -------------------------------------------------------------------------
# the shape of a record written before settings were stored: only its command line says what it was measured at
OLD_META = dict(command='python benchmarks/recipe_ablation.py --arch resnet110_cifar --train-size 8000 '
                        '--val-size 2000 --epochs 10 --batch-size 128 --lr 0.1 --workers 0 --name x '
                        '--seeds 1 --rows "JointRD + fade over 80 % + teacher init" --seed-major False')


def parser():
    return budget_parser('test', 'x')


def test_recorded_settings_from_old_command_and_from_stored_settings():
    p = parser()
    assert recorded_settings(OLD_META, p) == dict(arch='resnet110_cifar', train_size=8000, val_size=2000, epochs=10,
                                                  batch_size=128, lr=0.1)
    # flags the command did not give had the parser's defaults
    assert recorded_settings(dict(command='python benchmarks/recipe_ablation.py --rows "twin alone" --seeds 0 1 '
                                          '(stopped after twin alone seed 1)'), p) == budget_settings(p.parse_args([]))
    stored = dict(OLD_META, settings=dict(arch='resnet56_cifar', train_size=4000, val_size=1000, epochs=3,
                                          batch_size=64, lr=0.05))
    assert recorded_settings(stored, p) == stored['settings']  # stored settings win over the command


def test_mismatch_is_refused_naming_the_recorded_values(capsys):
    p = parser()
    args = p.parse_args(['--epochs', '10'])  # resnet56_cifar by default: not the record's pair
    with pytest.raises(SystemExit):
        check_record(p, args, OLD_META, 'results/x.json')
    err = capsys.readouterr().err.splitlines()[-1]  # the error line (usage comes first)
    assert 'results/x.json records runs made with --arch resnet110_cifar' in err
    assert 'asks for --arch resnet56_cifar' in err and '--name NEW' in err
    assert '--epochs' not in err  # only what differs is named


def test_matching_command_and_new_record_pass():
    p = parser()
    args = p.parse_args(['--arch', 'resnet110_cifar', '--epochs', '10'])
    check_record(p, args, OLD_META, 'x.json')
    check_record(p, p.parse_args([]), None, 'x.json')  # no record yet
    assert args.arch == 'resnet110_cifar'


def test_report_only_adopts_the_recorded_settings():
    p = parser()
    args = p.parse_args(['--lr', '0.5'])
    check_record(p, args, OLD_META, 'x.json', report_only=True)
    assert budget_settings(args) == recorded_settings(OLD_META, p)


def test_a_record_names_the_command_that_ran_it_not_the_report_only_rewrite(monkeypatch):
    import report
    monkeypatch.setattr(sys, 'argv', [str(BENCHMARKS / 'accuracy.py'), 'full', '--arch', 'resnet20_cifar', '--variant',
                                      'a b=lr_scale:0.2', '--report-only'])
    assert report.this_command() == \
        "python benchmarks/accuracy.py full --arch resnet20_cifar --variant 'a b=lr_scale:0.2'"


def test_deep_twin_screens_of_another_batch_or_length_get_names_of_their_own():
    """deep_twin_report --add replaces a screen of the same name: a screen at another batch (or length) must not
    replace the baseline's."""
    import deep_twin_report
    base = dict(jointrd=True, lr=0.1, fade=0.8, batch_size=128, steps=375, lever=['kd_weight=1.0'])
    assert deep_twin_report.screen_name(dict(args=base)) == 'jointrd, kd_weight=1.0'
    assert deep_twin_report.screen_name(dict(args=dict(base, batch_size=64, steps=750))) == \
        'jointrd, batch 64, 750 steps, kd_weight=1.0'
    assert deep_twin_report.screen_name(dict(args=dict(base, recipe='kd-low-lr-blocks'))) == \
        'jointrd, kd-low-lr-blocks, kd_weight=1.0'
    screens = json.loads((RESULTS / 'deep_twin_diagnostics.json').read_text())['screens']
    names = [deep_twin_report.screen_name(s) for s in screens]
    assert len(set(names)) == len(names)  # every recorded screen has a name of its own


def test_a_deep_twin_screen_reruns_on_the_recipe_its_record_names():
    """The screens were recorded on the default recipe; the architecture's recipe has changed since (depth 56:
    kd-low-lr-blocks), so a screen names its recipe (--recipe, default 'default') instead of following it."""
    import deep_twin_screen
    recorded = {s['recipe'] for s in json.loads((RESULTS / 'deep_twin_diagnostics.json').read_text())['screens']
                if 'recipe' not in s['args']}  # the screens recorded before --recipe
    args = deep_twin_screen.parser().parse_args(['--out', 'x.json'])
    assert {deep_twin_screen.screen_recipe(args).id} == recorded
    args = deep_twin_screen.parser().parse_args(['--out', 'x', '--recipe', 'kd-low-lr-blocks', '--lever',
                                                 'block_loss_weight=10.0', '--share'])
    recipe = deep_twin_screen.screen_recipe(args)
    assert recipe.jointrd_config().block_loss_weight == 10.0 and recipe.shortcut_fade_mode == 'share'
    assert recipe.id.startswith('kd-low-lr-blocks,')


def test_the_deep_twin_goals_name_the_runs_of_the_recipes_they_list():
    """Each recipe the goal table names by a registered name is what its runs trained (their record's recipe column,
    replayed by get_recipe), and each cell is the record's test accuracy of a finished run."""
    import deep_twin_report
    from jointrd_timm.recipes import RECIPES, get_recipe
    rows = deep_twin_report.goal_rows()
    checked = 0
    for row in rows:
        runs = {r['folder']: r for r in json.loads((RESULTS / f'{row["record"]}.json').read_text())['runs']}
        for folder, acc in zip(row['folders'], row['test_acc']):
            if 'test_acc' not in runs.get(folder, {}):  # not run, or not finished
                assert acc is None
                continue
            assert acc == runs[folder]['test_acc'] and runs[folder]['epochs'] <= row['epochs']
            fit = row['fit'][row['folders'].index(folder)]  # the last epoch's train and held-out accuracy
            assert fit[1] == runs[folder]['val_acc'] and 0 < fit[0] <= 100, (folder, fit)
            if row['recipe'] in RECIPES:
                assert get_recipe(runs[folder]['recipe']).same_ingredients(RECIPES[row['recipe']]), (folder, row)
                checked += 1
    assert checked >= 10
    page = (RESULTS / 'deep_twin_diagnostics.md').read_text().splitlines()
    written = deep_twin_report.goal_lines(rows)
    start = page.index(written[0])
    assert page[start:start + len(written)] == written, 'the page is stale: python benchmarks/deep_twin_report.py'


def test_a_deep_twin_goal_is_met_only_when_both_seeds_reach_the_target(tmp_path):
    import deep_twin_report
    record = dict(runs=[dict(folder='teacher', epochs=8, epochs_done=8, test_acc=80.0),
                        dict(folder='a', epochs=4, epochs_done=4, test_acc=79.0),
                        dict(folder='a-s1', epochs=4, epochs_done=4, test_acc=79.5),
                        dict(folder='b', epochs=4, epochs_done=4, test_acc=79.4),
                        dict(folder='b-s1', epochs=4, epochs_done=4, test_acc=78.99),
                        dict(folder='c', epochs=4, epochs_done=3)])
    (tmp_path / 'rec.json').write_text(json.dumps(record))
    for folder, curve in [('teacher', [(70.0, 71.0), (90.5, 81.5)]), ('a', [(88.25, 79.5)]), ('c', [(60.0, 61.0)])]:
        (tmp_path / 'runs' / 'r' / 'x' / folder).mkdir(parents=True)
        done = next(r['epochs_done'] for r in record['runs'] if r['folder'] == folder)  # its last epoch
        (tmp_path / 'runs' / 'r' / 'x' / folder / 'metrics.jsonl').write_text(''.join(
            json.dumps(dict(epoch=done - len(curve) + k + 1, train_acc=t, val_acc=v)) + '\n'
            for k, (t, v) in enumerate(curve)))
    goals = (dict(arch='x', record='rec', runs='r', epochs=4, tolerance=1.0,
                  recipes=(('ra', ('a', 'a-s1')), ('rb', ('b', 'b-s1')), ('rc', ('c', 'c-s1')))),)
    rows = deep_twin_report.goal_rows(goals, tmp_path, arch_recipes={'x': 'rb'}, runs_root=tmp_path / 'runs')
    assert [r['target'] for r in rows] == [79.0] * 3
    assert [r['met'] for r in rows] == [True, False, False]  # at the target counts; 78.99 does not
    assert [r['is_recipe'] for r in rows] == [False, True, False]
    assert rows[2]['test_acc'] == [None, None]  # an unfinished run and a missing one
    # the last epoch of each folder; a finished run without its folder here has none, an unfinished one is not read
    assert [r['teacher_fit'] for r in rows] == [(90.5, 81.5)] * 3
    assert [r['fit'] for r in rows] == [[(88.25, 79.5), (None, None)], [(None, None)] * 2, [None, None]]
    lines = deep_twin_report.goal_lines(rows)
    fit = lines.index('| x (8) | ra | 90.50 / 81.50 | 88.25 / 79.50 | no metrics |')
    assert lines[fit + 2] == '| x (8) | rc | 90.50 / 81.50 | not finished | not finished |'
    lines = lines[:fit - 4]
    assert '| **rb** | 79.40 (-0.60) | 78.99 (-1.01) | no |' in lines[-3]
    assert lines[-2].endswith('| rc | not finished | not finished | no |')
    # the target as the page prints it: 87.17 - 0.5 is 86.67000000000002 in floats, and a run at 86.67 reaches it
    record['runs'][:3] = [dict(folder='teacher', epochs=32, epochs_done=32, test_acc=87.17),
                          dict(folder='a', epochs=4, epochs_done=4, test_acc=86.67),
                          dict(folder='a-s1', epochs=4, epochs_done=4, test_acc=86.9)]
    (tmp_path / 'rec.json').write_text(json.dumps(record))
    half = (dict(goals[0], tolerance=0.5),)
    # the teacher's folder still ends at epoch 8 where the record now says 32: another run than the record's
    with pytest.raises(ValueError, match=r'teacher: its metrics end at epoch 8, its record at 32'):
        deep_twin_report.goal_rows(half, tmp_path, arch_recipes={}, runs_root=tmp_path / 'runs')
    assert deep_twin_report.goal_rows(half, tmp_path, arch_recipes={}, runs_root=tmp_path / 'none')[0]['met']
    with pytest.raises(ValueError, match=r"rec: \['a', 'a-s1'\] trained longer than the goal's 2 epochs"):
        deep_twin_report.goal_rows((dict(half[0], epochs=2),), tmp_path, arch_recipes={}, runs_root=tmp_path / 'none')


def test_torchvision_coverage_refuses_a_partial_rerun_at_another_size(monkeypatch, capsys):
    """The record holds one input size for all its models: checking some of them again at another size is refused
    before anything is checked or written (the whole sweep with --redo may change it)."""
    import torchvision_coverage

    def must_not_run(*args, **kwargs):
        raise AssertionError('the refused run went on to check or write')
    monkeypatch.setattr(torchvision_coverage, 'classify', must_not_run)
    monkeypatch.setattr(torchvision_coverage, 'write', must_not_run)
    recorded = json.loads((RESULTS / 'torchvision_coverage.json').read_text())['meta']['size']
    for argv in (['--size', str(recorded + 32)], ['--size', str(recorded + 32), '--redo', '--names', 'resnet18']):
        monkeypatch.setattr(sys, 'argv', ['torchvision_coverage.py', *argv])
        with pytest.raises(SystemExit) as exit_info:
            torchvision_coverage.main()
        assert exit_info.value.code == 2
        assert (f'the record was checked at {recorded} px: --size {recorded + 32} needs --redo over all models'
                in capsys.readouterr().err)
