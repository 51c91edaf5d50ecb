"""Teacher-forced block targets (JointRDConfig.block_loss_weight): values, gradients, BN statistics, errors."""
import pytest
import timm
import torch

import jointrd_timm  # noqa: F401
from jointrd_timm.methods import JointRD, JointRDConfig
from jointrd_timm.methods.base import call_on_buffer_copies
from jointrd_timm.methods.jointrd.blockwise import BlockTargets, _Capture, block_pairs
from jointrd_timm.twins.transfer import load_teacher_weights


def fading_pair(arch='resnet20_cifar', weight=1.0, **config):
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10)
    with torch.no_grad():  # a trained-looking teacher: timm zero-initialises each block's last BN (identity blocks)
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2.0)
    twin = timm.create_model(f'plain_{arch}', num_classes=10, shortcut_fade=True)
    load_teacher_weights(twin, teacher)
    cfg = JointRDConfig(block_loss_weight=weight, shortcut_fade=0.8, **config)
    return JointRD(twin, teacher, cfg, num_epochs=4, steps_per_epoch=10)


def relative_mse(out, target):
    return ((out - target) ** 2).mean() / (target ** 2).mean()


def test_pairs_are_the_teachers_blocks_in_forward_order():
    method = fading_pair()
    names = [name for name, _, _ in block_pairs(method.teacher, method.student)]
    assert names == [f'layer{s}.{b}' for s in (1, 2, 3) for b in range(3)]  # resnet20: 3 stages of 3 blocks


@pytest.mark.parametrize('arch', ['resnet20_cifar', 'resnet18'])
def test_block_loss_equals_hand_computation(arch):
    method = fading_pair(arch, weight=0.7).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(6):  # into the fade: s < 1, so the twin blocks differ from the teacher's
        method(x, y)
    assert 0 < method.shortcut_scale < 1
    # by hand: the teacher's block inputs and outputs, each twin block (train mode, same s) on its teacher's input
    seen = {}
    pairs = block_pairs(method.teacher, method.student)
    hooks = [t.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, (a[0], o)) and None) for n, t, _ in pairs]
    out = method(x, y)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        expected = torch.stack([relative_mse(s(seen[n][0]), seen[n][1]) for n, _, s in pairs]).mean()
    torch.testing.assert_close(out['block'], expected, rtol=1e-5, atol=1e-7)
    assert out['block'] > 0


def test_loss_is_jointrd_plus_weighted_block_term():
    method = fading_pair(weight=2.5).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = method(x, y)
    base = JointRDConfig(shortcut_fade=0.8)
    from jointrd_timm.methods.jointrd import jointrd_loss
    plain = jointrd_loss({**out, 'block_loss': None}, y, method.num_stages, base)
    torch.testing.assert_close(out['loss'], plain['loss'] + 2.5 * out['block_loss'])


def test_block_gradient_reaches_only_the_twins_blocks_and_keeps_bn_statistics():
    method = fading_pair().train()
    x = torch.randn(4, 3, 32, 32)
    targets = method._block_targets
    with torch.no_grad(), targets.recording():
        method.teacher(x)
    before = {n: b.clone() for n, b in method.student.named_buffers()}
    loss = targets.loss()
    loss.backward()
    for name, p in method.student.named_parameters():
        in_block = name.startswith('layer')
        has_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert has_grad == in_block, name  # the stem and the head get nothing; every block parameter something
    assert all(p.grad is None for p in method.teacher.parameters())
    for name, b in method.student.named_buffers():
        assert torch.equal(b, before[name]), name  # running statistics untouched by the teacher-forced forwards


def test_block_targets_do_not_change_the_jointrd_loss_without_weight():
    a = fading_pair(weight=0.0).train()
    b = fading_pair(weight=1.0).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out_a, out_b = a(x, y), b(x, y)
    assert 'block' not in out_a
    torch.testing.assert_close(out_b['loss'] - out_b['block_loss'], out_a['loss'])


def test_a_step_drops_its_captures_and_a_loss_without_a_recorded_forward_is_refused():
    method = fading_pair().train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    method(x, y)
    assert all(c.value is None for c in method._block_targets.captures)
    with pytest.raises(RuntimeError, match='did not run in the recorded teacher forward'):
        method._block_targets.loss()


def test_block_loss_errors():
    with pytest.raises(ValueError, match='block_loss_weight must be a finite number >= 0'):
        JointRDConfig(block_loss_weight=-1)
    teacher = timm.create_model('resnet20_cifar', num_classes=10)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match='has no shortcut block that the twin'):
        BlockTargets(teacher, other)


def test_a_twin_trained_with_block_targets_moves_towards_its_teacher_blocks():
    """A few SGD steps on the block term alone lower it (the twin blocks learn their teacher's function)."""
    method = fading_pair().train()
    for _ in range(40):  # past the end of the fade (32 of 40 steps): s = 0
        method.count_step()
    method.apply_progress()
    assert method.shortcut_scale == 0
    params = [p for n, p in method.student.named_parameters() if n.startswith('layer')]
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    torch.manual_seed(2)
    x = torch.randn(16, 3, 32, 32)
    losses = []
    for _ in range(20):
        with torch.no_grad(), method._block_targets.recording():
            method.teacher(x)
        loss = method._block_targets.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_a_deep_copy_records_and_trains_its_own_blocks():
    import copy
    method = fading_pair().train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    twin = copy.deepcopy(method)
    (_, teacher_block, student_block), = twin._block_targets.pairs[:1]
    assert teacher_block is twin.teacher.layer1[0] and student_block is twin.student.layer1[0]
    out = twin(x, y)
    out['loss'].backward()
    assert twin.student.layer1[0].conv1.weight.grad is not None
    assert method.student.layer1[0].conv1.weight.grad is None  # the original is untouched


def test_a_teacher_block_that_returns_no_tensor_is_refused_by_name():
    capture = _Capture('layer1.0')
    capture.enabled = True
    x = torch.randn(2, 4)
    with pytest.raises(TypeError, match=r'teacher block layer1\.0 \(Linear\) returns tuple, not a tensor'):
        capture(torch.nn.Linear(4, 4), (x,), {}, (x, x))
    capture.enabled = False
    capture(torch.nn.Linear(4, 4), (x,), {}, (x, x))  # not recording: nothing checked, nothing kept
    assert capture.value is None


@pytest.mark.parametrize('detach', [False, True])
def test_call_on_buffer_copies_normalises_with_batch_statistics_and_keeps_the_running_ones(detach):
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    x = torch.randn(5, 3, 8, 8, requires_grad=True)
    before = {n: b.clone() for n, b in block.named_buffers()}
    out = call_on_buffer_copies(block, (x,), detach_parameters=detach)
    for n, b in block.named_buffers():
        assert torch.equal(b, before[n]), n
    reference = torch.nn.functional.batch_norm(block[0](x), None, None, block[1].weight, block[1].bias, training=True)
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert (block[0].weight.grad is None) == detach


def test_the_block_loss_is_a_mean_over_samples_so_two_processes_give_the_one_process_gradient(monkeypatch):
    """DDP averages the gradients of the processes' equal shares of a batch: that is the one-process gradient only
    when the loss is a mean over samples. The relative error's denominator is therefore the whole batch's
    (blockwise.global_mean, an all-reduce in a distributed run); with a per-share denominator (as before) the
    gradients differ. The shares are emulated here: global_mean returns the whole batch's denominators."""
    import copy
    from torch import nn
    from jointrd_timm.methods.jointrd import blockwise
    torch.manual_seed(0)
    norm = lambda c, **kw: nn.GroupNorm(1, c, **kw)  # noqa: E731  (BN normalises each share by its own statistics)
    teacher = timm.create_model('resnet20_cifar', num_classes=10, norm_layer=norm)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10, norm_layer=norm, shortcut_fade=True)
    load_teacher_weights(twin, teacher)
    with torch.no_grad():  # a twin some steps away from its teacher (an exact copy has no block error to weigh)
        for p in twin.parameters():
            p.add_(0.1 * torch.randn_like(p))
    method = JointRD(twin, teacher, JointRDConfig(block_loss_weight=5.0, shortcut_fade=0.8), num_epochs=1,
                     steps_per_epoch=4).train()
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10

    def grads(xb, yb):
        step = copy.deepcopy(method)  # each share from the same state (a forward advances the step)
        step(xb, yb)['loss'].backward()
        return {n: p.grad for n, p in step.named_parameters() if p.grad is not None}

    whole, real = {}, blockwise.global_mean
    monkeypatch.setattr(blockwise, 'global_mean', lambda v: whole.setdefault('sizes', v.clone()))
    full = grads(x, y)
    assert whole['sizes'].shape == (9,)  # one denominator per block, computed once for all of them

    def worst(a, b):
        return max(((full[n] - (a[n] + b[n]) / 2).abs().max() / full[n].abs().max()).item() for n in full)
    shared = worst(grads(x[:4], y[:4]), grads(x[4:], y[4:]))  # global_mean gives the whole batch's denominators
    assert shared < 1e-5
    monkeypatch.setattr(blockwise, 'global_mean', lambda v: v)  # each share its own denominator: not the same
    assert worst(grads(x[:4], y[:4]), grads(x[4:], y[4:])) > 100 * max(shared, 1e-7)
    assert torch.equal(real(torch.ones(3)), torch.ones(3))  # one process: unchanged
