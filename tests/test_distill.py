"""`jointrd distill`: a residual model to its deployed twin in one command. End to end at toy size (resnet20_cifar,
128 digits, one epoch), the written YAML reproducing the run, resume, and every refusal before training."""
import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file

import jointrd_timm  # noqa: F401
from jointrd_timm.cli import main
from jointrd_timm.integrations.hub import load_model, save_trained_model
from jointrd_timm.io import top1_accuracy
from jointrd_timm.methods.stages import StageLayoutError
from jointrd_timm.training import distill
from jointrd_timm.training.distill import (DistillError, build_configs, plan_distill, report_distill,
                                           resolve_teacher, run_distill, train_distill)
from jointrd_timm.training.runner import load_config, train

TOY = dict(epochs=1, limit=128)


def _weights(folder):
    return load_file(str(folder / 'model.safetensors'))


def test_distill_trains_teacher_and_twin_writes_deployed_twin_yaml_and_table(tmp_path, capsys):
    out = tmp_path / 'run'
    torch.manual_seed(0)
    plan = plan_distill('resnet20_cifar', 'sklearn:digits', str(out), val_fraction=0.1, **TOY)
    assert plan.teacher_trained_here and plan.recipe.id == 'kd-low-lr-blocks-fade60'  # the architecture's recipe
    final = train_distill(plan, device='cpu')
    summary = report_distill(plan, final, train_seconds=0.0, latency_repeats=3)
    printed = capsys.readouterr().out
    assert 'NOTE: teacher resnet20_cifar: trained here from scratch' in printed
    # 128 images in batches of 64, 1 epoch: far too short a fade, said before training and in the table
    warning = 'the twin trains for 2 optimizer steps (1 epochs of 2): its shortcuts fade out in 1 of them'
    assert f'WARNING: {warning}' in printed and '(--epochs 125)' in printed
    # 2 steps leave the teacher near chance (10 % for 10 classes): said after the table, in it, in the card and json
    near_chance = (f'the teacher is at {summary["test_acc"]["teacher"]:.2f} % on the test set, near chance (10.00 % '
                   'for 10 classes)')
    assert summary['test_acc']['teacher'] < 19 and f'WARNING: {near_chance}' in printed.split('| twin')[-1]
    assert [w[:len(near_chance)] for w in summary['warnings']] == [warning[:len(near_chance)], near_chance]
    for name in ('model/config.json', 'model/model.safetensors', 'model/README.md', 'distill.yaml', 'teacher.yaml',
                 'comparison.md', 'comparison.json', 'comparison.png'):
        assert (out / name).stat().st_size > 0, name

    # the deployed twin: timm's Hub format, no shortcut left, and the accuracy the table reports
    twin = timm.create_model(f'local-dir:{out / "model"}', pretrained=True).eval()
    assert not any('downsample' in k or 'shortcut' in k for k in twin.state_dict())
    test_set = final['config']['datasets']['test']
    assert top1_accuracy(twin, test_set) == pytest.approx(summary['test_acc']['twin'])
    assert summary['test_acc']['twin'] == pytest.approx(final['test_acc_folded'])
    # how often the twin gives the teacher's class, image by image, as the table, json and card report it
    teacher = load_model(str(out / 'teacher' / 'model')).eval()
    same = [int(teacher(x[None]).argmax()) == int(twin(x[None]).argmax()) for x, _ in test_set]
    assert summary['teacher_agreement'] == pytest.approx(100 * sum(same) / len(same))
    table = (out / 'comparison.md').read_text()
    assert f'| {summary["test_acc"]["twin"]:.2f} | {summary["teacher_agreement"]:.2f} |' in table
    assert 'trained here from scratch' in table and '| twin `plain_resnet20_cifar` (shortcut-free) |' in table
    assert f'**Warning:** {warning}' in table and f'**Warning:** {near_chance}' in table
    assert '(--teacher-epochs, 1 now)' in table
    assert json.loads((out / 'comparison.json').read_text())['teacher_epochs'] == 1
    card = (out / 'model' / 'README.md').read_text()
    assert f"timm.create_model('local-dir:{(out / 'model').resolve()}', pretrained=True)" in card
    # config.json describes this data (1-channel digits at 8 px, normalised by 0.5), not the architecture's CIFAR
    cfg = json.loads((out / 'model' / 'config.json').read_text())['pretrained_cfg']
    assert (cfg['tag'], cfg['input_size'], cfg['mean'], cfg['std']) == ('distill', [1, 8, 8], [0.5], [0.5])
    assert twin.pretrained_cfg['input_size'] == (1, 8, 8)
    assert 'recipe `kd-low-lr-blocks-fade60`' in card and 'trained here from scratch' in card
    assert f'**Warning:** {near_chance}' in card
    assert f'| teacher_agreement_test | {round(summary["teacher_agreement"], 2)} |' in card

    # the YAML is the run: the runner's loader gives back the same sections, and training from it anew gives the
    # same twin bit for bit
    expected = build_configs(plan, plan.teacher.model)['distill']
    loaded = load_config(out / 'distill.yaml')
    for section in ('models', 'train', 'test', 'runner'):
        assert loaded[section] == expected[section], section
    assert sorted(loaded['datasets']) == ['test', 'train', 'val']
    # the per-epoch record reads a held-out tenth of the train split, the 128 training images come from the rest
    assert (len(loaded['datasets']['train']), len(loaded['datasets']['val'])) == (128, 144)
    assert torch.equal(loaded['datasets']['test'][5][0], expected['datasets']['test'][5][0])
    train(loaded, output_dir=str(tmp_path / 'again'), device='cpu')
    again, first = _weights(tmp_path / 'again' / 'model'), _weights(out / 'twin' / 'model')
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)

    # resume of a finished run keeps it (no epoch trained again)
    train_distill(plan, resume=True, device='cpu')
    assert len((out / 'twin' / 'metrics.jsonl').read_text().splitlines()) == 1
    assert all(torch.equal(_weights(out / 'twin' / 'model')[k], v) for k, v in first.items())

    # a JointRD run folder as TEACHER: its teacher part, which is the frozen teacher it was trained from
    teacher = resolve_teacher(str(out / 'twin'))
    assert (teacher.arch, teacher.num_classes, teacher.in_chans) == ('resnet20_cifar', 10, 1)
    model = distill._extract_run_teacher(teacher, tmp_path / 'extracted')
    extracted, trained = _weights(tmp_path / 'extracted'), _weights(out / 'teacher' / 'model')
    assert model['model_name'].startswith('local-dir:') and all(torch.equal(extracted[k], trained[k]) for k in trained)


def _hub_teacher(tmp_path, num_classes):
    model = timm.create_model('resnet20_cifar', num_classes=num_classes, in_chans=1)
    return save_trained_model(model, tmp_path / f'teacher{num_classes}')


def test_hub_folder_teacher_is_distilled_from_its_weights(tmp_path):
    import warnings
    folder = _hub_teacher(tmp_path, 10)
    with warnings.catch_warnings(record=True) as caught:  # the check's trial pair is random on purpose: no warning
        warnings.simplefilter('always')
        plan = plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), **TOY)
    assert not [w for w in caught if 'is given no weights' in str(w.message)]
    assert not plan.teacher_trained_here
    configs = build_configs(plan, plan.teacher.model)
    assert list(configs) == ['distill']  # nothing trained before the twin
    assert configs['distill']['models']['model']['kwargs']['teacher'] == dict(
        model_name=f'local-dir:{folder.resolve()}', pretrained=True, num_classes=10, in_chans=1)
    assert not (tmp_path / 'out').exists()  # planning writes nothing


def test_teacher_with_other_classes_is_refused_unless_num_classes_reinitialises_its_head(tmp_path):
    folder = _hub_teacher(tmp_path, 5)
    with pytest.raises(DistillError, match=r'predicts 5 classes, but the data sklearn:digits has 10 labels\. Pass '
                                           r'--num-classes 10 to re-initialise its classifier'):
        plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), **TOY)
    with pytest.raises(DistillError, match=r'--num-classes 7: the data sklearn:digits has 10 labels'):
        plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), num_classes=7, **TOY)
    plan = plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), num_classes=10, teacher_epochs=2,
                        **TOY)
    assert plan.reinit_head and plan.teacher_trained_here and plan.teacher_epochs == 2
    configs = build_configs(plan, plan.teacher.model)
    # the teacher is fine-tuned from its weights (timm drops the 5-class head), then distilled from that run
    assert configs['teacher']['models']['model']['kwargs'] == dict(
        model_name=f'local-dir:{folder.resolve()}', pretrained=True, num_classes=10, in_chans=1)
    assert configs['teacher']['train']['num_epochs'] == 2
    assert configs['distill']['models']['model']['kwargs']['teacher']['checkpoint'] == \
        str((tmp_path / 'out' / 'teacher' / 'model').resolve())
    model = timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=10, in_chans=1)
    assert model.fc.out_features == 10


@pytest.mark.parametrize('teacher, message', [
    ('resnet20_cifarr', r"Unknown teacher 'resnet20_cifarr': not a timm architecture, hf-hub: id or folder "
                        r'\(did you mean resnet20_cifar'),
    ('resnet50.nope', r"resnet50 has no pretrained tag 'nope'; its tags: resnet50\.a1_in1k"),
    ('plain_resnet20_cifar', r'plain_resnet20_cifar is a shortcut-free twin already; give its residual teacher '
                             r'\(resnet20_cifar\)'),
    ('vit_tiny_patch16_224', r'vit_tiny_patch16_224 is a transformer \(or hybrid\): it mixes tokens with '
                             r'.*Attention.*refused by design'),
    ('/no/such/teacher', r'Teacher folder /no/such/teacher does not exist'),
])
def test_bad_teacher_is_refused_before_anything_is_written(tmp_path, teacher, message):
    with pytest.raises(DistillError, match=message):
        run_distill(teacher, 'sklearn:digits', str(tmp_path / 'out'), **TOY)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('data, options, message', [
    ('/no/such/data', {}, r"Cannot load the data '/no/such/data': FileNotFoundError: Dataset folder /no/such/data "
                          r'does not exist'),
    ('sklearn:digits', dict(image_column='image'), r"has no column 'image'; its columns are: img \(Image\), label "
                                                   r'\(ClassLabel\).*--image-column / --label-column'),
    ('sklearn:digits', dict(test_split='validation'), r'sklearn:digits has splits train and test'),
])
def test_bad_data_is_refused_before_anything_is_written(tmp_path, data, options, message):
    with pytest.raises(DistillError, match=message):
        run_distill('resnet20_cifar', data, str(tmp_path / 'out'), **TOY, **options)
    assert not (tmp_path / 'out').exists()


def test_output_folder_holding_another_run_is_refused(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    # files that are no run: not 'another run' that --resume would continue (it would refuse: no distill run)
    with pytest.raises(DistillError, match=r'is not empty \(notes\.txt\) and holds no distill run: choose an empty '
                                           r'or new --output-dir, or pass --overwrite'):
        run_distill('resnet20_cifar', 'sklearn:digits', str(out), **TOY)
    (out / 'distill.yaml').write_text('an earlier run')
    (out / 'twin').mkdir()
    (out / 'twin' / 'final.json').write_text('{}')
    with pytest.raises(DistillError, match=r'holds another run \(distill\.yaml, notes\.txt, twin\); pass --resume to '
                                           r'continue it, --overwrite to replace it'):
        run_distill('resnet20_cifar', 'sklearn:digits', str(out), **TOY)
    (out / 'distill.yaml').unlink()
    shutil.rmtree(out / 'twin')
    with pytest.raises(DistillError, match=r'--resume: .* holds no distill run'):
        run_distill('resnet20_cifar', 'sklearn:digits', str(out), resume=True, **TOY)
    with pytest.raises(DistillError, match=r'give one'):
        run_distill('resnet20_cifar', 'sklearn:digits', str(out), resume=True, overwrite=True, **TOY)
    assert sorted(p.name for p in out.iterdir()) == ['notes.txt']


def test_pair_that_does_not_build_for_jointrd_is_refused_with_the_reason(tmp_path, monkeypatch):
    from jointrd_timm.integrations import torchdistill as registry

    def refuse(**kwargs):
        raise StageLayoutError('conv_head is applied twice')

    monkeypatch.setattr(registry, 'jointrd_model', refuse)
    with pytest.raises(DistillError, match=r'resnet20_cifar: the teacher / twin pair does not train with JointRD on '
                                           r'\(1, 8, 8\) inputs \(StageLayoutError: conv_head is applied twice\)\.$'):
        run_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'out'), **TOY)
    assert not (tmp_path / 'out').exists()


def test_inputs_too_small_for_the_architecture_are_refused_with_the_fix(tmp_path):
    # convnext's stride-4 stem and 2x2 downsampling leave nothing of an 8x8 digit
    with pytest.raises(DistillError, match=r'convnext_atto: the teacher / twin pair does not train with JointRD on '
                                           r'\(1, 8, 8\) inputs .* give a larger --input-size'):
        run_distill('convnext_atto', 'sklearn:digits', str(tmp_path / 'out'), **TOY)
    assert not (tmp_path / 'out').exists()


def test_cli_reports_a_refusal_as_one_error_line(tmp_path, capsys):
    assert main(['distill', 'resnet20_cifarr', '--data', 'sklearn:digits', '--output', str(tmp_path / 'o')]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jointrd distill: error: Unknown teacher 'resnet20_cifarr'") and err.count('\n') == 1


def test_pretrained_tag_teacher_loads_offline_through_timm_with_its_head_reinitialised(tmp_path):
    """A timm tag goes through timm's own pretrained loading: offline, from a Hub cache built here by hand."""
    import os
    import subprocess
    import sys
    from safetensors.torch import save_file
    from conftest import ROOT
    teacher = timm.create_model('regnetx_002')
    snapshot = tmp_path / 'cache' / 'models--timm--regnetx_002.pycls_in1k' / 'snapshots' / ('b' * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(snapshot / 'model.safetensors'))
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('b' * 40)
    code = f"""
import torch
from jointrd_timm.training.distill import DistillError, build_configs, plan_distill, _build
from safetensors.torch import load_file
try:
    plan_distill('regnetx_002.pycls_in1k', 'sklearn:digits', '{tmp_path / 'out'}', epochs=1, limit=64)
except DistillError as e:
    print('refused:', e)
plan = plan_distill('regnetx_002.pycls_in1k', 'sklearn:digits', '{tmp_path / 'out'}', epochs=1, limit=64,
                    num_classes=10)
kwargs = build_configs(plan, plan.teacher.model)['teacher']['models']['model']['kwargs']
print(kwargs)
model = _build(kwargs)
saved = load_file('{snapshot / 'model.safetensors'}')
state = model.state_dict()
print(all(torch.equal(state[k], v) for k, v in saved.items() if not k.startswith('head.')),
      model.get_classifier().out_features)
"""
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'cache'),
                                     PYTHONWARNINGS='ignore'))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith('refused: Teacher regnetx_002.pycls_in1k predicts 1000 classes, but the data '
                               'sklearn:digits has 10 labels. Pass --num-classes 10')
    assert lines[1] == str(dict(model_name='regnetx_002.pycls_in1k', pretrained=True, num_classes=10, in_chans=3))
    assert lines[2] == 'True 10'
    assert not (tmp_path / 'out').exists()


def test_mixed_precision_and_channels_last_reach_every_runs_runner_section(tmp_path):
    folder = _hub_teacher(tmp_path, 5)
    plan = plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), num_classes=10, mixed_precision='bf16',
                        channels_last=True, **TOY)
    configs = build_configs(plan, plan.teacher.model)
    assert list(configs) == ['teacher', 'distill']
    for config in configs.values():
        assert config['runner']['mixed_precision'] == 'bf16' and config['runner']['channels_last'] is True
    assert ' --mixed-precision bf16 ' in plan.command and ' --channels-last ' in plan.command
    default = build_configs(plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), num_classes=10, **TOY),
                            plan.teacher.model)
    assert default['distill']['runner']['mixed_precision'] == 'no' and not default['distill']['runner']['channels_last']
    with pytest.raises(DistillError, match=r"mixed_precision must be one of no, fp16, bf16, got 'fp8'"):
        plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), mixed_precision='fp8', **TOY)


def test_plan_takes_data_and_training_specs_or_their_fields_by_keyword(tmp_path):
    from jointrd_timm.training.distill import DataSpec, TrainSpec
    folder = _hub_teacher(tmp_path, 10)
    keywords = plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), epochs=2, limit=64, lr=0.02,
                            batch_size=16, val_fraction=0.1)
    specs = plan_distill(str(folder), DataSpec('sklearn:digits', limit=64, val_fraction=0.1), str(tmp_path / 'out'),
                         train=TrainSpec(epochs=2, lr=0.02, batch_size=16))
    configs = build_configs(keywords, keywords.teacher.model)
    assert build_configs(specs, specs.teacher.model).keys() == configs.keys() == {'distill'}
    for section in ('models', 'train', 'test', 'runner'):
        assert build_configs(specs, specs.teacher.model)['distill'][section] == configs['distill'][section]
    train = configs['distill']['train']
    # the twin at its architecture's recipe's peak (resnet20_cifar: kd-low-lr-blocks-fade60, a fifth of --lr)
    assert keywords.recipe.id == 'kd-low-lr-blocks-fade60'
    assert (train['num_epochs'], train['optimizer']['kwargs']['lr'], train['train_data_loader']['kwargs']['batch_size'],
            train['val_data_loader']['dataset_id']) == (2, pytest.approx(0.004), 16, 'val')
    # the digits' setting (the demo schedule, cosine) at the run's own length
    assert train['scheduler'] == dict(key='CosineAnnealingLR', kwargs=dict(T_max=2))
    # a recipe's lr_scale lowers the twin's peak learning rate only (and a joint teacher's own SGD with it)
    slower = plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), epochs=2, limit=64, lr=0.02,
                          recipe='default,lr_scale=0.25,teacher_mode=joint,joint_step_order=teacher_first')
    slower_configs = build_configs(slower, slower.teacher.model)
    assert slower.budget['lr'] == 0.02 and slower.run_schedule(2).lr == 0.02
    assert slower_configs['distill']['train']['optimizer']['kwargs']['lr'] == pytest.approx(0.005)
    joint_sgd = slower_configs['distill']['models']['model']['kwargs']['jointrd']['teacher_optimizer']
    assert joint_sgd['lr'] == pytest.approx(0.005)
    # a recipe's lr_hold: the twin's per-step hold-then-cosine scheduler (the joint teacher's SGD stays epoch-wise)
    held = plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), epochs=2, limit=64, lr=0.02,
                        recipe='default,lr_hold=0.5,teacher_mode=joint,joint_step_order=teacher_first')
    held_train = build_configs(held, held.teacher.model)['distill']['train']
    assert held_train['scheduler'] == dict(key='HoldCosineLR', kwargs=dict(hold=0.5, epochs=2), scheduling_step=1)
    assert held_train['optimizer']['kwargs']['lr'] == 0.02
    held_sgd = build_configs(held, held.teacher.model)['distill']['models']['model']['kwargs']['jointrd']
    assert held_sgd['teacher_optimizer']['cosine_epochs'] == 2
    with pytest.raises(TypeError, match=r"Unknown distill option\(s\) \['epoch'\]"):
        plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), epoch=2)


def test_the_cards_eval_command_reads_the_test_split_as_the_run_did():
    from jointrd_timm.training.distill import _eval_args
    assert _eval_args(dict(source='/data/pets', split='validation', image_column='image', label_column='fine',
                           transform='imagenet', input_size=64), ('img', 'label')) == \
        '--split validation --image-column image --label-column fine --transform imagenet --input-size 64'
    # a reading the twin's config.json says is left to it: eval reads it so, where --transform would override it
    assert _eval_args(dict(source='/data/pets', split='validation', image_column='image', label_column='fine',
                           transform='imagenet', input_size=64), ('img', 'label'), reading_saved=True) == \
        '--split validation --image-column image --label-column fine'
    assert _eval_args(dict(source='sklearn:digits', split='test', image_column='img', label_column='label',
                           transform='tensor', input_size=8), ('img', 'label')) == ''  # eval's own defaults
    assert _eval_args(dict(source='uoft-cs/cifar10', split='test', image_column='img', label_column='label',
                           transform='cifar', input_size=32), ('img', 'label')) == ''
    # columns eval finds by itself are left out; ones it would not find (two image columns: it refuses) are named
    test = dict(source='/data/pets', split='test', image_column='image', label_column='label', transform='cifar',
                input_size=32)
    assert _eval_args(test, ('image', 'label')) == ''
    assert _eval_args(dict(test, image_column='img'), (None, None)) == '--image-column img --label-column label'


def test_the_card_names_the_columns_eval_would_not_find():
    import datasets
    from PIL import Image
    from jointrd_timm.training.distill import _columns_found
    image = Image.new('RGB', (8, 8))
    two = datasets.Dataset.from_dict({'img': [image], 'mask': [image], 'label': [0]}, features=datasets.Features(
        {'img': datasets.Image(), 'mask': datasets.Image(), 'label': datasets.ClassLabel(num_classes=2)}))
    assert _columns_found(two) == (None, None)  # eval's search refuses two image columns: the card names them
    assert _columns_found(two.remove_columns('mask')) == ('img', 'label')


def test_num_classes_given_for_a_teacher_with_as_many_classes_resets_its_head(tmp_path):
    """A 10-class teacher moved to another 10-class label set: --num-classes 10 asks for a new classifier, which
    timm's loader would keep (same shape), so the teacher's fine-tune run resets it."""
    from jointrd_timm.integrations.torchdistill import timm_model
    folder = _hub_teacher(tmp_path, 10)
    assert not plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), **TOY).reinit_head
    plan = plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'), num_classes=10, **TOY)
    assert plan.reinit_head and plan.teacher_trained_here
    assert 'fine-tuned here' in distill._teacher_origin(plan)
    kwargs = build_configs(plan, plan.teacher.model)['teacher']['models']['model']['kwargs']
    assert kwargs == dict(model_name=f'local-dir:{folder.resolve()}', pretrained=True, num_classes=10, in_chans=1,
                          reset_head=True)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=10, in_chans=1)
    reset = timm_model(**kwargs)
    assert not torch.equal(reset.fc.weight, loaded.fc.weight)  # a new head
    body = {k: v for k, v in loaded.state_dict().items() if not k.startswith('fc.')}
    assert all(torch.equal(reset.state_dict()[k], v) for k, v in body.items())  # the rest is the teacher's
    with pytest.raises(ValueError, match='reset_head needs weights whose head to reset'):
        timm_model('resnet20_cifar', reset_head=True)


def test_a_distill_output_given_as_the_teacher_names_the_folders_that_hold_one(tmp_path):
    from jointrd_timm.training.teachers import resolve_teacher
    out = tmp_path / 'out'
    save_trained_model(timm.create_model('plain_resnet20_cifar', num_classes=10), out / 'model')
    save_trained_model(timm.create_model('resnet20_cifar', num_classes=10), out / 'teacher' / 'model')
    (out / 'distill.yaml').write_text('models: {}')
    with pytest.raises(DistillError, match=r'is the output of jointrd distill: its model/ is the twin\. .*give '
                                           rf'{out / "twin"} .* or {out / "teacher" / "model"}'):
        resolve_teacher(str(out))
    assert resolve_teacher(str(out / 'teacher' / 'model')).arch == 'resnet20_cifar'


def _timm_train_checkpoint(tmp_path, num_classes=10, arch='resnet20_cifar'):
    """What timm's train.py saves (a pickle: state_dict, its weight average, the arguments), and the model."""
    import argparse
    torch.manual_seed(3)
    model = timm.create_model(arch, num_classes=num_classes, in_chans=1)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / 'model_best.pth.tar'
    torch.save(dict(epoch=3, arch=arch, state_dict=model.state_dict(), state_dict_ema=ema, optimizer={},
                    args=argparse.Namespace(model=arch), metric=0.5), path)
    return path, model, ema


def test_a_timm_train_checkpoint_converted_to_safetensors_is_the_teacher(tmp_path, capsys):
    path, model, ema = _timm_train_checkpoint(tmp_path)
    # the pickle itself is refused, with the command that converts it
    with pytest.raises(DistillError, match=r'is a pickle, which is not loaded.*jointrd convert-checkpoint '
                                           r'.*model_best\.pth\.tar model_best\.safetensors'):
        plan_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'out'), teacher_weights=str(path), **TOY)
    weights = tmp_path / 'model_best.safetensors'
    capsys.readouterr()
    assert main(['convert-checkpoint', str(path), str(weights)]) == 0  # finds train.py's state_dict by itself
    assert "its 'state_dict' entry" in capsys.readouterr().out
    assert main(['convert-checkpoint', str(path), str(tmp_path / 'ema.safetensors'), '--entry', 'state_dict_ema']) == 0
    assert torch.equal(load_file(str(tmp_path / 'ema.safetensors'))['fc.bias'], ema['fc.bias'])

    plan = plan_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'out'), teacher_weights=str(weights), **TOY)
    assert (plan.teacher.num_classes, plan.teacher.in_chans) == (10, 1)  # read from the file
    assert not plan.teacher_trained_here
    teacher = distill.load_teacher(plan.teacher)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert f'--teacher-weights {weights.resolve()}' in plan.command
    kwargs = build_configs(plan, plan.teacher.model)['distill']['models']['model']['kwargs']['teacher']
    assert kwargs['checkpoint'] == str(weights.resolve())
    summary = report_distill(plan, train_distill(plan, device='cpu'), train_seconds=0.0, latency_repeats=1)
    model.eval()
    assert summary['test_acc']['teacher'] == pytest.approx(
        top1_accuracy(model, build_configs(plan, plan.teacher.model)['distill']['datasets']['test']))
    assert summary['teacher_origin'] == f'resnet20_cifar loaded from {weights.resolve()}'
    assert f'--teacher-weights {weights.resolve()}' in (tmp_path / 'out' / 'model' / 'README.md').read_text()

    # weights for other classes: re-initialised and fine-tuned, the file's classifier left out
    other, _, _ = _timm_train_checkpoint(tmp_path / 'five', num_classes=5)
    assert main(['convert-checkpoint', str(other), str(tmp_path / 'five.safetensors')]) == 0
    plan = plan_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'out5'),
                        teacher_weights=str(tmp_path / 'five.safetensors'), num_classes=10, **TOY)
    assert plan.teacher.num_classes == 5 and plan.teacher_trained_here
    teacher_kwargs = build_configs(plan, plan.teacher.model)['teacher']['models']['model']['kwargs']
    assert teacher_kwargs['reset_head'] and teacher_kwargs['num_classes'] == 10
    assert distill.build_model(teacher_kwargs).fc.out_features == 10


@pytest.mark.parametrize('teacher, weights, message', [
    ('resnet20_cifar.nope', 'good', r"resnet20_cifar has no pretrained tag 'nope'"),
    ('resnet20_cifar', 'missing', r'--teacher-weights .*missing\.safetensors: no such file'),
    ('resnet20_cifar', 'resnet32', r'--teacher-weights .*resnet32\.safetensors does not load into resnet20_cifar: .*'
                                   r'unexpected'),
    ('resnet20_cifar', 'nostem', r'--teacher-weights .*nostem\.safetensors has no conv1\.weight: not the weights '
                                 r'of resnet20_cifar'),
    ('resnet20_cifar', 'nohead', r'Teacher resnet20_cifar has no classifier, but the data sklearn:digits has 10 '
                                 r'labels\. Pass --num-classes 10'),
    ('resnet20_cifar', 'text', r'--teacher-weights .*text\.safetensors cannot be read as safetensors'),
    ('deit_tiny_distilled_patch16_224', 'good', r'is a transformer'),  # refused as TEACHER alone is, first
])
def test_bad_teacher_weights_are_refused_before_anything_is_written(tmp_path, teacher, weights, message):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    files = dict(good=timm.create_model('resnet20_cifar', num_classes=10, in_chans=1).state_dict(),
                 resnet32=timm.create_model('resnet32_cifar', num_classes=10, in_chans=1).state_dict())
    files['nohead'] = {k: v for k, v in files['good'].items() if not k.startswith('fc.')}
    files['nostem'] = {k: v for k, v in files['good'].items() if not k.startswith('conv1.')}
    path = tmp_path / f'{weights}.safetensors'
    if weights == 'text':
        path.write_text('not safetensors')
    elif weights in files:
        save_file({k: v.contiguous() for k, v in files[weights].items()}, str(path))
    with pytest.raises(DistillError, match=message):
        run_distill(teacher, 'sklearn:digits', str(tmp_path / 'out'), teacher_weights=str(path), **TOY)
    assert not (tmp_path / 'out').exists()


def test_teacher_weights_go_with_a_bare_architecture_only(tmp_path):
    folder = _hub_teacher(tmp_path, 10)
    with pytest.raises(DistillError, match=r'--teacher-weights .*: TEACHER .* has weights of its own\. Give the bare '
                                           r'architecture \(resnet20_cifar\)'):
        plan_distill(str(folder), 'sklearn:digits', str(tmp_path / 'out'),
                     teacher_weights=str(folder / 'model.safetensors'), **TOY)


def test_a_headless_weights_file_is_given_a_classifier_for_the_data(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    backbone = timm.create_model('resnet20_cifar', num_classes=0, in_chans=1)
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(tmp_path / 'backbone.safetensors'))
    plan = plan_distill('resnet20_cifar', 'sklearn:digits', str(tmp_path / 'out'), num_classes=10,
                        teacher_weights=str(tmp_path / 'backbone.safetensors'), **TOY)
    assert plan.teacher.num_classes == 0 and plan.reinit_head and plan.teacher_trained_here
    kwargs = build_configs(plan, plan.teacher.model)['teacher']['models']['model']['kwargs']
    teacher = distill.build_model(kwargs)  # the backbone's weights, a new 10-class classifier
    assert teacher.fc.out_features == 10 and torch.equal(teacher.conv1.weight, backbone.conv1.weight)
