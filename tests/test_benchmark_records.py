"""A benchmark results record stays at one pair and budget: runs made at other settings are refused, and a report
rewrite describes the recorded runs whatever the command line says (benchmarks/cifar_budget.py)."""
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from cifar_budget import budget_parser, budget_settings, check_record, recorded_settings  # noqa: E402

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


def test_matched_differences_report_standard_error_and_t():
    import math

    from recipe_ablation import difference_stats, matched_table
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
    from jointrd_timm.methods import JointRD, JointRDConfig
    from jointrd_timm.training.checkpoint import save_checkpoint
    from recipe_ablation import joint_teacher_accuracy, load_joint_teacher
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


def test_results_summary_page_is_generated_from_the_records():
    """benchmarks/results/README.md holds only numbers read from the records: it is what summary.py writes now."""
    import summary
    committed = (summary.RESULTS / 'README.md').read_text()
    assert committed == summary.render(), 'stale: run python benchmarks/summary.py'
    record = summary._load('recipe_ablation')
    assert f'{record["table"][summary.DEFAULT_ROW]["mean"]:.2f} %' in committed


def test_full_cifar10_page_answers_the_three_questions_from_the_runs():
    from full_cifar10 import answer_lines
    runs = [dict(row='teacher', epochs=32, test_acc=90.0),
            dict(row='twin + JointRD', epochs=8, test_acc=88.5, test_acc_as_trained=88.0),
            dict(row='twin alone', epochs=8, test_acc=89.0), dict(row='control', epochs=8, test_acc=91.0),
            dict(row='twin + JointRD', epochs=16), dict(row='twin alone', epochs=16, test_acc=89.5),
            dict(row='control', epochs=16)]
    text = '\n'.join(answer_lines(runs, 90.0))
    assert ('- 8 epochs: twin + JointRD 88.50 % (-1.50 against the teacher); twin alone 89.00 % (-1.00 against the '
            'teacher); JointRD adds -0.50 points over the twin alone; the residual net given the same 8 epochs '
            '(control) reaches 91.00 %: the best twin is -2.00 points from it.') in text
    assert '- 16 epochs: twin alone 89.50 % (-0.50 against the teacher) (not finished: twin + JointRD, control).' in text
    assert 'twin + JointRD 8 ep: 88.00 -> 88.50 %' in text
    assert answer_lines(runs, None) == []  # nothing to say before the teacher has finished


def test_publish_full_takes_every_number_from_the_record(tmp_path, monkeypatch):
    import json
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
    save_trained_model(timm.create_model('plain_resnet20_cifar', num_classes=10), work / 'twin-alone-e4' / 'model')
    publish_cifar10.publish_full('resnet20_cifar')
    twin = json.loads((tmp_path / 'registry/plain_resnet20_cifar.fade_full_cifar10.json').read_text())
    assert twin['metrics']['top1_test'] == 85.6 and twin['metrics']['teacher_top1_test'] == 87.17
    assert twin['metrics']['control_top1_test'] == 87.5 and twin['metrics']['gap_to_teacher'] == 1.57
    assert twin['teacher'] == 'resnet20_cifar.ce_full_cifar10' and 'teacher 32 epochs, then the twin 4 epochs' in \
        twin['training']['budget']
    card = (tmp_path / 'registry' / twin['weights'] / 'README.md').read_text()
    assert '| top1_test | 85.6 |' in card and '| control_top1_test | 87.5 |' in card
    teacher = json.loads((tmp_path / 'registry/resnet20_cifar.ce_full_cifar10.json').read_text())
    assert teacher['metrics']['top1_test'] == 87.17


def test_full_cifar10_page_says_what_the_twin_buys_from_the_deployment_record():
    from full_cifar10 import deployment_lines
    bench = dict(meta=dict(machine='x86_64', threads=2), results=[dict(teacher='resnet56_cifar', batches={
        '16': {'speedup/eager': 1.09, 'speedup/onnxruntime': 0.99, 'memory_ratio_analysed': 1.5},
        '1': {'speedup/eager': 0.92, 'speedup/onnxruntime': 0.985, 'memory_ratio_analysed': 1.5}})])
    text = '\n'.join(deployment_lines('resnet56_cifar', bench))
    assert ('batch 1: eager latency 0.92x, ONNX Runtime 0.98x, activation memory (analysed) 1.50x; batch 16: eager '
            'latency 1.09x') in text
    missing = '\n'.join(deployment_lines('resnet20_cifar', bench)) + '\n'.join(deployment_lines('resnet20_cifar', None))
    assert missing.count('resnet20_cifar is not in the deployment benchmark') == 2
    assert '`jointrd bench resnet20_cifar`' in missing


def test_training_cost_floors_and_goals_are_read_from_the_rows():
    """The default recipe's floors: the sum of its measured parts (fading twin + the tails JointRD adds to plain CE)
    and the count (fading twin + two teacher-forward units, a unit being what KD adds to plain CE); a goal is judged
    'no' above its limit and 'unmeasured' when the step times scatter."""
    from training_cost import GOALS, METHODS, default_floors, default_memory_floor, goal_rows, tail_share
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
    memory = default_memory_floor(rows)  # peaks 100 + ms / 100: the fading twin's plus what the tails add
    assert memory['measured'] == pytest.approx(117 / 113)
    assert memory['parts'] == pytest.approx((110.4 + 115.5 - 110) / 113)
    assert tail_share('resnet20_cifar', 32) == pytest.approx(1.0, abs=0.05)  # 3 stages of equal cost: one forward
    goals = {g['goal']: g for g in goal_rows(rows)}
    assert len(goals) == len(GOALS)
    assert goals['default recipe step']['met'] == '**no**'  # 1.31x against 1.25x
    assert goals['one sampled path step']['met'] == 'yes'  # 1.00x
    rows['Hinton KD']['iqr_ms'] = 500  # the reference scatters: no verdict on the time goals that divide by it
    assert goal_rows(rows)[0]['met'].startswith('unmeasured')
    # with the steps recorded, a time goal reads the rounds: the default recipe is 1.2x KD in every round, whatever
    # the load of the round (which scatters both medians), so the goal is met
    load = [1.0, 1.4, 0.8, 1.1, 1.0, 2.0]
    for m in rows:
        rows[m]['times_ms'] = [ms[m] * f for f in load]
    rows['JointRD + fade (default recipe)']['times_ms'] = [1.2 * 1300 * f for f in load]
    goals = {g['goal']: g for g in goal_rows(rows)}
    assert goals['default recipe step']['ratio'] == pytest.approx(1.2) and goals['default recipe step']['met'] == 'yes'
    assert goals['default recipe step']['ratio_iqr'] == pytest.approx(0.0, abs=1e-9)
    assert goals['default recipe step']['interval'] == pytest.approx((1.2, 1.2))
    rows['fading twin alone']['times_ms'] = [1000 * f * r for f, r in zip(load, [1.0, 1.6, 0.7, 1.0, 1.5, 0.6])]
    assert {g['goal']: g for g in goal_rows(rows)}['fading twin alone step']['met'].startswith('unmeasured')
    # per-round ratios that scatter a little around the limit: neither met nor missed
    rows['fading twin alone']['times_ms'] = [1000 * f * r for f, r in zip(load, [1.02, 1.08, 1.04, 1.07, 1.03, 1.06])]
    fade = {g['goal']: g for g in goal_rows(rows)}['fading twin alone step']
    assert fade['interval'][0] < 1.05 < fade['interval'][1] and fade['met'].startswith('undecided')
    rows['fading twin alone']['times_ms'] = [1000 * f * r for f, r in zip(load, [1.08, 1.09, 1.1, 1.07, 1.08, 1.09])]
    assert {g['goal']: g for g in goal_rows(rows)}['fading twin alone step']['met'] == '**no**'


def test_training_cost_goals_take_the_verdict_of_the_run_with_most_rounds(tmp_path):
    """A time goal training_cost leaves undecided is judged by the step_ratios record that read the same pair with the
    most rounds, at the same batch and image size only; a goal decided on the page keeps its own verdict."""
    import json
    from training_cost import METHODS, goal_rows, more_rounds, verdict_lines

    def record(name, batch, pairs):
        command = f"python benchmarks/step_ratios.py --arch resnet56_cifar --repeats 9 --batch {batch} --name {name}"
        (tmp_path / f'{name}.json').write_text(json.dumps(dict(
            meta=dict(command=command), archs=dict(resnet56_cifar=dict(pairs=pairs)))))

    def pair(method, reference, median, low, high, rounds, verdict):
        return dict(method=method, reference=reference, median=median, low=low, high=high, rounds=rounds,
                    verdict=verdict, iqr=0.01, limit=1.05)
    fade, plain, kd = 'fading twin alone', 'plain CE (twin alone)', 'Hinton KD'
    record('training_cost_ratios', 128, [pair(fade, plain, 1.04, 1.02, 1.049, 50, 'yes')])
    record('training_cost_ratios_short', 128, [pair(fade, plain, 1.09, 1.06, 1.1, 20, '**no**'),
                                                pair('JointRD (1 sampled path)', kd, 1.1, 1.07, 1.12, 20, '**no**')])
    record('training_cost_ratios_big', 256, [pair(fade, plain, 0.9, 0.8, 0.95, 90, 'yes'),
                                             pair('JointRD + fade (default recipe)', kd, 2, 1.9, 2.1, 90, '**no**')])
    record('other_page', 128, [pair('JointRD + fade (default recipe)', kd, 2, 1.9, 2.1, 90, '**no**')])
    longer = more_rounds(tmp_path, 128, 32)
    # the 50-round reading wins over the 20-round one; the batch-256 record and a page of another name are not read
    assert set(longer) == {('resnet56_cifar', 'fading twin alone step'), ('resnet56_cifar', 'one sampled path step')}
    assert longer['resnet56_cifar', 'fading twin alone step']['rounds'] == 50
    assert more_rounds(tmp_path, 128, 64) == {}
    ms = dict.fromkeys(METHODS, 1000.0)
    ms.update({kd: 1300.0, 'JointRD + fade (default recipe)': 1500.0})
    rows = {m: dict(step_ms=v, iqr_ms=0.01 * v, peak_mb=100.0, times_ms=[v * f for f in (1.0, 1.1, 0.9, 1.05)])
            for m, v in ms.items()}
    rows[fade]['times_ms'] = [1000 * f for f in (1.02, 1.1, 0.95, 1.01)]  # 0.95-1.1x: undecided on the page
    assert {g['goal']: g for g in goal_rows(rows)}['fading twin alone step']['met'].startswith('undecided')
    glance = next(line for line in verdict_lines(dict(resnet56_cifar=rows), dict(resnet56_cifar=1.0), longer)
                  if line.startswith('- resnet56_cifar'))
    met, rest = glance.split('; not met: ')
    assert 'fading twin alone step (50 rounds, [training_cost_ratios.md](training_cost_ratios.md))' in met
    # one sampled path is 0.77x KD in every round here, met on the page: the longer run's **no** does not override it
    assert 'one sampled path step,' in met and 'default recipe step' in met
    assert rest == 'none.'  # nothing missed, nothing left undecided
    lines = verdict_lines(dict(resnet56_cifar=rows), dict(resnet56_cifar=1.0), longer)
    table = [line for line in lines if line.startswith('| resnet56_cifar | ')][:2]
    assert table[0].startswith('| resnet56_cifar | one sampled path step | 0.77x (0.77-0.77x), yes | 1.100x')
    assert '| 1.040x (1.020-1.049x) | 50 | yes | [training_cost_ratios.md]' in table[1]


def test_channels_last_page_reads_each_ratio_from_its_row_and_flags_scattered_ones():
    import argparse
    from channels_last_cost import lines_for
    rows = {'Hinton KD': dict(contiguous_ms=1000.0, contiguous_iqr_ms=50.0, channels_last_ms=850.0,
                              channels_last_iqr_ms=40.0, ratio=0.85, noisy=False),
            'plain CE (twin alone)': dict(contiguous_ms=800.0, contiguous_iqr_ms=300.0, channels_last_ms=700.0,
                                          channels_last_iqr_ms=20.0, ratio=0.875, noisy=True)}
    meta = dict(machine='m', load_before=(1, 1, 1), load_after=(1, 1, 1), minutes=1.0)
    lines = lines_for({'resnet20_cifar': rows}, meta, argparse.Namespace(batch=8, size=32, repeats=3, clock='cpu'))
    assert '| Hinton KD | 1000 (50) | 850 (40) | 0.85x |' in lines
    assert '| plain CE (twin alone) | 800 (300) | 700 (20) | unmeasured (IQR > 25 % of the median) |' in lines
    rows['Hinton KD']['ratio_iqr'] = 0.03
    assert '| Hinton KD | 1000 (50) | 850 (40) | 0.85x (IQR 0.03) |' in lines_for({'a': rows}, meta, argparse.Namespace(
        batch=8, size=32, repeats=3, clock='cpu'))


def test_channels_last_ratio_is_read_round_by_round(monkeypatch):
    """A load that changes from round to round scatters both layouts' medians, not their per-round ratio."""
    import argparse
    import channels_last_cost
    import jointrd_timm.deploy.latency as latency
    load = [1.0, 2.5, 1.0, 0.6, 1.8, 1.0]

    def fake_compare(steps, **kwargs):
        out = {}
        for name in steps:
            base = 800.0 if name.startswith('plain') else 1000.0
            times = [base * f * (0.9 if name.endswith('channels_last') else 1.0) for f in load]
            out[name] = dict(median_ms=sorted(times)[3], iqr_ms=base, times_ms=times)
        return out
    monkeypatch.setattr(channels_last_cost, 'make_step', lambda *a, **kw: None)
    monkeypatch.setattr(latency, 'compare_latency', fake_compare)
    rows = channels_last_cost.measure('resnet20_cifar', argparse.Namespace(batch=8, size=32, repeats=6, clock='cpu'))
    assert set(rows) == set(channels_last_cost.METHODS)
    for r in rows.values():
        assert r['ratio'] == pytest.approx(0.9) and r['ratio_iqr'] == pytest.approx(0.0, abs=1e-12)
        assert not r['noisy']  # the medians' IQRs (as large as the medians) would have flagged it


def test_compile_variant_builds_compiled_steps_and_names_its_columns(monkeypatch):
    """--variant compile: each method's second step is built with the inductor backend, the page's columns and
    ratio are eager vs compiled, and the compilation happens in untimed warm-up rounds."""
    import argparse
    import channels_last_cost
    import jointrd_timm.deploy.latency as latency
    built, seen = [], {}

    def fake_compare(steps, **kwargs):
        seen.update(kwargs)
        return {name: dict(median_ms=500.0 if name.endswith('compiled') else 1000.0, iqr_ms=10.0,
                           times_ms=[500.0 if name.endswith('compiled') else 1000.0] * 4) for name in steps}
    monkeypatch.setattr(channels_last_cost, 'make_step', lambda *a, **kw: built.append(kw))
    monkeypatch.setattr(latency, 'compare_latency', fake_compare)
    args = argparse.Namespace(batch=8, size=32, repeats=4, clock='cpu', variant='compile')
    rows = channels_last_cost.measure('resnet20_cifar', args)
    assert built.count(dict(compile_backend='inductor')) == len(channels_last_cost.METHODS)
    assert built.count({}) == len(channels_last_cost.METHODS) and seen['warmup'] == 3
    assert all(r['ratio'] == pytest.approx(0.5) and r['compiled_ms'] == 500.0 for r in rows.values())
    meta = dict(machine='m', load_before=(1, 1, 1), load_after=(1, 1, 1), minutes=1.0)
    lines = channels_last_cost.lines_for({'resnet20_cifar': rows}, meta, args)
    assert lines[0].startswith('# Training step under torch.compile')
    assert '| method | eager ms (IQR) | compiled ms (IQR) | compiled / eager |' in lines
    assert '| Hinton KD | 1000 (10) | 500 (10) | 0.50x (IQR 0.00) |' in lines


def test_step_ratios_read_pairs_round_by_round_with_a_bootstrap_interval(monkeypatch):
    import argparse
    import step_ratios
    from jointrd_timm.deploy.latency import bootstrap_median_interval
    from step_ratios import pair_rows, verdict
    assert bootstrap_median_interval([2.0] * 5) == (2.0, 2.0)
    values = [1.0, 1.1, 0.9, 1.3, 0.7, 1.05, 0.95, 1.2]
    low, high = bootstrap_median_interval(values)
    assert low < statistics.median(values) < high and (low, high) == bootstrap_median_interval(values)  # seeded
    wide = bootstrap_median_interval(values[:4])
    assert wide[1] - wide[0] >= high - low  # fewer rounds: no narrower
    with pytest.raises(ValueError, match='at least 2'):
        bootstrap_median_interval([1.0])
    assert verdict(1.01, 1.04, 1.05) == 'yes' and verdict(1.06, 1.1, 1.05) == '**no**'
    assert verdict(1.03, 1.07, 1.05).startswith('undecided') and verdict(0.9, 1.1, None) == ''
    # a load that changes each round (it scatters every method's median by 2x) and a fixed 1.03x: met at 1.05x
    load = [1.0, 2.0, 0.7, 1.4, 1.0, 0.8, 1.9, 1.1]
    times = {'plain CE (twin alone)': [1000 * f for f in load], 'fading twin alone': [1030 * f for f in load],
             'residual model CE (the teacher alone)': [1080 * f for f in load]}
    rows = {(r['method'], r['reference']): r for r in pair_rows(times)}
    assert len(rows) == 3
    fade = rows[('fading twin alone', 'plain CE (twin alone)')]
    assert fade['median'] == pytest.approx(1.03) and fade['low'] == pytest.approx(1.03)
    assert fade['limit'] == 1.05 and fade['verdict'] == 'yes'
    assert rows[('residual model CE (the teacher alone)', 'fading twin alone')]['median'] == pytest.approx(1080 / 1030)
    assert rows[('residual model CE (the teacher alone)', 'plain CE (twin alone)')]['limit'] is None  # not a goal

    monkeypatch.setattr(step_ratios, 'make_step', lambda *a: None)
    import jointrd_timm.deploy.latency as latency
    monkeypatch.setattr(latency, 'compare_latency', lambda steps, **k: {m: dict(times_ms=times[m]) for m in steps})
    args = argparse.Namespace(batch=8, size=32, repeats=8, clock='cpu', methods=list(times))
    result = step_ratios.measure('resnet20_cifar', args)
    assert result['times_ms'] == times
    ops = result['fade_ops']  # timed for real: the 9 faded shortcuts of resnet20_cifar, at batch 8
    assert ops['shortcuts'] == 9 and ops['fade_ops_ms'] > 0 and ops['residual_ops_ms'] > 0
    assert ops['extra_ms'] == pytest.approx(ops['fade_ops_ms'] - ops['residual_ops_ms'])
    assert ops['of_plain_step'] == pytest.approx(ops['extra_ms'] / 1050)  # the plain twin's median step: 1050 ms
    meta = dict(machine='m', load_before=(1, 1, 1), load_after=(1, 1, 1), minutes=1.0)
    lines = step_ratios.lines_for({'resnet20_cifar': result}, meta, args)
    assert '| fading twin alone / plain CE (twin alone) | 1.030x | 0.000 | 1.030x - 1.030x | 8 | <= 1.05x | yes |' in lines
    assert any(line.startswith('| resnet20_cifar | 9 | ') for line in lines)  # the op-by-op section


def test_step_cost_benchmarks_write_their_record_after_each_pair(tmp_path):
    import argparse
    import json
    from training_cost import measure_each_arch, run_header
    seen = []

    def measure(arch, args):
        seen.append(arch)
        return dict(step_ms=len(seen))

    def lines_for(results, meta, args):
        return [run_header(meta, args.clock), *(f'{a}: {r["step_ms"]}' for a, r in results.items())]
    args = argparse.Namespace(arch=['a', 'b'], threads=1, clock='cpu', name='probe')
    measure_each_arch(args, measure, lines_for, lambda results, png: png.write_bytes(b'png'), tmp_path, repeats=3)
    record = json.loads((tmp_path / 'probe.json').read_text())
    assert record['archs'] == {'a': dict(step_ms=1), 'b': dict(step_ms=2)} and seen == ['a', 'b']
    assert record['meta']['repeats'] == 3 and record['meta']['clock'] == 'cpu' and '1 threads' in record['meta']['machine']
    page = (tmp_path / 'probe.md').read_text()
    assert 'Step time = CPU time of the process' in page and 'b: 2' in page
    assert (tmp_path / 'probe.png').read_bytes() == b'png'


@pytest.mark.parametrize('argv,message', [
    (['--methods', 'Hinton KD'], r'at least two methods \(got 1\)'),
    (['--repeats', '3'], r'four rounds \(--repeats, got 3\)'),
    (['--report-only', '--name', 'no_such_record'], 'no record .*no_such_record.json'),
])
def test_step_ratios_refuses_bad_command_lines_before_measuring(argv, message, monkeypatch, capsys):
    import step_ratios
    monkeypatch.setattr(step_ratios, 'measure_each_arch', lambda *a, **k: pytest.fail('measured'))
    monkeypatch.setattr(sys, 'argv', ['step_ratios.py', *argv])
    with pytest.raises(SystemExit):
        step_ratios.main()
    assert re.search(message, capsys.readouterr().err)


def test_full_cifar10_variants_and_step_wise_row():
    """--variant NAME=FIELD:VALUE gives the twins of a changed recipe rows of their own; every twin length gets a
    step-wise removal row whose interval leaves one interval of training after the last removal."""
    import full_cifar10
    assert full_cifar10.parse_variant('share=shortcut_fade_mode:share,shortcut_fade:0.5') == (
        'share', dict(shortcut_fade_mode='share', shortcut_fade=0.5))
    for bad in ('share', 'share=shortcut_fade_mode', '=a:1'):
        with pytest.raises(SystemExit, match='--variant'):
            full_cifar10.parse_variant(bad)
    args = full_cifar10.parser().parse_args(['--arch', 'resnet20_cifar', '--teacher-epochs', '8', '--fractions',
                                             '0.5', '--variant', 'share=shortcut_fade_mode:share'])
    recipe, specs = full_cifar10.run_specs(args, Path('/nonexistent'))
    rows = {row: (folder.name, method, model, recipe_id) for row, _, folder, method, model, recipe_id in specs}
    assert list(rows) == ['teacher', 'twin + JointRD', 'twin alone', 'control', 'step-wise removal',
                          'twin + JointRD, share', 'twin alone, share']
    folder, method, model, _ = rows['step-wise removal']
    assert (folder, method, model['key']) == ('stepwise-e4', 'stepwise', 'stepwise_model')
    assert model['kwargs']['interval'] == pytest.approx(4 / (9 + 1))  # resnet20: 9 shortcuts
    folder, method, model, recipe_id = rows['twin + JointRD, share']
    assert folder == 'twin-jointrd-e4-share' and recipe_id == 'default,shortcut_fade_mode=share'
    assert model['kwargs']['jointrd']['shortcut_fade_mode'] == 'share'
    assert rows['twin alone, share'][2]['kwargs']['shortcut_fade_mode'] == 'share'


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
    assert 'the best trained twin (our recipe twin) is 2.00 points behind it' in text
    assert "the twin needs 0.67x the residual net's and 0.50x the exact conversion's" in text
    assert "the exact conversion needs 1.33x the residual net's (its carried channels cost more" in text
    assert 'highest for our recipe twin (42.5 points per MB); exact conversion (RM) 21.8.' in text
