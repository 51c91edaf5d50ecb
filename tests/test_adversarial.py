"""The adversarial KD methods: discriminator semantics, losses by hand, alternating updates, resume, runner."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import jointrd_timm  # noqa: F401
from conftest import tiny_yaml, torchrun
from jointrd_timm.methods.adversarial import (FAKE, REAL, AdversarialPortableStudent, ConditionalAdversarialKD,
                                              LogitDiscriminator, conditional_discriminator_loss,
                                              conditional_student_loss)
from jointrd_timm.training.checkpoint import load_checkpoint
from jointrd_timm.training.runner import load_config, train


def test_logit_discriminator_shapes_and_structure():
    d = LogitDiscriminator(10, depth=3, dropout=0.3)
    cls, adv = d(torch.randn(5, 10))
    assert cls.shape == (5, 10) and adv.shape == (5, 2)
    assert len(d.blocks) == 3 and d.head.out_features == 12
    block = d.blocks[0].body
    kinds = (torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear, torch.nn.Dropout)
    assert len(block) == 4 and all(isinstance(m, kind) for m, kind in zip(block, kinds)) and block[3].p == 0.3
    d.eval()
    x = torch.randn(3, 10)
    # identity skip: with the residual body zeroed, the blocks pass the normalised input through unchanged
    for b in d.blocks:
        torch.nn.init.zeros_(b.body[2].weight), torch.nn.init.zeros_(b.body[2].bias)
    assert torch.allclose(d.blocks(d.input_norm(x)), d.input_norm(x))


def _fixed():
    torch.manual_seed(0)
    cls_t, adv_t, cls_s, adv_s = (torch.randn(4, 3), torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, 2))
    y = torch.tensor([0, 1, 2, 1])
    return (cls_t, adv_t), (cls_s, adv_s), y


def _log_softmax_at(logits, index):
    return torch.log_softmax(logits, 1)[torch.arange(len(index)), index]


def test_discriminator_loss_by_hand():
    (cls_t, adv_t), (cls_s, adv_s), y = _fixed()
    real, fake = torch.full_like(y, REAL), torch.full_like(y, FAKE)
    l_a = (_log_softmax_at(adv_t, real) + _log_softmax_at(adv_s, fake)).mean()
    l_ds = (_log_softmax_at(cls_t, y) + _log_softmax_at(cls_s, y)).mean()
    assert conditional_discriminator_loss((cls_t, adv_t), (cls_s, adv_s), y).item() == pytest.approx(
        (-0.5 * (l_a + l_ds)).item(), rel=1e-6)


@pytest.mark.parametrize('non_saturating', [False, True])
def test_student_loss_by_hand(non_saturating):
    (cls_t, adv_t), (cls_s, adv_s), y = _fixed()
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    real, fake = torch.full_like(y, REAL), torch.full_like(y, FAKE)
    l_s = -_log_softmax_at(s, y).mean()
    l_l1 = sum(abs(s[i, j] - t[i, j]) for i in range(4) for j in range(3)) / 4
    fake_term = -_log_softmax_at(adv_s, real) if non_saturating else _log_softmax_at(adv_s, fake)
    l_a = (_log_softmax_at(adv_t, real) + fake_term).mean()
    l_ds = (_log_softmax_at(cls_t, y) + _log_softmax_at(cls_s, y)).mean()
    expected = l_s + l_l1 + 0.5 * (l_a - l_ds)
    got = conditional_student_loss(s, t, (cls_t, adv_t), (cls_s, adv_s), y, non_saturating)
    assert got['loss'].item() == pytest.approx(expected.item(), rel=1e-5)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


@pytest.mark.parametrize('method', ['cakd', 'aps'])
def test_alternating_step_updates_each_side_only_in_its_own_step(method):
    torch.manual_seed(0)
    teacher, student = timm.create_model('resnet20_cifar', num_classes=10), timm.create_model('plain_resnet20_cifar', num_classes=10)
    model = ConditionalAdversarialKD(student, teacher, 10) if method == 'cakd' else \
        AdversarialPortableStudent(student, teacher, label_head=True)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert not any(p.requires_grad for p in model.adversarial.parameters())  # D never in the student's optimizer
    d, t, s = (_snapshot(m) for m in (model.adversarial, model.teacher, model.student))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = model(x, y)  # the discriminator's step happens here
    d_params = [k for k in _changed(d, model.adversarial) if 'running' not in k and 'num_batches' not in k]
    assert d_params, 'D did not move in its step'
    assert [k for k in _changed(s, model.student) if 'running' not in k and 'num_batches' not in k] == []
    d = _snapshot(model.adversarial)
    s_bn = _snapshot(model.student)
    out['loss'].backward()
    optimizer.step()
    assert _changed(d, model.adversarial) == []  # the student's step never moves D
    assert _changed(s_bn, model.student), 'the student did not move in its step'
    assert _changed(t, model.teacher) == []  # and the teacher never changes


@pytest.mark.parametrize('method', ['cakd', 'aps', 'jointrd-adv'])
def test_runner_trains_and_resume_restores_both_optimizers(method, tmp_path):
    config = tiny_yaml(tmp_path, method=method, epochs=1, limit=32)
    train(load_config(config), device='cpu')
    ckpt = tmp_path / 'out' / 'last.safetensors'
    with safe_open(str(ckpt), 'pt') as f:
        keys = list(f.keys())
    assert any(k.startswith('optimizer.discriminator.') for k in keys)
    assert any(k.startswith('optimizer.model.') for k in keys)
    # a fresh model and fresh optimizers get exactly the saved state back
    from jointrd_timm.training.runner import _build_model
    cfg = load_config(config)
    model = _build_model(cfg['models']['model'])
    student_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    model.adversarial.set_epoch(2)  # move the fresh schedule away from the saved one (epoch 0 of 1)
    base_lr = 0.01 if method != 'jointrd-adv' else 0.001
    assert model.adversarial.optimizer.param_groups[0]['lr'] == pytest.approx(base_lr * 0.1)
    state = load_checkpoint(ckpt, model, {'model': student_opt, **model.extra_optimizers()},
                            model.extra_schedulers())
    assert state['epoch'] == 0
    with safe_open(str(ckpt), 'pt') as f:
        for index, p in enumerate(model.adversarial.discriminator.parameters()):
            saved = f.get_tensor(f'optimizer.discriminator.{index}.momentum_buffer')
            assert torch.equal(model.adversarial.optimizer.state[p]['momentum_buffer'], saved)
    assert model.adversarial.scheduler.last_epoch == 0  # restored to the end of epoch 0
    assert model.adversarial.optimizer.param_groups[0]['lr'] == pytest.approx(base_lr)


# the discriminator sync is the same code for both methods: APS's two-process run is slow-marked (run with -m slow)
@pytest.mark.parametrize('method', ['cakd', pytest.param('aps', marks=pytest.mark.slow)])
def test_two_processes_keep_the_discriminator_in_step(method, tmp_path):
    """2-process CPU run of each adversarial method under the runner: D trains outside DDP, its gradients are
    all-reduced, so at the end every process holds the same D (and the same student) to the last bit."""
    import json
    config = tiny_yaml(tmp_path, method=method, epochs=2, limit=96, batch_size=16, norm_layer='groupnorm1')
    out = tmp_path / 'two'
    result = torchrun(['-m', 'jointrd_timm.cli', 'train', '--config', str(config), '--device', 'cpu',
                       '--output-dir', str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((out / 'final.json').read_text())
    assert final['replica_max_abs_diff'] == 0.0
    with safe_open(str(out / 'last.safetensors'), 'pt') as f:
        keys = [k for k in f.keys() if 'discriminator' in k]
        momentum = [f.get_tensor(k) for k in keys if 'discriminator' in k and 'momentum' in k]
    assert keys, 'the checkpoint must hold the discriminator and its optimizer'
    assert momentum and any(float(m.abs().sum()) > 0 for m in momentum), 'D must have taken optimizer steps'


def test_replica_divergence_sees_processes_that_drift_apart(tmp_path):
    """The check itself: two processes whose weights differ (seeded by rank) report the difference. And the block
    targets' global_mean averages over the processes (the 2-process block-targets run is slow-marked)."""
    script = tmp_path / 'drift.py'
    script.write_text(
        'import torch, torch.distributed as dist\n'
        'from jointrd_timm.training.runner import replica_divergence\n'
        'from jointrd_timm.methods.jointrd.blockwise import global_mean\n'
        'dist.init_process_group("gloo")\n'
        'torch.manual_seed(0)\n'
        'm = torch.nn.Linear(4, 3)\n'
        'same = replica_divergence(m)\n'
        'with torch.no_grad():\n'
        '    m.bias[1] += 0.25 * dist.get_rank()\n'
        'mean = global_mean(torch.tensor([1.0, 2.0]) * (1 + 2 * dist.get_rank()))\n'
        'print(f"RESULT {same} {replica_divergence(m)} {mean[0].item()} {mean[1].item()}")\n'
        'dist.destroy_process_group()\n')
    result = torchrun([str(script)])
    assert result.returncode == 0, result.stderr[-3000:]
    same, drifted, first, second = [float(x) for x in result.stdout.split('RESULT')[1].split()[:4]]
    assert same == 0.0 and drifted == pytest.approx(0.25)
    assert (first, second) == (2.0, 4.0)  # (1 and 3) and (2 and 6) averaged over the two processes


@pytest.mark.parametrize('method', ['cakd', 'aps'])
def test_a_batch_of_one_trains_and_leaves_the_discriminators_statistics_alone(method):
    """A loader's last, partial batch can hold one sample: the discriminator's BatchNorm1d then normalises with its
    running statistics (a single sample has no batch statistics) and both sides still take their step."""
    torch.manual_seed(0)
    teacher, student = timm.create_model('resnet20_cifar', num_classes=10), timm.create_model('plain_resnet20_cifar', num_classes=10)
    model = ConditionalAdversarialKD(student, teacher, 10) if method == 'cakd' else \
        AdversarialPortableStudent(student, teacher, label_head=True)
    model.train()
    model(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))  # running statistics of a full batch first
    stats = {k: v.clone() for k, v in model.adversarial.state_dict().items() if 'running' in k}
    d = _snapshot(model.adversarial)
    out = model(torch.randn(1, 3, 32, 32), torch.tensor([3]))
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    assert all(torch.equal(model.adversarial.state_dict()[k], v) for k, v in stats.items())
    moved = [k for k in _changed(d, model.adversarial) if 'running' not in k and 'num_batches' not in k]
    assert moved, 'the discriminator did not take its step on the batch of one'


def test_aps_sizes_its_adapter_and_discriminator_from_the_pooled_features_width():
    """MobileNetV3's head has its own conv: forward_head(pre_logits=True) is 1280 wide where num_features is 960."""
    torch.manual_seed(0)
    teacher = timm.create_model('mobilenetv3_large_100', num_classes=10)
    student = timm.create_model('plain_mobilenetv3_small_100', num_classes=10)
    assert teacher.num_features != teacher.head_hidden_size
    model = AdversarialPortableStudent(student, teacher).train()
    assert model.adapter.in_features == student.head_hidden_size
    assert model.adapter.out_features == teacher.head_hidden_size
    out = model(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))
    out['loss'].backward()
    assert torch.isfinite(out['loss'])


@pytest.mark.parametrize('method', ['cakd', 'jointrd-adv'])
def test_with_gradient_accumulation_the_discriminator_steps_with_the_student(method, tmp_path, monkeypatch):
    """48 images at batch 16, an optimizer step every 2 backward passes (counted across epochs): the discriminator
    steps once per student step, on both micro-batches' gradients, and a run cut mid-accumulation (epoch 1 ends
    with one micro-batch pending) resumes to the uninterrupted run's discriminator exactly."""
    from jointrd_timm import faults
    from jointrd_timm.methods.side_optimizer import SideOptimizer
    from jointrd_timm.training.run_folder import RunFolderError
    counts = []
    original = SideOptimizer.__init__

    def counting(self, *args, **kwargs):
        original(self, *args, **kwargs)
        counter = [0]
        counts.append(counter)
        self.optimizer.register_step_post_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))

    monkeypatch.setattr(SideOptimizer, '__init__', counting)
    yaml = tiny_yaml(tmp_path, method=method, epochs=2, limit=48)
    overrides = ['train.optimizer.grad_accum_step=2']
    torch.manual_seed(0)
    train(load_config(yaml, overrides), output_dir=str(tmp_path / 'full'), device='cpu')
    assert counts[-1][0] == 3  # 6 micro-batches, 3 student steps (without accumulation: 6 discriminator steps)
    faults._arrivals.clear()
    monkeypatch.setenv(faults.ENV, 'checkpoint_write:2:enospc')  # epoch 1 saved, epoch 2's write fails
    torch.manual_seed(0)
    with pytest.raises(RunFolderError, match='The previous checkpoint'):
        train(load_config(yaml, overrides), output_dir=str(tmp_path / 'cut'), device='cpu')
    monkeypatch.delenv(faults.ENV)
    saved = load_file(str(tmp_path / 'cut' / 'last.safetensors'))
    assert any(k.startswith('module.grads.adversarial.discriminator.') for k in saved)  # D's half-accumulated step
    train(load_config(yaml, overrides), output_dir=str(tmp_path / 'cut'), device='cpu', resume=True)
    a, b = (load_file(str(tmp_path / run / 'last.safetensors')) for run in ('full', 'cut'))
    keys = [k for k in a if k.startswith('model.adversarial.discriminator.') and a[k].is_floating_point()]
    assert keys and max(float((a[k] - b[k]).abs().max()) for k in keys) == 0.0


@pytest.mark.slow
def test_two_processes_resumed_mid_accumulation_keep_the_discriminators_pending_gradients(tmp_path):
    """2 processes, an optimizer step every 2 micro-batches, 5 micro-batches an epoch: epoch 1 ends with one
    micro-batch's discriminator gradients pending, which the main process checkpoints for both. They are averaged
    over the processes at every micro-batch, so that checkpoint is the run's, and a run stopped after epoch 1 and
    resumed ends with the uninterrupted run's discriminator."""
    config = tiny_yaml(tmp_path, method='cakd', epochs=2, limit=80, batch_size=16, norm_layer='groupnorm1')
    common = ['-m', 'jointrd_timm.cli', 'train', '--config', str(config), '--device', 'cpu']
    accumulate = ['train.optimizer.grad_accum_step=2']
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    for out, extra in ((full, []), (cut, ['train.num_epochs=1'])):
        result = torchrun(common + ['--output-dir', str(out)] + accumulate + extra)
        assert result.returncode == 0, result.stderr[-3000:]
    assert any(k.startswith('module.grads.adversarial.discriminator.')
               for k in load_file(str(cut / 'last.safetensors')))
    result = torchrun(common + ['--output-dir', str(cut), '--resume'] + accumulate)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (load_file(str(out / 'last.safetensors')) for out in (full, cut))
    keys = [k for k in a if k.startswith('model.adversarial.discriminator.') and a[k].is_floating_point()]
    assert keys and max(float((a[k] - b[k]).abs().max()) for k in keys) < 1e-6
