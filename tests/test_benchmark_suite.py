"""The benchmark scripts' logic on made-up measurements: accuracy rows (recipes and methods) and their run loop, step
cost readings (round by round, bootstrap intervals, goals), and the published-twin pages' numbers."""
import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
BUDGET = argparse.Namespace(arch='resnet20_cifar', epochs=5, lr=0.1, batch_size=128)


# -- accuracy at the CPU budget ------------------------------------------------------------------------------------
def test_every_row_is_a_recipe_or_a_method_and_builds_its_config():
    import accuracy_pages
    import scale_subset as acc
    from jointrd_timm.recipes import DEFAULT_RECIPE, SCHEDULES, teacher_sgd
    methods = dict(teacher='ce', control='ce', alone='ce', jointrd='jointrd', kd='kd', fitnets='fitnets', cakd='cakd',
                   aps='aps')
    for question, rows in acc.QUESTIONS.items():
        assert len({r.id for r in rows}) == len(rows) and len({r.label for r in rows}) == len(rows), question
        for row in rows:
            model, method, extra = acc.model_config(row, 'resnet20_cifar', 'W/teacher/model', BUDGET)
            run = SCHEDULES['cpu-budget'].replace(epochs=5, lr=row.lr or 0.1, batch_size=128)
            if row.run in ('alone', 'jointrd'):  # a twin: its recipe's peak lr
                run = row.recipe.twin_schedule(run)
            assert method == methods[row.run] and extra['schedule'] == run, row.label
            if row.run == 'jointrd':
                assert model == row.recipe.jointrd_model('resnet20_cifar', 'W/teacher/model', SCHEDULES['cpu-budget']
                                                         .replace(epochs=5, lr=row.lr or 0.1), num_classes=10)
            if row.run in ('kd', 'fitnets'):
                assert extra['teacher']['kwargs']['checkpoint'] == 'W/teacher/model'
    ablation = {r.label: r for r in acc.QUESTIONS['ablation']}
    assert ablation[accuracy_pages.DEFAULT_ROW].recipe is DEFAULT_RECIPE
    for pairs in [accuracy_pages.PAIRS, *(m[1] for m in accuracy_pages.MATCHED)]:
        assert set(pairs) | set(pairs.values()) <= set(ablation)
    # the reference's JOINT branch: the teacher's own SGD is the twin's (the budget's schedule)
    joint = ablation[f'{accuracy_pages.JOINT_ROW} as the reference (teacher step first, running BN, margin per epoch)']
    model, _, _ = acc.model_config(joint, 'resnet20_cifar', 'W/teacher/model', BUDGET)
    assert model['kwargs']['jointrd']['teacher_optimizer'] == teacher_sgd(
        SCHEDULES['cpu-budget'].replace(epochs=5, lr=0.1, weight_decay=5e-4))
    assert model['kwargs']['jointrd']['teacher_mode'] == 'joint' and model['kwargs']['init_student_from_teacher']


def test_rows_shared_between_questions_use_one_run_folder(tmp_path):
    import scale_subset as acc
    budget = object.__new__(acc.Budget)
    budget.work, budget.teacher = tmp_path, dict(test_acc=47.94)
    budget.shared = {row.id: row.label for row in acc.QUESTIONS['jointrd']}
    ablation = {r.label: r for r in acc.QUESTIONS['ablation']}
    assert budget.folder(ablation['JointRD (reference loss)'], 0, 'ablation') == tmp_path / 'twin + JointRD'
    assert budget.folder(ablation['JointRD, 1 sampled path'], 0, 'ablation') == \
        tmp_path / 'twin + JointRD (1 sampled path)'
    assert budget.folder(ablation['twin alone'], 1, 'ablation') == tmp_path / 'ablation' / 'twin alone s1 t47.94'
    kd = acc.QUESTIONS['zoo'][2]
    assert budget.folder(kd, 0, 'zoo') == tmp_path / 'twin + KD' and budget.folder(acc.TEACHER, 3, 'zoo') == \
        tmp_path / 'teacher'


class FakeBudget:
    """Runs that 'finish' with a made-up accuracy per row and seed (no training)."""
    accs = {'teacher': 50.0, 'twin alone': 30.0, 'twin + JointRD': 36.0, 'twin + JointRD (1 sampled path)': 33.0,
            'JointRD (reference loss)': 36.0}

    def __init__(self, args):
        self.teacher, self.args = dict(test_acc=50.0), args

    def folder(self, row, seed, question):
        return Path(self.args.work_dir) / f'{row.label} {seed}'

    def run(self, row, seed, folder):
        acc = self.accs[row.label] + seed
        return dict(test_acc=acc), [dict(val_acc=acc - 1, train_loss=1.0, seconds=10.0 + seed)] * 2

    def data(self, seed):
        return None, None, None


def test_run_loop_writes_record_and_page_from_the_runs(tmp_path, monkeypatch):
    import scale_subset as acc
    monkeypatch.setattr(acc, 'RESULTS', tmp_path)
    monkeypatch.setattr(acc, 'Budget', FakeBudget)
    common = ['--work-dir', str(tmp_path), '--threads', '1']
    acc.main(['--question', 'jointrd', '--name', 'j', *common])
    record = json.loads((tmp_path / 'j.json').read_text())
    assert list(record['rows']) == [r.label for r in acc.QUESTIONS['jointrd']]
    assert record['rows']['twin + JointRD']['test_acc'] == 36.0 and record['meta']['question'] == 'jointrd'
    rows = {r[0]: r for r in _table((tmp_path / 'j.md').read_text(), '| row | test acc %')}
    assert rows['twin alone'][1:3] == ['30.00', '+20.00'] and rows['twin + JointRD'][2] == '+14.00'
    acc.main(['--question', 'ablation', '--name', 'a', '--rows', 'alone:reference', 'JointRD (reference loss)',
              '--seeds', '0', '1', *common])
    record = json.loads((tmp_path / 'a.json').read_text())
    assert len(record['runs']) == 4 and record['table']['twin alone']['mean'] == 30.5
    assert record['paired']['JointRD (reference loss)'] == [[0, 50.0, 36.0, 30.0], [1, 50.0, 37.0, 31.0]]
    assert record['meta']['commands'][0].startswith('python benchmarks/accuracy.py subset')
    page = (tmp_path / 'a.md').read_text()
    matched = _table(page, '| JointRD row |')
    assert matched[0][2:5] == ['+6.00', '2', '0.00'] and matched[0][-1] == '2 of 2'
    before = page
    acc.main(['--report-only', '--name', 'a'])  # the page from the record alone: the same
    assert (tmp_path / 'a.md').read_text() == before
    with pytest.raises(SystemExit):
        acc.main(['--question', 'ablation', '--name', 'a', '--rows', 'no such row', *common])
    with pytest.raises(SystemExit):  # the record is at resnet56_cifar
        acc.main(['--question', 'ablation', '--name', 'a', '--arch', 'resnet20_cifar', *common])


def _table(text: str, header_start: str) -> list:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        rows.append([c.strip() for c in line.strip('|').split(' | ')])
    return rows


def test_matched_differences_report_standard_error_and_t():
    import math

    from accuracy_pages import difference_stats, matched_table
    d = difference_stats([2.0, 4.0, -1.0, 3.0])
    assert d['n'] == 4 and d['positive'] == 3 and d['mean'] == pytest.approx(2.0)
    assert d['sd'] == pytest.approx(math.sqrt(14 / 3))  # deviations 0, 2, -3, 1
    assert d['se'] == pytest.approx(d['sd'] / 2) and d['t'] == pytest.approx(2.0 / d['se'])
    one = difference_stats([1.5])
    assert one['sd'] is None and one['se'] is None and one['t'] is None
    assert difference_stats([1.0, 1.0])['t'] is None  # no spread: t undefined, not infinite
    with pytest.raises(ValueError, match='at least one matched difference'):
        difference_stats([])
    lines = matched_table({'row A': [(0, 47.94, 50.0, 48.0), (1, 47.94, 46.0, 47.0)]}, '## t', 'intro.', 'row', 'A vs B')
    row = lines[-1].split(' | ')
    assert row[0] == '| row A' and row[2:5] == ['+0.50', '2', '2.12'] and row[-1] == '1 of 2 |'
    assert matched_table({}, '## t', 'intro', 'row', 'v') == []


def test_joint_teacher_accuracy_reads_the_trained_teacher_from_the_checkpoint(tmp_path):
    import timm
    from torch.utils.data import TensorDataset

    import jointrd_timm  # noqa: F401
    from scale_subset import joint_teacher_accuracy, load_joint_teacher
    from jointrd_timm.methods import JointRD, JointRDConfig
    from jointrd_timm.training.checkpoint import save_checkpoint
    torch.manual_seed(0)
    teacher = timm.create_model('resnet20_cifar', num_classes=10)
    model = JointRD(timm.create_model('plain_resnet20_cifar', num_classes=10), teacher,
                    JointRDConfig(teacher_mode='joint'), num_epochs=1, steps_per_epoch=1)
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x, y)['loss'].backward()
    optimizer.step()  # the joint teacher moved (weights and BN statistics)
    assert any(not torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    save_checkpoint(tmp_path / 'last.safetensors', model, epoch=1)
    loaded = load_joint_teacher(tmp_path, 'resnet20_cifar')
    assert not loaded.training
    for key, value in teacher.state_dict().items():  # the trained teacher, not the one it started as
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(40, 3, 32, 32)
    teacher.eval()
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    assert joint_teacher_accuracy(tmp_path, 'resnet20_cifar', TensorDataset(images, labels), batch_size=16) == 100.0
    data = TensorDataset(images, (labels + 1) % 10)
    assert joint_teacher_accuracy(tmp_path, 'resnet20_cifar', data, batch_size=16) == 0.0
    # a checkpoint without a teacher (a run of the twin alone) is refused by name
    save_checkpoint(tmp_path / 'last.safetensors', teacher, epoch=1)
    with pytest.raises(ValueError, match='holds no teacher tensors'):
        joint_teacher_accuracy(tmp_path, 'resnet20_cifar', data)


# -- step cost -----------------------------------------------------------------------------------------------------
def test_step_cost_floors_and_goals_are_read_from_the_rows():
    """The default recipe's floors: the sum of its measured parts and the count; a goal is judged 'no' above its
    limit, 'unmeasured' when the step times scatter, and by the interval of the per-round ratio where recorded."""
    from step_cost import METHODS, tail_share
    from step_cost_pages import GOALS, default_floors, default_memory_floor, goal_rows
    ms = {'plain CE (twin alone)': 1000, 'Hinton KD': 1300, 'fading twin alone': 1040,
          'residual model CE (the teacher alone)': 1060, 'JointRD (all paths)': 1550, 'JointRD (1 sampled path)': 1300,
          'JointRD (all paths, lean memory off)': 1600, 'JointRD + fade (default recipe)': 1700,
          'JointRD + fade, lean memory off': 1650, 'JointRD + fade, joint teacher': 2000}
    assert set(ms) == set(METHODS)
    rows = {m: dict(step_ms=v, iqr_ms=0.1 * v, peak_mb=100.0 + v / 100) for m, v in ms.items()}
    f = default_floors(rows)
    assert f['measured'] == pytest.approx(1700 / 1300)
    assert f['parts'] == pytest.approx((1040 + 550) / 1300)
    assert f['count'] == pytest.approx((1040 + 600) / 1300)
    assert default_floors(rows, 1.5)['count'] == pytest.approx((1040 + 900) / 1300)  # four stages: longer tails
    memory = default_memory_floor(rows)
    assert memory['measured'] == pytest.approx(117 / 113)
    assert memory['parts'] == pytest.approx((110.4 + 115.5 - 110) / 113)
    assert tail_share('resnet20_cifar', 32) == pytest.approx(1.0, abs=0.05)  # 3 stages of equal cost: one forward
    goals = {g['goal']: g for g in goal_rows(rows)}
    assert len(goals) == len(GOALS)
    assert goals['default recipe step']['met'] == '**no**'  # 1.31x against 1.25x
    assert goals['one sampled path step']['met'] == 'yes'  # 1.00x
    rows['Hinton KD']['iqr_ms'] = 500  # the reference scatters: no verdict on the time goals that divide by it
    assert goal_rows(rows)[0]['met'].startswith('unmeasured')
    load = [1.0, 1.4, 0.8, 1.1, 1.0, 2.0]  # a load that scatters both medians, not the per-round ratio
    for m in rows:
        rows[m]['times_ms'] = [ms[m] * f for f in load]
    rows['JointRD + fade (default recipe)']['times_ms'] = [1.2 * 1300 * f for f in load]
    goal = goal_rows(rows)[0]
    assert goal['ratio'] == pytest.approx(1.2) and goal['met'] == 'yes'
    assert goal['ratio_iqr'] == pytest.approx(0.0, abs=1e-9) and goal['interval'] == pytest.approx((1.2, 1.2))
    fade = 'fading twin alone'
    rows[fade]['times_ms'] = [1000 * f * r for f, r in zip(load, [1.0, 1.6, 0.7, 1.0, 1.5, 0.6])]
    assert {g['goal']: g for g in goal_rows(rows)}['fading twin alone step']['met'].startswith('unmeasured')
    rows[fade]['times_ms'] = [1000 * f * r for f, r in zip(load, [1.02, 1.08, 1.04, 1.07, 1.03, 1.06])]
    g = {g['goal']: g for g in goal_rows(rows)}['fading twin alone step']
    assert g['interval'][0] < 1.05 < g['interval'][1] and g['met'].startswith('undecided')
    rows[fade]['times_ms'] = [1000 * f * r for f, r in zip(load, [1.08, 1.09, 1.1, 1.07, 1.08, 1.09])]
    assert {g['goal']: g for g in goal_rows(rows)}['fading twin alone step']['met'] == '**no**'


def test_methods_page_judges_goals_on_its_own_rounds_and_links_the_longer_reads():
    from step_cost import METHODS
    from step_cost_pages import RATIO_PAGES, glance_lines, goal_rows
    rows = {m: dict(step_ms=1000.0, iqr_ms=10.0, peak_mb=100.0, times_ms=[1000.0 * f for f in (1.0, 1.1, 0.9, 1.05)])
            for m in METHODS}
    rows['fading twin alone']['times_ms'] = [1000 * f for f in (1.02, 1.1, 0.95, 1.01)]  # 0.95-1.1x: undecided
    archs = dict(resnet56_cifar=dict(rows=rows, goals=goal_rows(rows)))
    lines = glance_lines(archs)
    glance = next(line for line in lines if line.startswith('- resnet56_cifar'))
    assert 'undecided (the interval of the ratio contains the limit): fading twin alone step (' in glance
    links = [line for line in lines if '](' in line]
    assert len(links) == 1 and all(f'[{p}.md]({p}.md)' in links[0] for p in RATIO_PAGES['fading twin alone step'])
    assert 'training_cost_ratios_recipe' not in links[0]  # a goal decided here is not sent elsewhere


def test_ratios_are_read_round_by_round_with_a_bootstrap_interval(monkeypatch):
    import step_cost
    from jointrd_timm.deploy.latency import bootstrap_median_interval
    from step_cost_pages import interval_verdict, pair_rows, ratios_page
    assert bootstrap_median_interval([2.0] * 5) == (2.0, 2.0)
    values = [1.0, 1.1, 0.9, 1.3, 0.7, 1.05, 0.95, 1.2]
    low, high = bootstrap_median_interval(values)
    assert low < statistics.median(values) < high and (low, high) == bootstrap_median_interval(values)  # seeded
    wide = bootstrap_median_interval(values[:4])
    assert wide[1] - wide[0] >= high - low  # fewer rounds: no narrower
    assert interval_verdict(1.01, 1.04, 1.05) == 'yes' and interval_verdict(1.06, 1.1, 1.05) == '**no**'
    assert interval_verdict(1.03, 1.07, 1.05).startswith('undecided')
    load = [1.0, 2.0, 0.7, 1.4, 1.0, 0.8, 1.9, 1.1]  # scatters every median by 2x; a fixed 1.03x ratio: met at 1.05x
    times = {'plain CE (twin alone)': [1000 * f for f in load], 'fading twin alone': [1030 * f for f in load],
             'residual model CE (the teacher alone)': [1080 * f for f in load]}
    rows = {(r['method'], r['reference']): r for r in pair_rows(times)}
    fade = rows[('fading twin alone', 'plain CE (twin alone)')]
    assert len(rows) == 3 and fade['median'] == pytest.approx(1.03) and fade['low'] == pytest.approx(1.03)
    assert fade['limit'] == 1.05 and fade['verdict'] == 'yes'
    assert rows[('residual model CE (the teacher alone)', 'plain CE (twin alone)')]['limit'] is None  # not a goal
    monkeypatch.setattr(step_cost, 'make_step', lambda *a: None)
    import jointrd_timm.deploy.latency as latency
    monkeypatch.setattr(latency, 'compare_latency', lambda steps, **k: {m: dict(times_ms=times[m]) for m in steps})
    args = argparse.Namespace(batch=8, size=32, repeats=8, clock='cpu', methods=list(times))
    result = step_cost.measure_ratios('resnet20_cifar', args)
    ops = result['fade_ops']  # timed for real: the 9 faded shortcuts of resnet20_cifar, at batch 8
    assert result['times_ms'] == times and ops['shortcuts'] == 9 and ops['fade_ops_ms'] > 0
    assert ops['extra_ms'] == pytest.approx(ops['fade_ops_ms'] - ops['residual_ops_ms'])
    assert ops['of_plain_step'] == pytest.approx(ops['extra_ms'] / 1050)  # the plain twin's median step: 1050 ms
    meta = dict(machine='m', load_before=(1, 1, 1), load_after=(1, 1, 1), minutes=1.0)
    lines, _ = ratios_page(dict(meta=meta, archs={'resnet20_cifar': result}), dict(batch=8, size=32, repeats=8,
                                                                                    clock='cpu'))
    cells = {r[0]: r for r in _table('\n'.join(lines), '| ratio | median |')}
    assert cells['fading twin alone / plain CE (twin alone)'][1:] == ['1.030x', '0.000', '1.030x - 1.030x', '8',
                                                                      '<= 1.05x', 'yes']
    assert _table('\n'.join(lines), '| pair | faded shortcuts |')[0][:2] == ['resnet20_cifar', '9']


@pytest.mark.parametrize('question,name,change,warmup', [
    ('channels_last', 'channels_last', dict(channels_last=True), 1),
    ('compile', 'compiled', dict(compile_backend='inductor'), 3)])
def test_runner_option_is_read_round_by_round_against_the_default(question, name, change, warmup, monkeypatch):
    """A load that changes from round to round scatters both ways' medians, not their per-round ratio; the option's
    steps are built with its change, and compilation happens in untimed warm-up rounds."""
    import step_cost
    from step_cost_pages import OPTION_METHODS, option_page
    import jointrd_timm.deploy.latency as latency
    load, built, seen = [1.0, 2.5, 1.0, 0.6, 1.8, 1.0], [], {}

    def fake_compare(steps, **kwargs):
        seen.update(kwargs)
        return {s: dict(median_ms=sorted(t)[3], iqr_ms=1000.0, times_ms=t) for s in steps
                for t in [[1000.0 * f * (0.9 if s.endswith(name) else 1.0) for f in load]]}
    monkeypatch.setattr(step_cost, 'make_step', lambda *a, **kw: built.append(kw))
    monkeypatch.setattr(latency, 'compare_latency', fake_compare)
    args = argparse.Namespace(batch=8, size=32, repeats=6, clock='cpu', question=question)
    rows = step_cost.measure_option('resnet20_cifar', args)
    assert set(rows) == set(OPTION_METHODS) and built.count(change) == len(OPTION_METHODS) and seen['warmup'] == warmup
    meta = dict(machine='m', load_before=(1, 1, 1), load_after=(1, 1, 1), minutes=1.0)
    lines, _ = option_page(question, dict(meta=meta, archs={'resnet20_cifar': rows}), vars(args))
    for r in rows.values():
        assert r['ratio'] == pytest.approx(0.9) and r['ratio_iqr'] == pytest.approx(0.0, abs=1e-12) and not r['noisy']
    header = next(line for line in lines if line.startswith('| method |')).strip('|').split(' | ')
    assert header[1].strip().endswith('ms (IQR)') and header[3].strip() == f'{name} / {step_cost.pages.OPTIONS[question][0]}'
    assert all(r[3] == '0.90x (IQR 0.00; 95% interval 0.90-0.90x)' for r in _table('\n'.join(lines), '| method |'))


def test_step_cost_writes_its_record_after_each_pair(tmp_path):
    import step_cost
    seen = []

    def measure(arch, args):
        seen.append(arch)
        return dict(step_ms=len(seen))
    written = []
    args = argparse.Namespace(arch=['a', 'b'], threads=1, clock='cpu', name='probe', question='ratios', batch=8,
                              size=32, repeats=3, methods=['x', 'y'])
    step_cost.measure_each_arch(args, measure, lambda name, record, out: written.append(json.loads(json.dumps(record))),
                                tmp_path)
    assert [list(r['archs']) for r in written] == [['a'], ['a', 'b']] and seen == ['a', 'b']
    meta = written[-1]['meta']
    assert meta['settings'] == dict(batch=8, size=32, repeats=3, clock='cpu', methods=['x', 'y'])
    assert meta['question'] == 'ratios' and '1 threads' in meta['machine']


def test_step_cost_main_writes_a_page_that_regenerates_from_its_record(tmp_path, monkeypatch):
    import step_cost
    load = [1.0, 1.3, 0.9, 1.1]

    def fake_methods(arch, args):
        rows = {m: dict(step_ms=1000.0 + 10 * i, iqr_ms=5.0, times_ms=[(1000.0 + 10 * i) * f for f in load],
                        peak_mb=100.0 + i, memory_vs_kd=(100.0 + i) / 101.0) for i, m in enumerate(step_cost.METHODS)}
        return dict(rows=rows, tail_share=1.0)
    monkeypatch.setattr(step_cost, 'RESULTS', tmp_path)
    monkeypatch.setitem(step_cost.MEASURE, 'methods', fake_methods)
    monkeypatch.setattr(sys, 'argv', [step_cost.__file__, '--threads', '1'])
    step_cost.main(['--arch', 'resnet20_cifar', '--repeats', '4', '--threads', '1', '--clock', 'cpu'])
    page = (tmp_path / 'training_cost.md').read_text()
    record = json.loads((tmp_path / 'training_cost.json').read_text())
    assert record['meta']['command'] == 'python benchmarks/step_cost.py --threads 1' and record['meta']['question'] == \
        'methods' and record['meta']['settings']['repeats'] == 4
    kd = {r[0]: r for r in _table(page, '| method | step ms')}['Hinton KD']
    assert kd[1:4] == ['1010', '5', '1.00x']  # the second method: 1010 ms, itself over KD
    step_cost.main(['--report-only'])
    assert (tmp_path / 'training_cost.md').read_text() == page


@pytest.mark.parametrize('argv,message', [
    (['--question', 'ratios', '--methods', 'Hinton KD'], r'at least two methods \(got 1\)'),
    (['--question', 'ratios', '--repeats', '3'], r'four rounds \(--repeats, got 3\)'),
    (['--report-only', '--name', 'no_such_record'], 'no record .*no_such_record.json'),
])
def test_step_cost_refuses_bad_command_lines_before_measuring(argv, message, monkeypatch, capsys):
    import re

    import step_cost
    monkeypatch.setattr(step_cost, 'measure_each_arch', lambda *a, **k: pytest.fail('measured'))
    with pytest.raises(SystemExit):
        step_cost.main(argv)
    assert re.search(message, capsys.readouterr().err)


# -- the published-twin pages (accuracy.py full, publish_cifar10.py, alternatives.py, deep_twin_report.py) -----------
def test_full_cifar10_page_answers_the_three_questions_from_the_runs():
    from scale_full import answer_lines
    runs = [dict(row='teacher', epochs=32, test_acc=90.0),
            dict(row='twin + JointRD', epochs=8, test_acc=88.5, test_acc_as_trained=88.0),
            dict(row='twin alone', epochs=8, test_acc=89.0), dict(row='control', epochs=8, test_acc=91.0),
            dict(row='twin + JointRD', epochs=16), dict(row='twin alone', epochs=16, test_acc=89.5),
            dict(row='control', epochs=16)]
    lines = answer_lines(runs, 90.0)
    eight = next(line for line in lines if line.startswith('- 8 epochs'))
    for number in ('88.50', '-1.50', '89.00', '-1.00', '-0.50', '91.00', '-2.00'):
        assert number in eight
    sixteen = next(line for line in lines if line.startswith('- 16 epochs'))
    assert '89.50' in sixteen and '-0.50' in sixteen and 'twin + JointRD' in sixteen and 'control' in sixteen
    assert any('88.00 -> 88.50' in line for line in lines)
    assert answer_lines(runs, None) == []  # nothing to say before the teacher has finished
    # the residual net on the twin's schedule: its own part, never counted as a twin
    runs.append(dict(row='control, on lr02', epochs=8, test_acc=89.25))
    eight = next(line for line in answer_lines(runs, 90.0) if line.startswith('- 8 epochs'))
    assert "on the twins' schedule lr02 (their learning rate) the residual net reaches 89.25 % (-0.75 against the " \
           'teacher): the best twin is -0.25 points from it' in eight
    assert 'the best twin is -2.00 points from it' in eight and 'control, on lr02 89.25' not in eight


def test_full_cifar10_variants_and_step_wise_row():
    """--variant NAME=FIELD:VALUE gives the twins of a changed recipe rows of their own; every twin length gets a
    step-wise removal row whose interval leaves one interval of training after the last removal."""
    import scale_full
    assert scale_full.parse_variant('share=shortcut_fade_mode:share,shortcut_fade:0.5') == (
        'share', dict(shortcut_fade_mode='share', shortcut_fade=0.5))
    assert scale_full.parse_variant('d0=dirac:true,dirac_init:[0, 1],lr_scale:0.2') == (  # a list keeps its comma
        'd0', dict(dirac=True, dirac_init=[0, 1], lr_scale=0.2))
    for bad in ('share', 'share=shortcut_fade_mode', '=a:1'):
        with pytest.raises(SystemExit, match='--variant'):
            scale_full.parse_variant(bad)
    import cifar_budget
    args = scale_full.parser().parse_args(['--arch', 'resnet20_cifar', '--teacher-epochs', '8', '--fractions',
                                             '0.5', '--variant', 'share=shortcut_fade_mode:share'])
    recipe, specs = scale_full.run_specs(args, Path('/nonexistent'))
    rows = {label: (folder.name, *cifar_budget.row_config(row, args.arch, 'T', cifar_budget.budget_schedule(args, epochs))
                    [:2], row.recipe and row.recipe.id) for label, epochs, folder, row in specs}
    assert list(rows) == ['teacher', 'twin + JointRD', 'twin alone', 'control', 'control, on lr02',
                          'step-wise removal', 'twin + JointRD, share', 'twin alone, share']
    folder, model, method, _ = rows['step-wise removal']
    assert (folder, method, model['key']) == ('stepwise-e4', 'stepwise', 'stepwise_model')
    assert model['kwargs']['interval'] == pytest.approx(4 / (9 + 1))  # resnet20: 9 shortcuts
    folder, model, method, recipe_id = rows['twin + JointRD, share']
    assert folder == 'twin-jointrd-e4-share' and recipe_id.endswith('shortcut_fade_mode=share')
    assert model['kwargs']['jointrd']['shortcut_fade_mode'] == 'share'
    assert rows['twin alone, share'][1]['kwargs']['shortcut_fade_mode'] == 'share'
    assert rows['control'][3] is None and rows['teacher'][3] is None
    assert recipe_id.startswith(recipe.id)


def test_publish_full_takes_every_number_from_the_record(tmp_path, monkeypatch):
    import timm

    import publish_cifar10
    from jointrd_timm.integrations.hub import save_trained_model
    monkeypatch.setattr(publish_cifar10, 'ROOT', tmp_path)
    # the twin published is the best on the held-out validation split (twin alone), not on test (JointRD)
    runs = [dict(row='teacher', epochs=32, folder='teacher', test_acc=87.17, val_acc=88.0),
            dict(row='twin + JointRD', epochs=4, folder='twin-jointrd-e4', test_acc=85.9, val_acc=84.0),
            dict(row='twin alone', epochs=4, folder='twin-alone-e4', test_acc=85.6, val_acc=85.0),
            dict(row='control', epochs=4, folder='control-e4', test_acc=87.5, val_acc=87.0),
            dict(row='twin + JointRD', epochs=8, folder='twin-jointrd-e8')]  # not finished: never published
    meta = dict(arch='resnet20_cifar', recipe='default', teacher_epochs=32, data='CIFAR-10', budget='batch 128')
    (tmp_path / 'benchmarks/results').mkdir(parents=True)
    (tmp_path / 'benchmarks/results/full_cifar10_resnet20_cifar.json').write_text(json.dumps(dict(meta=meta, runs=runs)))
    work = tmp_path / 'benchmarks/runs/full_cifar10/resnet20_cifar'
    save_trained_model(timm.create_model('resnet20_cifar', num_classes=10), work / 'teacher' / 'model')
    # the chosen run's weights missing (run weights are not committed): refused, naming how to recreate them
    with pytest.raises(SystemExit, match=r'weights of the run to publish \(benchmarks/runs/full_cifar10/resnet20_cifar/'
                                         r'twin-alone-e4\) are not in this checkout.*nothing was published.*`python '
                                         r'benchmarks/accuracy.py full --arch resnet20_cifar --teacher-epochs 32 '
                                         r'--fractions 0.125 --only twin-alone-e4`'):
        publish_cifar10.publish_full('resnet20_cifar')
    assert not (tmp_path / 'registry').exists()  # not even the teacher
    save_trained_model(timm.create_model('plain_resnet20_cifar', num_classes=10), work / 'twin-alone-e4' / 'model')
    (work / 'teacher' / 'model' / 'model.safetensors').rename(work / 'teacher.safetensors')
    with pytest.raises(SystemExit, match=r'\(benchmarks/runs/full_cifar10/resnet20_cifar/teacher\) are not in this '
                                         r'checkout.*`python benchmarks/accuracy.py full --arch resnet20_cifar '
                                         r'--teacher-epochs 32 --rows teacher`'):
        publish_cifar10.publish_full('resnet20_cifar')
    (work / 'teacher.safetensors').rename(work / 'teacher' / 'model' / 'model.safetensors')
    publish_cifar10.publish_full('resnet20_cifar')
    twin = json.loads((tmp_path / 'registry/plain_resnet20_cifar.fade_full_cifar10.json').read_text())
    assert twin['metrics']['top1_test'] == 85.6 and twin['metrics']['teacher_top1_test'] == 87.17
    assert twin['metrics']['control_top1_test'] == 87.5 and twin['metrics']['gap_to_teacher'] == 1.57
    assert twin['teacher'] == 'resnet20_cifar.ce_full_cifar10' and '`control_top1_test`' in twin['description']
    card = (tmp_path / 'registry' / twin['weights'] / 'README.md').read_text()
    assert '| top1_test | 85.6 |' in card and '| control_top1_test | 87.5 |' in card
    teacher = json.loads((tmp_path / 'registry/resnet20_cifar.ce_full_cifar10.json').read_text())
    assert teacher['metrics']['top1_test'] == 87.17
    # each card names the command that trains its own model
    assert teacher['training']['command'] == ('python benchmarks/accuracy.py full --arch resnet20_cifar '
                                              '--teacher-epochs 32 --rows teacher')
    assert twin['training']['command'].endswith('--fractions 0.125 --only twin-alone-e4')


def test_publish_full_from_a_record_of_another_name(tmp_path, monkeypatch):
    """--name: the teacher and twin of another record (e.g. a longer-trained teacher) replace the entries of the same
    tags, their cards naming that record and the command that trains into it."""
    import timm

    import publish_cifar10
    from jointrd_timm.integrations.hub import save_trained_model
    monkeypatch.setattr(publish_cifar10, 'ROOT', tmp_path)
    with pytest.raises(SystemExit, match=r'no record benchmarks/results/full_cifar10_t32_resnet20_cifar.json: run '
                                         r'`python benchmarks/accuracy.py full --arch resnet20_cifar --name '
                                         r'full_cifar10_t32 --work-dir benchmarks/runs/full_cifar10_t32` first'):
        publish_cifar10.publish_full('resnet20_cifar', 'full_cifar10_t32')
    runs = [dict(row='teacher', epochs=32, folder='teacher', test_acc=88.0, val_acc=90.0),
            dict(row='twin + JointRD', epochs=16, folder='twin-jointrd-e16', test_acc=87.5, val_acc=89.0)]
    meta = dict(arch='resnet20_cifar', recipe='kd-low-lr-blocks', teacher_epochs=32, data='CIFAR-10', budget='batch 128')
    source = 'benchmarks/results/full_cifar10_t32_resnet20_cifar.json'
    (tmp_path / 'benchmarks/results').mkdir(parents=True)
    (tmp_path / source).write_text(json.dumps(dict(meta=meta, runs=runs)))
    work = tmp_path / 'benchmarks/runs/full_cifar10_t32/resnet20_cifar'
    save_trained_model(timm.create_model('resnet20_cifar', num_classes=10), work / 'teacher' / 'model')
    save_trained_model(timm.create_model('plain_resnet20_cifar', num_classes=10), work / 'twin-jointrd-e16' / 'model')
    publish_cifar10.publish_full('resnet20_cifar', 'full_cifar10_t32')
    twin = json.loads((tmp_path / 'registry/plain_resnet20_cifar.jointrd_full_cifar10.json').read_text())
    assert twin['metrics']['top1_test'] == 87.5 and twin['metrics']['gap_to_teacher'] == 0.5
    assert twin['metrics']['source'] == source and twin['training']['source'] == source
    assert '`kd-low-lr-blocks`' in twin['method']
    # no control in this record: the card neither lists nor describes one
    assert 'control_top1_test' not in twin['metrics'] and 'control' not in twin['description']
    base = 'python benchmarks/accuracy.py full --arch resnet20_cifar --teacher-epochs 32 --name full_cifar10_t32 ' \
           '--work-dir benchmarks/runs/full_cifar10_t32'
    assert twin['training']['command'] == base + ' --fractions 0.5 --only twin-jointrd-e16'
    teacher = json.loads((tmp_path / 'registry/resnet20_cifar.ce_full_cifar10.json').read_text())
    assert teacher['metrics']['top1_test'] == 88.0 and teacher['training']['command'] == base + ' --rows teacher'


def test_full_cifar10_deployment_numbers_come_from_the_deployment_record():
    from scale_full import deployment_lines
    bench = dict(meta=dict(machine='x86_64', threads=2), results=[dict(teacher='resnet56_cifar', input_size=32,
                                                                       batches={
        '16': {'speedup/eager': 1.09, 'speedup/onnxruntime': 0.99, 'memory_ratio_analysed': 1.5},
        '1': {'speedup/eager': 0.92, 'speedup/onnxruntime': 0.985, 'memory_ratio_analysed': 1.5}})])
    text = '\n'.join(deployment_lines('resnet56_cifar', bench))
    for number in ('0.92x', '0.98x', '1.50x', '1.09x', '32 px images'):  # the size the bench measured at
        assert number in text
    missing = deployment_lines('resnet20_cifar', bench) + deployment_lines('resnet20_cifar', None)
    assert not any('0.92x' in line for line in missing) and any('`jointrd bench resnet20_cifar`' in line
                                                                for line in missing)


def test_deep_twin_leaning_reads_the_shortcut_against_the_branch_over_s():
    """1 when the sizes follow s exactly, above 1 when the shortcut stays larger than s gives; s is the window's
    mean (its two ends), and windows at s ~ 0 are left out."""
    from deep_twin_report import leaning
    log = []
    for step, s, ratio in ((25, 0.8, 0.9), (50, 0.4, 0.6), (75, 0.0, 0.0)):
        log.append(dict(step=step, s=s, blocks={'b': dict(branch_rms=2.0, shortcut_rms=2.0 * ratio)}))
    out = leaning(dict(log=log))
    assert [(step, round(s, 3)) for step, s, _ in out] == [(25, 0.9), (50, 0.6), (75, 0.2)]
    assert out[0][2] == pytest.approx(1.0) and out[1][2] == pytest.approx(1.0) and out[2][2] == pytest.approx(0.0)


def test_alternatives_verdicts_follow_the_numbers():
    from alternatives import verdicts
    rows = [('teacher (residual)', 'residual', 87.0), ('our recipe twin', 'twin', 85.0),
            ('twin alone', 'twin', 83.0), ('step-wise removal (Tailor)', 'twin', None),
            ('exact conversion (RM)', 'exact', 87.0), ('residual control', 'residual', 86.5)]
    mib = 2 ** 20
    dep = dict(batches={'16': dict(memory_analysed_bytes=dict(residual=3 * mib, twin=2 * mib, exact=4 * mib)),
                        '1': {'residual/onnxruntime': 1.0, 'twin/onnxruntime': 0.9, 'exact/onnxruntime': 1.5}})
    text = '\n'.join(verdicts(rows, dep))
    for number in ('2.00', '0.67x', '0.50x', '1.33x', '42.5', '21.8'):
        assert number in text
    assert text.index('our recipe twin') < text.index('21.8')  # the best twin is named before the others' figures


def test_conversion_first_steps_log_ce_kd_and_stand_still_at_lr_zero(tmp_path, monkeypatch):
    """The first-steps probe of conversion_lr.py on the committed depth-20 teacher and made-up batches: at step 1 the
    twin is its teacher (KD between them is what their train- and eval-mode BN make of one batch, and the logged CE
    is the twin's own); at lr 0 nothing moves, so the same batch gives the same numbers at every step; at a large lr
    with KD the twin leaves its teacher."""
    import conversion_lr
    from jointrd_timm.integrations.torchdistill import jointrd_model
    from jointrd_timm.methods.base import hinton_kd
    from jointrd_timm.recipes import DEFAULT_RECIPE
    torch.manual_seed(0)
    batch = (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    still = conversion_lr.first_steps('resnet20_cifar', 0.0, 1.0, [batch] * 3, steps_per_epoch=50)
    assert all(len(v) == 3 for v in still.values())
    for name in ('ce', 'kd', 'acc'):
        assert still[name][0] == pytest.approx(still[name][2], rel=1e-5), name
    teacher_ckpt = conversion_lr.ROOT / 'benchmarks/runs/full_cifar10/resnet20_cifar/teacher/model'
    model = jointrd_model(**DEFAULT_RECIPE.jointrd_model('resnet20_cifar', str(teacher_ckpt), num_classes=10)['kwargs'])
    model.train()
    with torch.no_grad():
        logits = model.student(batch[0])
        expected_kd = float(hinton_kd(logits, model.teacher(batch[0]), 4.0))
        expected_ce = float(torch.nn.functional.cross_entropy(logits, batch[1]))
    assert still['kd'][0] == pytest.approx(expected_kd, rel=1e-4)
    assert still['ce'][0] == pytest.approx(expected_ce, rel=1e-4)
    assert all(g > 0 for g in still['grad_norm'])
    moving = conversion_lr.first_steps('resnet20_cifar', 0.5, 1.0, [batch] * 3, steps_per_epoch=50)
    assert moving['ce'][0] == pytest.approx(still['ce'][0], rel=1e-5)
    assert abs(moving['ce'][2] - still['ce'][2]) > 1e-3 and abs(moving['kd'][2] - still['kd'][2]) > 1e-3


def test_accuracy_script_runs_each_scale_and_refuses_anything_else(capsys):
    import accuracy
    for scale in accuracy.SCALES:  # each scale's own parser, under the one script's name
        with pytest.raises(SystemExit) as stop:
            accuracy.main([scale, '--help'])
        assert stop.value.code == 0
        assert f'usage: accuracy.py {scale}' in capsys.readouterr().out
    for argv in ([], ['fulll', '--arch', 'resnet20_cifar'], ['--arch', 'resnet20_cifar']):
        with pytest.raises(SystemExit, match='give the scale first'):
            accuracy.main(argv)
