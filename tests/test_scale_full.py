"""benchmarks/accuracy.py full: a command that names some rows adds them to the page instead of replacing it, and a
second seed runs into its own folders on the same teacher and split."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import scale_full  # noqa: E402
from jointrd_timm.recipes import get_recipe  # noqa: E402


def _run(folder: Path, acc=None, epochs=1, recalibrated=None):
    folder.mkdir(parents=True)
    (folder / 'metrics.jsonl').write_text(''.join(json.dumps(dict(epoch=e, seconds=10.0 + e)) + '\n'
                                                  for e in range(1, epochs + 1)))  # the runner's epochs: 1, 2, ...
    if acc is not None:
        final = dict(epochs=epochs, val_acc=1.0, test_acc=acc)
        if recalibrated is not None:
            final.update(bn_recalibrated_batches=5, test_acc_folded=recalibrated)
        (folder / 'final.json').write_text(json.dumps(final))


def test_collect_runs_keeps_recorded_rows_and_adds_this_commands(tmp_path):
    _run(tmp_path / 'teacher', 80.0, epochs=2)
    _run(tmp_path / 'twin-jointrd-e1', 70.0, recalibrated=72.5)
    _run(tmp_path / 'twin-jointrd-e1-fade50', 74.0, recalibrated=75.0)
    _run(tmp_path / 'twin-jointrd-e2', epochs=1)  # unfinished: one epoch of two done
    recorded = [dict(row='teacher', epochs=2, folder='teacher'),
                dict(row='twin + JointRD', epochs=1, folder='twin-jointrd-e1', recipe='default'),
                dict(row='twin + JointRD', epochs=2, folder='twin-jointrd-e2', recipe='default'),
                dict(row='gone', epochs=1, folder='deleted-folder')]
    from cifar_budget import Row
    from jointrd_timm.recipes import DEFAULT_RECIPE
    fade50 = DEFAULT_RECIPE.replace(shortcut_fade=0.5)
    specs = [('teacher', 2, tmp_path / 'teacher', Row('teacher', 'teacher')),
             ('twin + JointRD, fade50', 1, tmp_path / 'twin-jointrd-e1-fade50',
              Row('twin + JointRD, fade50', 'jointrd', fade50)),
             ('twin alone, fade50', 1, tmp_path / 'twin-alone-e1-fade50',
              Row('twin alone, fade50', 'alone', fade50)),  # never started
             ('control', 4, tmp_path / 'control-e4', Row('control', 'control'))]  # a new fraction's row, never started
    runs = scale_full.collect_runs(specs, tmp_path, recorded)
    assert [r['folder'] for r in runs] == ['teacher', 'twin-jointrd-e1', 'twin-jointrd-e1-fade50', 'twin-jointrd-e2']
    by = {r['folder']: r for r in runs}
    assert by['twin-jointrd-e1']['test_acc'] == 72.5 and by['twin-jointrd-e1']['test_acc_as_trained'] == 70.0
    assert by['twin-jointrd-e1-fade50']['recipe'] == 'default,shortcut_fade=0.5' and by['twin-jointrd-e1-fade50']['test_acc'] == 75.0
    assert 'test_acc' not in by['twin-jointrd-e2'] and by['twin-jointrd-e2']['epochs_done'] == 1
    assert by['teacher']['test_acc'] == 80.0 and by['teacher']['seconds_per_epoch'] == 11.5


def test_a_second_seed_gets_its_own_folders_and_rows(monkeypatch, tmp_path):
    args = scale_full.parser().parse_args(['--arch', 'resnet20_cifar', '--teacher-epochs', '8', '--fractions', '0.5',
                                             '--seed', '1'])
    _, specs = scale_full.run_specs(args, tmp_path)
    assert specs[0][0] == 'teacher' and specs[0][2] == tmp_path / 'teacher'  # one teacher for every seed
    assert [s[2].name for s in specs[1:]] == ['twin-jointrd-e4-s1', 'twin-alone-e4-s1', 'control-e4-s1',
                                             'control-e4-lr02-s1', 'stepwise-e4-s1']
    assert all(s[0].endswith(', seed 1') for s in specs[1:])
    seed0 = scale_full.run_specs(scale_full.parser().parse_args(['--teacher-epochs', '8', '--fractions', '0.5']),
                                   tmp_path)[1]
    assert [s[2].name for s in seed0[1:]] == ['twin-jointrd-e4', 'twin-alone-e4', 'control-e4',
                                             'control-e4-lr02', 'stepwise-e4']


def test_twins_train_on_their_recipes_schedule_and_the_rest_on_the_budgets(monkeypatch, tmp_path):
    """What each row trains comes from cifar_budget.row_config: a twin on its recipe's schedule (a variant's
    lr_scale replaces the recipe's), the teacher, the control and step-wise removal at --lr; step-wise removal takes
    one shortcut every epochs / (shortcuts + 1) epochs."""
    import cifar_budget
    monkeypatch.setattr(cifar_budget, 'stepwise_blocks', lambda arch: 3)
    args = scale_full.parser().parse_args(['--teacher-epochs', '8', '--fractions', '0.5', '--lr', '0.2',
                                             '--batch-size', '64', '--recipe', 'kd-low-lr',
                                             '--variant', 'half=lr_scale:0.5'])
    _, specs = scale_full.run_specs(args, tmp_path)
    configs = {folder.name: cifar_budget.row_config(row, args.arch, 'T', cifar_budget.budget_schedule(args, epochs))
               for _, epochs, folder, row in specs}
    lrs = {name: extra['schedule'].lr for name, (_, _, extra) in configs.items()}
    assert lrs == {'teacher': 0.2, 'control-e4': 0.2, 'stepwise-e4': 0.2,  # kd-low-lr: a fifth of the peak
                   'twin-jointrd-e4': 0.04, 'twin-alone-e4': 0.04, 'control-e4-lr02': 0.04,
                   'twin-jointrd-e4-half': 0.1, 'twin-alone-e4-half': 0.1, 'control-e4-lr05': 0.1}
    # the residual net on the twin's schedule: the teacher's weights and cross-entropy, the twin's lr
    model, method, extra = configs['control-e4-lr02']
    assert (model, method) == (configs['control-e4'][0], 'ce') and extra['schedule'].epochs == 4
    labels = [label for label, *_ in specs]
    assert labels[:7] == ['teacher', 'twin + JointRD', 'twin alone', 'control', 'control, on lr02',
                          'control, on lr05', 'step-wise removal']
    # one control per twin schedule: the variant at half the peak gets its own, the recipe's is not repeated
    assert lrs['control-e4-lr05'] == 0.1
    changed = get_recipe('default').replace(lr_scale=0.2, lr_hold=0.8, batch_scale=0.5)
    assert scale_full.schedule_tag(changed) == 'lr02-hold08-batch05'
    # a recipe at the budget's own schedule has no such row (it would be the control again)
    default = scale_full.run_specs(scale_full.parser().parse_args(['--teacher-epochs', '8', '--fractions', '0.5',
                                                                   '--recipe', 'default']), tmp_path)[1]
    assert not any(folder.name.startswith('control-e4-') for _, _, folder, _ in default)
    run = configs['twin-jointrd-e4'][2]['schedule']
    assert (run.epochs, run.batch_size, run.weight_decay, run.decay) == (4, 64, 5e-4, 'cosine')
    assert configs['teacher'][2]['schedule'].epochs == 8
    model, method, _ = configs['stepwise-e4']
    assert (method, model['key'], model['kwargs']['interval']) == ('stepwise', 'stepwise_model', 1.0)
    assert model['kwargs']['teacher']['checkpoint'] == 'T'
    assert configs['twin-jointrd-e4'][0]['kwargs']['jointrd']['kd_weight'] == 1.0


def test_published_card_names_the_command_of_its_run():
    import publish_cifar10
    meta = dict(teacher_epochs=8, variants=['share=shortcut_fade_mode:share', 'fade50=shortcut_fade:0.5',
                                            'lr02=lr_scale:0.2', 'kd-lr02=kd_weight:1.0,lr_scale:0.2'])
    base = 'python benchmarks/accuracy.py full --arch resnet56_cifar --teacher-epochs 8 --fractions 0.5'
    assert publish_cifar10.twin_command('resnet56_cifar', meta, dict(folder='twin-jointrd-e4', epochs=4)) == \
        base + ' --only twin-jointrd-e4'
    assert publish_cifar10.twin_command('resnet56_cifar', meta, dict(folder='twin-jointrd-e4-fade50-s1', epochs=4)) \
        == base + ' --variant fade50=shortcut_fade:0.5 --seed 1 --only twin-jointrd-e4-fade50-s1'
    # a variant whose name ends another's: only the folder's own variant is named
    assert publish_cifar10.twin_command('resnet56_cifar', meta, dict(folder='twin-jointrd-e4-kd-lr02', epochs=4)) == \
        base + ' --variant kd-lr02=kd_weight:1.0,lr_scale:0.2 --only twin-jointrd-e4-kd-lr02'
    assert publish_cifar10.twin_command('resnet56_cifar', meta, dict(folder='twin-alone-e2-share', epochs=2)) == \
        base.replace('0.5', '0.25') + ' --variant share=shortcut_fade_mode:share --only twin-alone-e2-share'
    # a record of another name (another teacher) trains into its own record and work folder
    assert publish_cifar10.twin_command('resnet56_cifar', dict(teacher_epochs=32), dict(folder='twin-jointrd-e16-s1',
                                                                                        epochs=16),
                                        'full_cifar10_t32') == \
        ('python benchmarks/accuracy.py full --arch resnet56_cifar --teacher-epochs 32 --name full_cifar10_t32 '
         '--work-dir benchmarks/runs/full_cifar10_t32 --fractions 0.5 --seed 1 --only twin-jointrd-e16-s1')


def test_the_published_twin_is_the_best_on_validation_within_half_the_teachers_epochs():
    import pytest
    from publish_cifar10 import best_twin
    runs = [dict(row='teacher', epochs=8, test_acc=82.0, val_acc=81.0),
            dict(row='twin + JointRD', epochs=4, test_acc=75.0, val_acc=74.0),
            dict(row='twin alone, share', epochs=4, test_acc=74.0, val_acc=74.5),
            dict(row='twin + JointRD, kd', epochs=8, test_acc=81.0, val_acc=80.0),  # longer than half: not published
            dict(row='control', epochs=4, test_acc=83.0, val_acc=82.0),
            dict(row='twin + JointRD, kd', epochs=2, epochs_done=1)]  # unfinished
    assert best_twin(runs, teacher_epochs=8)['row'] == 'twin alone, share'  # chosen on validation, not on test
    assert best_twin(runs, teacher_epochs=8, max_fraction=1.0)['epochs'] == 8
    with pytest.raises(SystemExit, match='at most 0.25 x 8 epochs'):
        best_twin(runs, teacher_epochs=8, max_fraction=0.25)
    # a tie on validation goes to the run of the architecture's recommended recipe (what jointrd distill trains)
    from jointrd_timm.recipes import recipe_for
    ours = recipe_for('resnet20_cifar').id
    tied = [dict(row='twin + JointRD, a', epochs=8, test_acc=86.0, val_acc=87.9, recipe='default,kd_weight=1.0'),
            dict(row='twin + JointRD, n', epochs=8, test_acc=86.5, val_acc=87.9, recipe=None),
            dict(row='twin + JointRD, b', epochs=8, test_acc=85.0, val_acc=87.9, recipe=ours),
            dict(row='twin + JointRD, c', epochs=8, test_acc=87.0, val_acc=87.8, recipe=ours)]
    assert best_twin(tied, teacher_epochs=32, arch='resnet20_cifar')['row'] == 'twin + JointRD, b'
    # the same ingredients named another way count as the recipe
    tied[2]['recipe'] = 'kd-low-lr-blocks,shortcut_fade=0.6'
    assert best_twin(tied, teacher_epochs=32, arch='resnet20_cifar')['row'] == 'twin + JointRD, b'
    assert best_twin(tied, teacher_epochs=32)['row'] == 'twin + JointRD, a'  # no architecture: the first of the tie


def test_the_full_scale_reads_images_at_its_input_size(tmp_path):
    import datasets
    import numpy as np
    from PIL import Image
    rng = np.random.RandomState(0)
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(num_classes=2)})
    (tmp_path / 'data').mkdir()
    for split, n in (('train', 20), ('test', 4)):
        images = [Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
        datasets.Dataset.from_dict({'img': images, 'label': [i % 2 for i in range(n)]}, features=features).to_parquet(
            str(tmp_path / 'data' / f'{split}-00000-of-00001.parquet'))
    args = scale_full.parser().parse_args(['--data', str(tmp_path), '--val-size', '10000', '--input-size', '16'])
    train, val, test = scale_full.splits(args)
    assert (len(train), len(val), len(test)) == (16, 4, 4)  # 10,000 of 50,000: a fifth held out
    assert train[0][0].shape == val[0][0].shape == test[0][0].shape == (3, 16, 16)
    assert scale_full.parser().parse_args([]).input_size is None  # default: the record's, else 32 (main)


def test_the_teachers_epochs_come_from_its_finished_run_whatever_the_record(tmp_path):
    """A command writing another record (--name) still converts for fractions of the teacher's real epochs: once a
    sweep given --name lost its record's teacher_epochs (8) and fell back to 32, so its depth-56 folders were named
    for 16 epochs and nothing ran. A --teacher-epochs that contradicts the finished teacher is refused."""
    import pytest
    _run(tmp_path / 'teacher', 80.0, epochs=8)
    args = scale_full.parser().parse_args(['--fractions', '0.5', '--name', 'elsewhere'])
    scale_full.fill_defaults(args, {}, tmp_path / 'teacher')
    assert (args.teacher_epochs, args.input_size, args.recipe) == (8, 32, None)
    assert scale_full.run_specs(args, tmp_path)[1][1][2].name == 'twin-jointrd-e4'
    args = scale_full.parser().parse_args([])  # no teacher yet: the record's, else 32; the record's fractions
    scale_full.fill_defaults(args, dict(teacher_epochs=12, fractions=[0.25], input_size=64), tmp_path / 'none')
    assert (args.teacher_epochs, args.fractions, args.input_size) == (12, [0.25], 64)
    args = scale_full.parser().parse_args([])
    scale_full.fill_defaults(args, {}, tmp_path / 'none')
    assert (args.teacher_epochs, args.fractions) == (32, [0.25, 0.5])
    args = scale_full.parser().parse_args(['--teacher-epochs', '32'])
    with pytest.raises(SystemExit, match=r'--teacher-epochs 32: the teacher in .* finished 8 epochs; give '
                                         r'--teacher-epochs 8'):
        scale_full.fill_defaults(args, {}, tmp_path / 'teacher')


def test_a_weight_averaged_twin_is_read_with_its_accuracy_without_the_average(tmp_path):
    folder = tmp_path / 'twin-jointrd-e1-ema'
    _run(folder, 70.0, recalibrated=72.5)
    final = json.loads((folder / 'final.json').read_text())
    final.update(test_acc_deployed=73.25, test_acc_deployed_without_ema=72.5, ema_steps=30, val_acc=71.0,
                 val_acc_ema=71.5)
    (folder / 'final.json').write_text(json.dumps(final))
    entry = scale_full.run_entry('twin + JointRD, ema', 1, folder, 'default,ema_decay=0.998')
    assert (entry['test_acc'], entry['test_acc_without_ema'], entry['ema_steps']) == (73.25, 72.5, 30)
    # the deployed model is the average: its validation accuracy is the one publication chooses on
    assert (entry['val_acc'], entry['val_acc_without_ema']) == (71.5, 71.0)
    plain = scale_full.run_entry('twin + JointRD', 1, (_run(tmp_path / 'p', 71.0) or tmp_path / 'p'), 'default')
    assert 'test_acc_without_ema' not in plain
    lines = scale_full.answer_lines([dict(row='teacher', epochs=2, test_acc=80.0), entry, plain], 80.0)
    assert 'same run deployed without it -> with it: twin + JointRD, ema 1 ep: 72.50 -> 73.25 % (30 steps averaged)' \
        in '\n'.join(lines)


def test_a_records_question_is_said_under_its_title_and_kept_by_later_commands(monkeypatch, tmp_path):
    """--about: a record beside the published-twin one (another teacher, another question) says what it asks under
    its page's title; a later command that does not repeat it (a new row, --report-only) keeps the record's."""
    _run(tmp_path / 'resnet20_cifar' / 'teacher', 80.0, epochs=8)
    _run(tmp_path / 'resnet20_cifar' / 'twin-jointrd-e4', 70.0)
    written = {}
    monkeypatch.setattr(scale_full, 'RESULTS', tmp_path / 'results')
    monkeypatch.setattr(scale_full, 'write_report', lambda name, record, lines, plot: written.update(
        name=name, record=record, lines=lines))
    about = 'The same recipe from a teacher trained four times as long.'
    args = scale_full.parser().parse_args(['--fractions', '0.5', '--name', 'longer', '--work-dir', str(tmp_path),
                                           '--about', about, '--rows', 'teacher', 'twin + JointRD'])
    scale_full.fill_defaults(args, {}, tmp_path / 'resnet20_cifar' / 'teacher')
    recipe, specs = scale_full.run_specs(args, tmp_path / 'resnet20_cifar')
    scale_full.report(args, recipe, specs)
    assert written['name'] == 'longer_resnet20_cifar' and written['record']['meta']['about'] == about
    assert written['lines'][:3] == [written['lines'][0], '', about] and written['lines'][0].startswith('# Full CIFAR')
    assert [r['test_acc'] for r in written['record']['runs']] == [80.0, 70.0]
    later = scale_full.parser().parse_args(['--name', 'longer'])
    scale_full.fill_defaults(later, written['record']['meta'], tmp_path / 'resnet20_cifar' / 'teacher')
    assert later.about == about
    plain = scale_full.parser().parse_args([])  # a record that asks nothing of its own has no sentence
    scale_full.fill_defaults(plain, {}, tmp_path / 'none')
    assert plain.about is None


def test_a_run_whose_checkpoint_is_gone_starts_again(tmp_path):
    """Only metrics.jsonl and final.json travel with the repository: on a machine without the checkpoint an
    unfinished run starts again from epoch 0 (its stale lines replaced, not appended to) and reproduces the run it
    replaces; a finished one is read back, not trained again."""
    from conftest import tiny_yaml
    from jointrd_timm.training.runner import load_config
    config = load_config(tiny_yaml(tmp_path / 'yaml', epochs=2, limit=32))
    first = tmp_path / 'first'
    scale_full.run(first, config)
    reference = json.loads((first / 'final.json').read_text())
    lost = tmp_path / 'lost'
    lost.mkdir()
    lines = (first / 'metrics.jsonl').read_text().splitlines()
    (lost / 'metrics.jsonl').write_text(lines[0] + '\n')  # one epoch's line, its checkpoint left behind
    scale_full.run(lost, config)
    assert [r['epoch'] for r in scale_full.RunFolder(lost).metrics()] == [1, 2]
    again = json.loads((lost / 'final.json').read_text())
    assert again['test_acc'] == reference['test_acc'] and not (lost / 'resumes.txt').exists()
    scale_full.run(lost, config)  # finished: read, not trained again
    assert json.loads((lost / 'final.json').read_text()) == again
