"""A resumed run keeps the schedules its checkpoint was trained with: a method's run-length schedules (the fade,
eta's horizon) refuse another length before the folder changes; an LR scheduler's place is restored while its
schedule is the config's (LambdaLR keeps its functions); a fading twin nothing fades is refused before training."""
import json

import pytest
import torch

from conftest import tiny_yaml
from jointrd_timm.training.checkpoint import restore_progress
from jointrd_timm.training.runner import ConfigError, load_config, train


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_a_run_with_a_run_length_schedule_resumed_at_another_length_is_refused_and_kept(tmp_path):
    path = tiny_yaml(tmp_path, epochs=1, limit=32, extra_jointrd=', eta_horizon_fraction: 0.5')
    out = tmp_path / 'out'
    config = load_config(path, [f'runner.output_dir={out}'])
    final = train(config, device='cpu')
    before = _files(out)
    with pytest.raises(ConfigError, match=r'was trained as a run of 1 epoch\(s\), and eta \(eta_horizon_fraction\) is '
                                          r'laid out over them: resuming it as a run of 2 would move it .*Resume with '
                                          r'train.num_epochs=1'):
        train(load_config(path, [f'runner.output_dir={out}', 'train.num_epochs=2']), resume=True, device='cpu')
    assert _files(out) == before  # the finished run's final.json and model/ are still its result
    assert train(load_config(path, [f'runner.output_dir={out}']), resume=True, device='cpu') == final


def test_a_scheduler_resumes_its_place_in_the_schedule_the_config_gives():
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    # a 4-epoch cosine stopped after 2 epochs, resumed as an 8-epoch run: the optimizer's lr and the scheduler's
    # place come back, the schedule is the new config's, so the lr decays to 0 at the new end, never back up
    short = torch.optim.lr_scheduler.CosineAnnealingLR(opt := optimizer(), T_max=4)
    for _ in range(2):
        opt.step()
        short.step()
    saved = json.loads(json.dumps(short.state_dict()))
    longer = torch.optim.lr_scheduler.CosineAnnealingLR(opt2 := optimizer(), T_max=8)
    opt2.load_state_dict(opt.state_dict())
    restore_progress(longer, saved)
    assert longer.T_max == 8 and longer.last_epoch == 2 and longer.base_lrs == [0.1]
    lrs = [opt2.param_groups[0]['lr']]
    for _ in range(6):
        opt2.step()
        longer.step()
        lrs.append(opt2.param_groups[0]['lr'])
    assert lrs[0] == pytest.approx(0.05) and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] == pytest.approx(0)

    # a LambdaLR (torchdistill's poly_lr_scheduler is one) keeps its function: saved as None
    poly = torch.optim.lr_scheduler.LambdaLR(opt4 := optimizer(), lambda epoch: (1 - epoch / 10) ** 0.9)
    for _ in range(3):
        opt4.step()
        poly.step()
    again = torch.optim.lr_scheduler.LambdaLR(opt5 := optimizer(), lambda epoch: (1 - epoch / 10) ** 0.9)
    restore_progress(again, json.loads(json.dumps(poly.state_dict())))
    opt4.step()
    poly.step()
    opt5.step()
    again.step()
    assert opt5.param_groups[0]['lr'] == pytest.approx(opt4.param_groups[0]['lr']) and again.last_epoch == 4


def test_a_fading_twin_that_nothing_fades_is_refused_before_training(tmp_path):
    path = tiny_yaml(tmp_path, method='ce', epochs=1, limit=16)
    config = load_config(path, ['models.model.kwargs.shortcut_fade=true', f'runner.output_dir={tmp_path / "out"}'])
    with pytest.raises(ConfigError, match=r'models.model: the model is a fading twin \(shortcut_fade: true\), and a '
                                          r'plain training run never fades its shortcuts'):
        train(config, device='cpu')
    assert not (tmp_path / 'out' / 'last.safetensors').exists()


def test_a_multi_stage_run_resumed_at_its_end_is_back_in_its_last_stage():
    """Killed between its last checkpoint and final.json, a two-stage run resumes in stage 2 (whose optimizer the
    checkpoint holds), as torchdistill leaves it: it advances at a stage's end only while epochs remain."""
    from types import SimpleNamespace
    from jointrd_timm.training.runner import _advance_stages

    class Box:
        num_epochs, stage_number, stage_end_epoch, current_epoch = 4, 1, 2, 0
        optimizer = lr_scheduler = None

        def advance_to_next_stage(self):
            self.stage_number += 1
            self.stage_end_epoch += 2

    for done, stage in ((0, 1), (1, 1), (2, 2), (3, 2), (4, 2)):
        run = SimpleNamespace(box=Box(), optimizers={}, schedulers={})
        _advance_stages(run, done)
        assert (run.box.stage_number, run.box.current_epoch) == (stage, done), done


def test_export_names_a_folder_by_its_own_name(tmp_path, monkeypatch):
    from jointrd_timm.cli import _export_name
    (tmp_path / 'my-twin').mkdir()
    monkeypatch.chdir(tmp_path / 'my-twin')
    assert [_export_name(spec) for spec in ('.', './', f'local-dir:{tmp_path / "my-twin"}/', '../my-twin')] == \
        ['my-twin'] * 4
    assert _export_name('hf-hub:org/plain_x.tag') == 'plain_x.tag' and _export_name('plain_resnet20_cifar') == \
        'plain_resnet20_cifar'


@pytest.mark.slow  # three tiny JointRD runs (about 20 s); the default suite stays under 10 minutes on 2 cores
def test_a_run_killed_during_its_final_save_deploys_the_same_twin_after_resume(tmp_path, monkeypatch):
    """The BN recalibration of a fading twin draws the batches of the run's end (here 1 of 4: which one depends on
    the shuffle), also in a process resumed straight into the final save: the deployed weights are the same."""
    from safetensors.torch import load_file
    from jointrd_timm import faults
    overrides = ['models.model.kwargs.student.shortcut_fade=true', 'models.model.kwargs.jointrd.shortcut_fade=0.5',
                 'models.model.kwargs.init_student_from_teacher=true', 'runner.recalibrate_bn=1']
    path = tiny_yaml(tmp_path, epochs=2, limit=64)
    full = train(load_config(path, overrides), output_dir=str(tmp_path / 'full'), device='cpu')
    faults._arrivals.clear()
    monkeypatch.setenv(faults.ENV, 'final_save:1:enospc')  # model/ written, final.json not yet
    with pytest.raises(OSError):
        train(load_config(path, overrides), output_dir=str(tmp_path / 'cut'), device='cpu')
    monkeypatch.delenv(faults.ENV)
    faults._arrivals.clear()
    resumed = train(load_config(path, overrides), output_dir=str(tmp_path / 'cut'), device='cpu', resume=True)
    a, b = (load_file(str(tmp_path / run / 'model' / 'model.safetensors')) for run in ('full', 'cut'))
    assert resumed['bn_recalibrated_batches'] == full['bn_recalibrated_batches'] == 1
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed['test_acc_deployed'] == full['test_acc_deployed']


def test_a_one_cycle_or_sequential_schedule_resumes_its_place_in_the_configs_schedule():
    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    def lrs(opt, scheduler, steps):
        out = []
        for _ in range(steps):
            opt.step()
            scheduler.step()
            out.append(opt.param_groups[0]['lr'])
        return out

    # OneCycleLR (closed form): after the resume, exactly the 20-step schedule's lrs
    short = torch.optim.lr_scheduler.OneCycleLR(opt := optimizer(), 0.1, total_steps=10)
    lrs(opt, short, 5)
    longer = torch.optim.lr_scheduler.OneCycleLR(opt2 := optimizer(), 0.1, total_steps=20)
    opt2.load_state_dict(opt.state_dict())
    restore_progress(longer, json.loads(json.dumps(short.state_dict())))
    reference = torch.optim.lr_scheduler.OneCycleLR(opt3 := optimizer(), 0.1, total_steps=20)
    lrs(opt3, reference, 5)
    assert lrs(opt2, longer, 14) == pytest.approx(lrs(opt3, reference, 14))

    # SequentialLR: its schedulers' place comes back, their schedules (the cosine's T_max) are the config's: the lr
    # decays to 0 at the new end, never back up
    def sequential(o, n):
        return torch.optim.lr_scheduler.SequentialLR(o, [
            torch.optim.lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=n - 2)], milestones=[2])
    short = sequential(opt := optimizer(), 10)
    lrs(opt, short, 5)
    longer = sequential(opt2 := optimizer(), 20)
    opt2.load_state_dict(opt.state_dict())
    restore_progress(longer, json.loads(json.dumps(short.state_dict())))
    assert longer._schedulers[1].T_max == 18 and longer.last_epoch == 5 and longer._schedulers[1].last_epoch == 3
    after = lrs(opt2, longer, 15)
    assert all(a > b for a, b in zip(after[:-1], after[1:])) and after[-1] == pytest.approx(0, abs=1e-9)
