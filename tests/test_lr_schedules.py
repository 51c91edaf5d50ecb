"""The twin's lr shape (Recipe.lr_hold -> Schedule decay 'hold-cosine' -> HoldCosineLR, stepped per optimizer
step): values, the recipe and config plumbing, a run's lr per epoch, and a resume that continues it exactly."""
import json
import math

import pytest
import torch

from conftest import tiny_yaml
from jointrd_timm import faults
from jointrd_timm.recipes import DEFAULT_RECIPE, SCHEDULES, Schedule, get_recipe
from jointrd_timm.training.configs import build_config
from jointrd_timm.methods.lr_schedules import HoldCosineLR, hold_cosine_factor, set_scheduler_run_length
from jointrd_timm.training.runner import load_config, train

MODEL = dict(key='jointrd_model', kwargs=dict(teacher=dict(model_name='resnet20_cifar', num_classes=10)))


def optimizer(lr=0.5):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_the_factor_holds_the_peak_then_falls_by_a_cosine_to_zero():
    assert [hold_cosine_factor(t, 10, 4) for t in (0, 1, 4)] == [1.0, 1.0, 1.0]
    assert hold_cosine_factor(7, 10, 4) == pytest.approx(0.5)  # half-way through the 6 decay steps
    assert hold_cosine_factor(5, 10, 4) == pytest.approx((1 + math.cos(math.pi / 6)) / 2)
    assert hold_cosine_factor(10, 10, 4) == pytest.approx(0.0, abs=1e-12)
    assert hold_cosine_factor(12, 10, 4) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    assert hold_cosine_factor(5, 10, 0) == pytest.approx(0.5)  # no hold: a per-step cosine over the run


def test_the_scheduler_gives_the_closed_form_each_step_and_continues_exactly_from_its_state():
    opt = optimizer(0.5)
    sched = HoldCosineLR(opt, hold=0.25, epochs=2, batches_per_epoch=6)  # 12 steps, the first 3 at the peak
    lrs = [opt.param_groups[0]['lr']]
    for _ in range(12):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs == pytest.approx([0.5 * hold_cosine_factor(t, 12, 3) for t in range(13)])
    assert lrs[:4] == [0.5] * 4 and lrs[4] < 0.5 and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    # a checkpoint's round trip (the runner stores the state dict as JSON and puts it back in __dict__)
    opt2 = optimizer(0.5)
    first = HoldCosineLR(opt2, hold=0.25, epochs=2, batches_per_epoch=6)
    for _ in range(5):
        opt2.step()
        first.step()
    state = json.loads(json.dumps(first.state_dict()))
    opt3 = optimizer(0.5)
    restored = HoldCosineLR(opt3, hold=0.25, epochs=2)  # built as the runner builds it, then the checkpoint
    opt3.load_state_dict(opt2.state_dict())
    restored.__dict__.update(state)  # the run length comes back with the state
    assert opt3.param_groups[0]['lr'] == pytest.approx(lrs[5])
    rest = []
    for _ in range(7):
        opt3.step()
        restored.step()
        rest.append(opt3.param_groups[0]['lr'])
    assert rest == pytest.approx(lrs[6:])


def test_the_scheduler_refuses_bad_arguments_and_a_step_before_it_knows_the_run_length():
    with pytest.raises(ValueError, match=r'hold must be a fraction of the run in \[0, 1\).*got 1'):
        HoldCosineLR(optimizer(), hold=1, epochs=3)
    with pytest.raises(ValueError, match='epochs must be a positive integer, got 0'):
        HoldCosineLR(optimizer(), hold=0.5, epochs=0)
    sched = HoldCosineLR(optimizer(), hold=0.5, epochs=3)
    with pytest.raises(RuntimeError, match=r'before it knew the run length: call set_run_length'):
        sched.step()
    with pytest.raises(ValueError, match='batches_per_epoch must be a positive integer, got 0'):
        sched.set_run_length(0)
    with pytest.raises(ValueError, match='grad_accum_steps must be a positive integer, got 0'):
        sched.set_run_length(4, 3, 0)


def test_the_run_length_is_the_runs_optimizer_steps_and_other_schedulers_are_left_alone():
    sched = HoldCosineLR(optimizer(), hold=0.5, epochs=3)
    set_scheduler_run_length(sched, 10, 3, grad_accum_steps=4)
    assert sched.total_steps == 7  # 30 batches over the run (counted across epochs), an optimizer step every 4
    set_scheduler_run_length(sched, 10, 5)  # a run resumed with more epochs decays over its new length
    assert sched.epochs == 5 and sched.total_steps == 50
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer(), T_max=3)
    set_scheduler_run_length(cosine, 10, 3)
    assert not hasattr(cosine, 'batches_per_epoch')
    set_scheduler_run_length(None, 10, 3)  # a run without a scheduler


def test_a_hold_near_one_still_decays_at_the_last_step():
    opt = optimizer(1.0)
    sched = HoldCosineLR(opt, hold=0.9, epochs=1, batches_per_epoch=4)  # round(0.9 * 4) would hold all 4 steps
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]['lr'] == pytest.approx(0.0, abs=1e-12)


def test_jointrd_pre_epoch_process_tells_the_scheduler_the_run_length():
    from types import SimpleNamespace

    from jointrd_timm.integrations.torchdistill import jointrd_pre_epoch_process
    sched = HoldCosineLR(optimizer(), hold=0.5, epochs=1)
    box = SimpleNamespace(model=torch.nn.Linear(2, 2), model_io_dict={}, distributed=False, lr_scheduler=sched,
                          train_data_loader=[0] * 12, num_epochs=3, grad_accum_step=2)
    jointrd_pre_epoch_process(box, epoch=0)
    assert (sched.batches_per_epoch, sched.epochs, sched.total_steps) == (12, 3, 18)


def test_lr_hold_gives_the_twin_a_hold_cosine_schedule_and_the_config_its_per_step_scheduler():
    recipe = DEFAULT_RECIPE.replace(lr_hold=0.8, lr_scale=0.2)
    assert recipe.id == 'default,lr_hold=0.8,lr_scale=0.2' and get_recipe(recipe.id).lr_hold == 0.8
    teacher_run = SCHEDULES['cifar'].for_run(4)
    twin_run = recipe.twin_schedule(teacher_run)
    assert (twin_run.decay, twin_run.hold, twin_run.lr, twin_run.epochs) == ('hold-cosine', 0.8, 0.02, 4)
    assert twin_run.for_run(8).decay == 'hold-cosine' and twin_run.for_run(8).hold == 0.8
    config = build_config(dict(train='A', test='B', val='B'), MODEL, twin_run, 'jointrd')
    assert config['train']['scheduler'] == dict(key='HoldCosineLR', kwargs=dict(hold=0.8, epochs=4),
                                                scheduling_step=1)
    assert config['train']['pre_epoch_process'] == 'jointrd_pre_epoch_process'
    # a terse cross-entropy config of a hold-cosine run names the pre-epoch process that gives the run length
    timm_model = dict(key='timm_model', kwargs=dict(model_name='resnet20_cifar', num_classes=10))
    terse = build_config(dict(train='A', test='B'), timm_model, twin_run, 'ce', terse=True)
    assert terse['train']['pre_epoch_process'] == 'jointrd_pre_epoch_process'
    assert 'pre_epoch_process' not in build_config(dict(train='A', test='B'), timm_model, teacher_run, 'ce',
                                                   terse=True)['train']
    # no hold: the schedule's own decay, the multistep of the reference included
    assert DEFAULT_RECIPE.twin_schedule(SCHEDULES['cifar']).decay == 'multistep'
    for bad in (-0.1, 1.0, True, 'half'):
        with pytest.raises(ValueError, match=r'lr_hold must be a fraction of the run in \[0, 1\)'):
            DEFAULT_RECIPE.replace(lr_hold=bad)
    with pytest.raises(ValueError, match="read by decay 'hold-cosine' only; got hold=0.5 with decay 'cosine'"):
        Schedule('x', epochs=2, batch_size=8, lr=0.1, weight_decay=0.0, hold=0.5)


def _hold_config(tmp_path, epochs=3):
    config = load_config(tiny_yaml(tmp_path, epochs=epochs, limit=64, batch_size=16))  # 4 steps per epoch
    config['train']['scheduler'] = dict(key='HoldCosineLR', kwargs=dict(hold=0.25, epochs=epochs), scheduling_step=1)
    return config


def _lrs(folder):
    return [json.loads(line)['lr'] for line in (folder / 'metrics.jsonl').read_text().splitlines()]


def test_a_run_steps_the_lr_per_step_and_a_resumed_run_continues_it(tmp_path, monkeypatch):
    full = _hold_config(tmp_path / 'full')
    peak = full['train']['optimizer']['kwargs']['lr']
    train(full, device='cpu')
    expected = [peak * hold_cosine_factor(4 * e, 12, 3) for e in (1, 2, 3)]  # the lr after each epoch's 4 steps
    assert _lrs(tmp_path / 'full' / 'out') == pytest.approx(expected)
    # interrupted in epoch 2 (step 6), resumed from the epoch-1 checkpoint: the same lr sequence and weights
    cut = _hold_config(tmp_path / 'cut')
    monkeypatch.setattr(faults, '_arrivals', {})
    monkeypatch.setenv(faults.ENV, 'step:6:enospc')
    with pytest.raises(OSError, match='No space left on device'):
        train(cut, device='cpu')
    monkeypatch.delenv(faults.ENV)
    train(cut, resume=True, device='cpu')
    assert _lrs(tmp_path / 'cut' / 'out') == pytest.approx(expected)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / 'full' / 'out' / 'model' / 'model.safetensors'))
    b = load_file(str(tmp_path / 'cut' / 'out' / 'model' / 'model.safetensors'))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
