"""The weight average of the deployed twin (runner.ema_decay, jointrd_timm.training.ema): its values by hand, its
start when the last shortcut is gone, what the runner deploys and saves, its resume, and the errors."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import jointrd_timm  # noqa: F401
from conftest import tiny_yaml
from jointrd_timm import faults
from jointrd_timm.io import load_weights
from jointrd_timm.recipes import DEFAULT_RECIPE, SCHEDULES, Schedule
from jointrd_timm.training.ema import TwinEma
from jointrd_timm.training.runner import ConfigError, RunFolderError, load_config, train
from jointrd_timm.twins.fade import set_shortcut_scale, shortcut_scales

FADE = ['models.model.kwargs.student.shortcut_fade=true', 'models.model.kwargs.jointrd.shortcut_fade=0.5',
        'models.model.kwargs.init_student_from_teacher=true']


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}


def _nudge(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(torch.randn(m.running_mean.shape, generator=generator))
    return _state(model)


def _assert_state(ema, expected):
    state = ema.module.state_dict()
    for key, value in expected.items():
        assert torch.allclose(state[key], value, atol=1e-6), key


def test_the_average_is_the_twin_while_it_fades_then_timms_warmup_average_of_its_shortcut_free_steps():
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True)
    ema = TwinEma(twin, decay=0.9)
    set_shortcut_scale(twin, 0.5)
    _assert_state(ema, _state(twin))
    ema.step()
    before = _state(twin)
    _nudge(twin, 0)
    _assert_state(ema, before)  # a step the average has not seen yet is not in it
    ema.step()
    _assert_state(ema, _state(twin))  # a fading twin: copied, whatever the decay
    set_shortcut_scale(twin, [0.0] * 8 + [0.1])  # one block still has its shortcut: still copied
    w = _nudge(twin, 1)
    ema.step()
    _assert_state(ema, w)
    assert ema.steps == 0 and shortcut_scales(ema.module) == [0.0] * 8 + [pytest.approx(0.1)]  # s is not in the state
    set_shortcut_scale(twin, 0.0)
    w1 = _nudge(twin, 2)
    ema.step()  # the first shortcut-free step: the average starts as the twin
    _assert_state(ema, w1)
    w2 = _nudge(twin, 3)
    ema.step()  # timm's warmup: decay 1 - (1 + 1) ** (-2/3) after one averaged step, capped at 0.9
    d2 = 1 - 2 ** (-2 / 3)
    avg = {k: d2 * w1[k] + (1 - d2) * w2[k] for k in w1}
    _assert_state(ema, avg)
    w3 = _nudge(twin, 4)
    ema.step()
    d3 = 1 - 3 ** (-2 / 3)
    _assert_state(ema, {k: d3 * avg[k] + (1 - d3) * w3[k] for k in w1})
    assert ema.steps == 3 and 0.3 < d2 < d3 < 0.9
    # without warmup the decay is the given one from the second averaged step on
    flat = TwinEma(twin, decay=0.9, warmup=False)
    before = _state(twin)
    flat.step()
    after = _nudge(twin, 5)
    flat.step()
    _assert_state(flat, {k: 0.9 * before[k] + 0.1 * after[k] for k in before})


def test_a_model_without_fading_shortcuts_is_averaged_from_its_first_step():
    model = timm.create_model('resnet20_cifar', num_classes=10)
    ema = TwinEma(model, decay=0.5, warmup=False)
    w0 = _state(model)
    ema.step()
    w1 = _nudge(model, 0)
    ema.step()
    _assert_state(ema, {k: 0.5 * w0[k] + 0.5 * w1[k] for k in w0})
    assert ema.steps == 2
    with pytest.raises(ValueError, match=r'runner.ema_decay must be a number in \[0, 1\)'):
        TwinEma(model, decay=1.0)
    with pytest.raises(ValueError, match='runner.ema_warmup must be true or false'):
        TwinEma(model, decay=0.5, warmup='yes')


def test_the_runner_deploys_and_saves_the_average_and_keeps_the_trained_twins_accuracy(tmp_path):
    config = load_config(tiny_yaml(tmp_path, epochs=2, limit=64), FADE + ['runner.ema_decay=0.9'])
    final = train(config, output_dir=str(tmp_path / 'run'), device='cpu')
    # 64 images at batch 16: 4 steps an epoch; the fade over half of 2 epochs reaches 0 at step 4 of 8, so the
    # last 4 optimizer steps are averaged
    assert final['ema_steps'] == 4
    assert {'test_acc_deployed', 'test_acc_deployed_without_ema', 'val_acc_ema', 'bn_recalibrated_batches'} <= set(final)
    assert final['test_acc_folded'] == final['test_acc_deployed']
    saved = load_weights(timm.create_model('plain_resnet20_cifar', num_classes=10, in_chans=1),
                         tmp_path / 'run' / 'model').state_dict()
    checkpoint = load_file(str(tmp_path / 'run' / 'last.safetensors'))
    average = {k[len('module.ema.'):]: v for k, v in checkpoint.items() if k.startswith('module.ema.')}
    trained = {k[len('model.student.'):]: v for k, v in checkpoint.items() if k.startswith('model.student.')}
    convs = [k for k in saved if k.endswith('conv1.weight') or k.endswith('conv2.weight')]
    assert len(convs) == 19
    for key in convs:  # the saved twin is the average (its BN statistics recomputed), not the trained twin
        assert torch.equal(saved[key], average[key]), key
    assert max(float((saved[k] - trained[k]).abs().max()) for k in convs) > 1e-4
    assert json.loads((tmp_path / 'run' / 'final.json').read_text())['ema_steps'] == 4


def test_an_interrupted_run_resumes_its_average_exactly(tmp_path, monkeypatch):
    yaml = tiny_yaml(tmp_path, epochs=3, limit=64)
    overrides = FADE + ['runner.ema_decay=0.8', 'models.model.kwargs.jointrd.shortcut_fade=0.3']
    full = train(load_config(yaml, overrides), output_dir=str(tmp_path / 'full'), device='cpu')
    faults._arrivals.clear()
    monkeypatch.setenv(faults.ENV, 'checkpoint_write:3:enospc')  # epochs 1 and 2 saved, epoch 3's write fails
    with pytest.raises(RunFolderError, match='The previous checkpoint'):
        train(load_config(yaml, overrides), output_dir=str(tmp_path / 'cut'), device='cpu')
    monkeypatch.delenv(faults.ENV)
    resumed = train(load_config(yaml, overrides), output_dir=str(tmp_path / 'cut'), device='cpu', resume=True)
    assert resumed['ema_steps'] == full['ema_steps'] > 4
    a, b = (load_file(str(tmp_path / run / 'last.safetensors')) for run in ('full', 'cut'))
    keys = [k for k in a if k.startswith('module.ema.')]
    assert keys and max(float((a[k].float() - b[k].float()).abs().max()) for k in keys) < 1e-5
    assert resumed['test_acc_deployed'] == pytest.approx(full['test_acc_deployed'])


def test_resuming_with_an_average_a_run_saved_without_one_says_so(tmp_path, monkeypatch):
    from jointrd_timm import faults
    from jointrd_timm.training.run_folder import RunFolderError
    yaml = tiny_yaml(tmp_path, epochs=2, limit=32)
    faults._arrivals.clear()
    monkeypatch.setenv(faults.ENV, 'checkpoint_write:2:enospc')  # cut after its first epoch's checkpoint
    with pytest.raises(RunFolderError):
        train(load_config(yaml, FADE), output_dir=str(tmp_path / 'run'), device='cpu')
    monkeypatch.delenv(faults.ENV)
    faults._arrivals.clear()
    with pytest.raises(Exception, match="holds no state for 'ema'"):
        train(load_config(yaml, FADE + ['runner.ema_decay=0.9']), output_dir=str(tmp_path / 'run'), device='cpu',
              resume=True)


def test_bad_settings_are_refused_where_they_are_given(tmp_path):
    yaml = tiny_yaml(tmp_path)
    for bad in ('1.0', '-0.1', 'true', 'fast'):
        with pytest.raises(ConfigError, match=r'runner.ema_decay must be a number in \[0, 1\)'):
            load_config(yaml, [f'runner.ema_decay={bad}'])
    with pytest.raises(ConfigError, match='runner.ema_warmup must be true or false'):
        load_config(yaml, ['runner.ema_warmup=3'])
    with pytest.raises(ValueError, match=r'Schedule.ema_decay must be a number in \[0, 1\)'):
        Schedule('x', epochs=1, batch_size=8, lr=0.1, weight_decay=0.0, ema_decay=1)
    with pytest.raises(ValueError, match=r"Recipe 'default': ema_decay must be"):
        DEFAULT_RECIPE.replace(ema_decay=2)


def test_a_recipes_average_reaches_the_runner_section_of_its_twins_config():
    from jointrd_timm.training.configs import build_config
    recipe = DEFAULT_RECIPE.replace(ema_decay=0.99)
    schedule = recipe.twin_schedule(SCHEDULES['cpu-budget'])
    assert schedule.ema_decay == 0.99 and recipe.id == 'default,ema_decay=0.99'
    model = recipe.jointrd_model('resnet20_cifar', None, schedule, num_classes=10)
    data = dict(train=[], test=[])
    assert build_config(data, model, schedule, 'jointrd')['runner']['ema_decay'] == 0.99
    assert 'ema_decay' not in build_config(data, model, SCHEDULES['cpu-budget'], 'jointrd')['runner']
    # the teacher's schedule is not the twin's: a recipe's average is the twin's only
    assert DEFAULT_RECIPE.twin_schedule(SCHEDULES['cpu-budget']).ema_decay == 0.0


def test_with_gradient_accumulation_the_average_follows_the_optimizers_real_steps(tmp_path):
    """64 images at batch 24: 3 batches an epoch, an optimizer step every 2 batches counted across epochs (as
    torchdistill counts them), so steps fall mid-epoch: the average must take the steps the optimizer took, and
    its last copy must be of the twin without shortcuts."""
    overrides = FADE + ['runner.ema_decay=0.9', 'train.train_data_loader.kwargs.batch_size=24',
                        'train.optimizer.grad_accum_step=2']
    config = load_config(tiny_yaml(tmp_path, epochs=2, limit=64), overrides)
    final = train(config, output_dir=str(tmp_path / 'run'), device='cpu')
    # 6 batches, optimizer steps after batches 2, 4 and 6; the fade (half of the 6 forwards) ends at batch 3
    assert final['ema_steps'] == 2
