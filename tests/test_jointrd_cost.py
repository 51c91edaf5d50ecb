"""JointRD's cost work (issue 23): only what the loss reads is computed, the frozen teacher's tails run BN-folded, the
lean memory mode backpropagates each path where its gradient joins the twin's; each keeps the loss and the
gradients. And the joint teacher as the reference runs it, field by field: teacher step first, tails on running BN
statistics, margin refreshed per epoch."""
import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import jointrd_timm  # noqa: F401
from jointrd_timm.methods import JointRD, JointRDConfig
from jointrd_timm.methods.feature_losses import bn_margin

X, Y = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2, 3, 4, 5, 6])


def pair(arch='resnet20_cifar', **fields):
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10)
    twin = timm.create_model(f'plain_{arch}', num_classes=10)
    model = JointRD(twin, teacher, JointRDConfig(**fields))
    model.set_epoch(3, 0, 10)
    return model.train()


def step(model, seed=5):
    """One forward with the targets and the caller's single backward; (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same sampled paths
    out = model(X, Y)
    out['loss'].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got, expected, rtol=1e-4):
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        scale = g.abs().max().clamp_min(1e-12)
        assert (got[name] - g).abs().max() <= rtol * scale, name


def stem(m, v):
    return m.layer1(m.act1(m.bn1(m.conv1(v))))


def head(m, v):
    return m.fc(m.global_pool(v))


def test_default_recipe_runs_no_teacher_forward_and_keeps_the_loss():
    """Frozen teacher, lambda 0, no KD: nothing reads z_T, so the teacher's stem never runs; the loss and the twin's
    gradients are those of the hand-computed objective (tails through the teacher as it is, BN unfolded)."""
    model = pair()
    calls = []
    model.teacher.conv1.register_forward_hook(lambda *a: calls.append(1))  # the stem runs only in T(x)
    out, grads = step(model)
    assert calls == [] and out['teacher_logits'] is None and out['teacher_feature'] is None

    twin, teacher = copy.deepcopy(model.student), model.teacher
    twin.zero_grad(set_to_none=True)
    h1 = stem(twin, X)
    h2 = twin.layer2(h1)
    z_s = head(twin, twin.layer3(h2))
    z_1 = head(teacher, teacher.layer3(teacher.layer2(h1)))
    z_2 = head(teacher, teacher.layer3(h2))
    eta = out['eta']
    expected = (F.cross_entropy(z_s, Y) + eta * (F.cross_entropy(z_1, Y) + F.cross_entropy(z_2, Y))) / 3
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-5)
    expected.backward()
    assert_same_gradients(grads, {f'student.{n}': p.grad for n, p in twin.named_parameters()})

    kd = pair(kd_weight=0.5)
    kd.teacher.conv1.register_forward_hook(lambda *a: calls.append(1))
    assert kd(X, Y)['teacher_logits'] is not None and calls == [1]  # a term reads z_T: the forward runs once


@pytest.mark.parametrize('fields', [dict(), dict(hybrid_paths=1), dict(loss_normalization='per_stage', eta_min=0.2)],
                         ids=['all paths', 'one path', 'per stage'])
def test_folded_teacher_tails_give_the_same_loss_and_gradients(fields):
    folded = pair(**fields)
    unfolded = copy.deepcopy(folded)
    unfolded.config.fold_teacher_bn = False
    out_f, grads_f = step(folded)
    out_u, grads_u = step(unfolded)
    assert folded._folded_teacher_stages() is not None and unfolded._folded_teacher_stages() is None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for s in folded._folded_teacher_stages() for m in s.modules())
    assert out_f['paths'] == out_u['paths']
    assert out_f['loss'].item() == pytest.approx(out_u['loss'].item(), rel=1e-5)
    assert_same_gradients(grads_f, grads_u)
    assert all(p.grad is None for p in folded.teacher.parameters())


def test_folded_tails_follow_the_teachers_weights():
    """Loading other weights into the teacher (a resume, a checkpoint) refolds: the tails are the new teacher's."""
    model = pair()
    step(model)
    other = timm.create_model('resnet20_cifar', num_classes=10)
    for m in other.modules():  # BN statistics that are not the identity, so a stale fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.teacher.load_state_dict(other.state_dict())
    out, _ = step(model)
    other.eval()
    with torch.no_grad():
        h = model.student_stages.features(X)
        assert torch.allclose(out['hybrid_logits'][1], head(other, other.layer3(h[1])), atol=1e-5)


@pytest.mark.parametrize('fields', [
    dict(), dict(hybrid_paths=2, arch='resnet18_cifar'), dict(loss_normalization='per_stage', eta_min=0.2),
    dict(feature_loss_weight=1e-3, kd_weight=0.5), dict(teacher_mode='joint'),
    dict(teacher_mode='joint', hybrid_teacher_bn='running', loss_normalization='weights')],
    ids=['default', 'sampled', 'per stage', 'margin + KD', 'joint', 'joint, running BN'])
def test_lean_memory_gives_the_same_loss_and_gradients(fields):
    lean = pair(**fields, lean_memory=True)
    full = copy.deepcopy(lean)
    full.config.lean_memory = False
    out_l, grads_l = step(lean)
    out_f, grads_f = step(full)
    assert out_l['paths'] == out_f['paths']
    # the logged loss is the full loss, the same computation: bit for bit
    assert out_l['loss'].item() == out_f['loss'].item()
    assert_same_gradients(grads_l, grads_f)
    # the tails' graphs were released inside the forward
    assert all(z.grad_fn is None for z in out_l['hybrid_logits'])
    assert all(z.grad_fn is not None for z in out_f['hybrid_logits'])
    # the connectors' BN statistics moved once per step in both
    for a, b in zip(lean.state_dict().values(), full.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_lean_memory_without_targets_keeps_the_paths_for_the_callers_backward():
    model = pair(lean_memory=True)
    out = model(X)
    assert all(z.grad_fn is not None for z in out['hybrid_logits'])


# -- the joint teacher as the reference runs it ---------------------------------------------------------------------

TEACHER_SGD = dict(lr=0.05, momentum=0.0, weight_decay=1e-3, cosine_epochs=10)


def test_teacher_first_updates_the_teacher_then_runs_the_paths_through_it():
    model = pair(teacher_mode='joint', joint_step_order='teacher_first', teacher_optimizer=TEACHER_SGD)
    before = copy.deepcopy(model.teacher)
    assert not any(p.requires_grad for p in model.teacher.parameters())  # never in the main optimizer
    assert set(model.extra_optimizers()) == {'teacher'} and set(model.extra_schedulers()) == {'teacher'}
    out, grads = step(model)
    assert not any(n.startswith('teacher.') for n in grads)

    # by hand: one SGD step of the teacher on its own CE (train-mode BN), at epoch 3 of the cosine schedule
    lr = 0.05 * (1 + math.cos(math.pi * 3 / 10)) / 2
    by_hand = copy.deepcopy(before).train().requires_grad_(True)
    ce_teacher = F.cross_entropy(by_hand(X), Y)
    ce_teacher.backward()
    with torch.no_grad():
        for p in by_hand.parameters():
            p -= lr * (p.grad + 1e-3 * p)
    for (name, p), q in zip(model.teacher.named_parameters(), by_hand.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    for (name, b), c in zip(model.teacher.named_buffers(), by_hand.buffers()):
        assert torch.equal(b, c), name
    assert out['ce_teacher'].item() == pytest.approx(ce_teacher.item(), rel=1e-6)

    # the hybrid paths ran through the updated teacher (batch statistics, the default); the loss has no teacher CE
    twin = model.student
    with torch.no_grad():
        h1 = stem(twin, X)
        h2 = twin.layer2(h1)
        z_s = head(twin, twin.layer3(h2))
        saved = copy.deepcopy(by_hand.state_dict())
        z_1 = head(by_hand, by_hand.layer3(by_hand.layer2(h1)))
        z_2 = head(by_hand, by_hand.layer3(h2))
        by_hand.load_state_dict(saved)
    assert torch.allclose(out['hybrid_logits'][0], z_1, atol=1e-5)
    assert torch.allclose(out['hybrid_logits'][1], z_2, atol=1e-5)
    eta = out['eta']
    expected = (F.cross_entropy(z_s, Y) + eta * (F.cross_entropy(z_1, Y) + F.cross_entropy(z_2, Y))) / 3
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-5)
    assert model._teacher_update.scheduler.last_epoch == 3


def test_teacher_first_needs_the_targets():
    model = pair(teacher_mode='joint', joint_step_order='teacher_first', teacher_optimizer=TEACHER_SGD)
    with pytest.raises(ValueError, match=r'call the JointRD module with the targets, model\(x, y\)'):
        model(X)


def test_running_bn_tails_use_the_teachers_running_statistics():
    model = pair(teacher_mode='joint', hybrid_teacher_bn='running')
    out, _ = step(model)
    teacher = copy.deepcopy(model.teacher).eval()  # after the step: its statistics saw its own batch only
    alone = copy.deepcopy(pair(teacher_mode='joint').teacher).train()
    alone(X)
    for key, value in alone.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[key], value), key
    with torch.no_grad():
        h = model.student_stages.features(X)
        # the tails ran before the teacher's update, on the running statistics as they were after its forward
        z_1 = head(teacher, teacher.layer3(teacher.layer2(h[0])))
    assert model.teacher.training
    assert torch.allclose(out['hybrid_logits'][0], z_1, atol=1e-5)
    batch = pair(teacher_mode='joint')
    assert not torch.allclose(step(batch)[0]['hybrid_logits'][0], z_1, atol=1e-3)  # batch statistics differ


@pytest.mark.parametrize('refresh', ['once', 'epoch'])
def test_margin_refresh(refresh):
    model = pair(teacher_mode='joint', feature_loss_weight=1e-3, margin_refresh=refresh)
    bn = model.teacher.layer3[-1].bn2
    first = bn_margin(bn).reshape(1, -1, 1, 1)
    assert torch.equal(model.feature_loss.margin, first)
    with torch.no_grad():
        bn.weight.mul_(2.0)
        bn.bias.add_(0.3)
    step(model)
    assert torch.equal(model.feature_loss.margin, first if refresh == 'once' else bn_margin(bn).reshape(1, -1, 1, 1))
    refreshed = model.feature_loss.margin.clone()
    with torch.no_grad():
        bn.bias.add_(0.3)
    step(model)  # same epoch: not recomputed
    assert torch.equal(model.feature_loss.margin, refreshed)
    model.set_epoch(4, 0, 10)
    step(model)
    assert torch.equal(model.feature_loss.margin, first if refresh == 'once' else bn_margin(bn).reshape(1, -1, 1, 1))


def test_joint_mode_config_errors():
    with pytest.raises(ValueError, match="joint_step_order must be one of \\['simultaneous', 'teacher_first'\\], got 'x'"):
        JointRDConfig(joint_step_order='x')
    with pytest.raises(ValueError, match="hybrid_teacher_bn must be one of \\['batch', 'running'\\]"):
        JointRDConfig(hybrid_teacher_bn='eval')
    with pytest.raises(ValueError, match="margin_refresh must be one of \\['once', 'epoch'\\]"):
        JointRDConfig(margin_refresh='step')
    with pytest.raises(ValueError, match="teacher_first' updates the teacher: it needs teacher_mode='joint'"):
        JointRDConfig(joint_step_order='teacher_first', teacher_optimizer=TEACHER_SGD)
    with pytest.raises(ValueError, match="teacher_first' needs teacher_optimizer"):
        JointRDConfig(teacher_mode='joint', joint_step_order='teacher_first')
    with pytest.raises(ValueError, match="teacher_optimizer needs 'lr'"):
        JointRDConfig(teacher_mode='joint', joint_step_order='teacher_first', teacher_optimizer=dict(momentum=0.9))
    with pytest.raises(ValueError, match=r"Unknown teacher_optimizer setting\(s\) \['lrate'\]"):
        JointRDConfig(teacher_mode='joint', joint_step_order='teacher_first', teacher_optimizer=dict(lr=0.1, lrate=1))
    with pytest.raises(ValueError, match='teacher_optimizer is used only with'):
        JointRDConfig(teacher_mode='joint', teacher_optimizer=TEACHER_SGD)


def test_runner_trains_a_teacher_first_joint_teacher_and_checkpoints_its_optimizer(tmp_path):
    """Through the runner and torchdistill: the teacher's own optimizer is checkpointed beside the main one, which
    holds the twin only (and lean memory trains through the same path)."""
    from conftest import tiny_yaml
    from safetensors import safe_open
    from jointrd_timm.training.runner import load_config, train
    config = tiny_yaml(tmp_path, epochs=1, limit=32, extra_jointrd=", teacher_mode: 'joint', joint_step_order: "
                       "'teacher_first', teacher_optimizer: {lr: 0.01, milestones: [1]}, lean_memory: true")
    train(load_config(config), device='cpu')
    with safe_open(str(tmp_path / 'out' / 'last.safetensors'), 'pt') as f:
        keys = list(f.keys())
    teacher_buffers = [k for k in keys if k.startswith('optimizer.teacher.') and k.endswith('momentum_buffer')]
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10, in_chans=1)
    assert len(teacher_buffers) == len(list(timm.create_model('resnet20_cifar').parameters()))
    model_buffers = [k for k in keys if k.startswith('optimizer.model.') and k.endswith('momentum_buffer')]
    assert len(model_buffers) == len(list(twin.parameters()))


@pytest.mark.parametrize('fields', [dict(), dict(teacher_mode='joint')], ids=['deferred paths', 'eager paths'])
def test_lean_memory_scales_the_paths_as_the_callers_backward_scales_the_loss(fields):
    """A GradScaler multiplies the loss, gradient accumulation divides it: the paths' gradients follow (the loss tap
    records the factor), for paths backpropagated in the caller's backward and for those taken in the forward."""
    lean = pair(**fields, lean_memory=True)
    full = copy.deepcopy(lean)
    full.config.lean_memory = False
    for factor in (0.25, 1024.0):
        grads = []
        for model in (lean, full):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            (factor * model(X, Y)['loss']).backward()
            grads.append({n: p.grad / factor for n, p in model.named_parameters() if p.grad is not None})
        assert_same_gradients(*grads)


def test_lean_memory_under_fp16_autocast_keeps_the_scaled_gradients():
    """Under fp16 autocast the paths wait for the caller's backward, which brings the GradScaler's scale to them:
    the same gradients as without lean memory, where unscaled fp16 gradients would have underflowed."""
    lean = pair(lean_memory=True)
    full = copy.deepcopy(lean)
    full.config.lean_memory = False
    grads, outs = [], []
    for model in (lean, full):  # the folded tails' backward in fp16 too (their convs' weights follow the gradient)
        model.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.float16):
            outs.append(model(X, Y))
        (2.0 ** 12 * outs[-1]['loss']).backward()
        grads.append({n: p.grad.float() / 2.0 ** 12 for n, p in model.named_parameters() if p.grad is not None})
    assert outs[0]['hybrid_logits'][0].dtype == torch.float16
    assert all(z.grad_fn is None for z in outs[0]['hybrid_logits'])
    assert_same_gradients(*grads, rtol=2e-2)


def test_lean_memory_runs_each_path_backward_after_the_twins_later_stages():
    """The point of the deferred paths: path k's backward runs once the twin's stages k+1..n are done (their
    activations freed), before stage k's; its gradient then flows through stage k like the twin's own."""
    model = pair(lean_memory=True)
    events = []
    for j, stage in enumerate(model.student_stages.stages, 1):
        for p in stage.parameters():
            p.register_post_accumulate_grad_hook(lambda p, j=j: events.append(('stage', j)))
    from jointrd_timm.methods import jointrd
    original = jointrd._LeanPaths.gradients

    def recording(self, k):
        events.append(('path', k))
        return original(self, k)
    jointrd._LeanPaths.gradients = recording
    try:
        step(model)
    finally:
        jointrd._LeanPaths.gradients = original
    n = model.num_stages
    assert [e for e in events if e[0] == 'path'] == [('path', k) for k in range(n - 1, 0, -1)]
    for k in range(1, n):
        at = events.index(('path', k))
        assert all(e[1] > k for e in events[:at] if e[0] == 'stage')
        assert all(e[1] <= k for e in events[at:] if e[0] == 'stage')


@pytest.mark.parametrize('fields', [dict(), dict(teacher_mode='joint')], ids=['deferred paths', 'eager paths'])
def test_lean_memory_train_mode_forward_without_grad_gives_the_loss(fields):
    """A train-mode forward under no_grad (a loss logged without a backward) runs the usual way: same loss value."""
    lean = pair(**fields, lean_memory=True)
    full = copy.deepcopy(lean)
    full.config.lean_memory = False
    with torch.no_grad():
        torch.manual_seed(5)
        got = lean(X, Y)['loss']
        torch.manual_seed(5)
        expected = full(X, Y)['loss']
    assert got.grad_fn is None and got.item() == expected.item()


def test_lean_memory_only_backpropagates_the_paths_with_the_returned_loss():
    """A backward of something else than the returned loss (here the twin's CE alone) gets no hybrid gradient."""
    lean = pair(lean_memory=True)
    out = lean(X, Y)
    F.cross_entropy(out['logits'], Y).backward()
    by_hand = copy.deepcopy(lean)
    by_hand.zero_grad(set_to_none=True)
    F.cross_entropy(by_hand.student(X), Y).backward()
    assert_same_gradients({n: p.grad for n, p in lean.student.named_parameters()},
                          {n: p.grad for n, p in by_hand.student.named_parameters()})


def test_folded_tails_save_a_fraction_of_the_unfolded_tails_tensors():
    """BN folded, convs saving nothing (input gradient only), ReLUs a bool mask: the tail's saved tensors shrink."""
    model = pair()
    h = model.student_stages.features(X)[0].detach().requires_grad_()

    def saved_bytes(fold):
        model.config.fold_teacher_bn = fold
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            z, _ = model._teacher_tail(h, 1)
        grad, = torch.autograd.grad(z.sum(), h)
        return sum(sizes), grad
    folded, grad_folded = saved_bytes(True)
    unfolded, grad_unfolded = saved_bytes(False)
    assert folded < 0.2 * unfolded
    assert torch.allclose(grad_folded, grad_unfolded, atol=1e-6 * grad_unfolded.abs().max().item() + 1e-9)


def test_mask_relu_gives_relus_output_and_gradient_exactly():
    """The folded tails' ReLU (a bool mask saved, the backward a multiply) against torch.relu, exact."""
    from jointrd_timm.methods.jointrd import _MaskReLUFn
    x = torch.randn(4, 3, 5, 5)
    x[0, 0, 0, :2] = 0.0  # relu'(0) = 0 as in torch
    g = torch.randn_like(x)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = _MaskReLUFn.apply(a), torch.relu(b)
    assert torch.equal(ya, yb)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)
    assert a.grad[0, 0, 0, :2].abs().sum() == 0 and torch.equal(a.grad[x > 0], g[x > 0])


@pytest.mark.parametrize('conv, size', [
    (dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=1), (9, 8)),
    (dict(in_channels=6, out_channels=9, kernel_size=(3, 5), stride=(2, 3), padding=(1, 2), dilation=(1, 2),
          groups=3), (11, 14)),
    (dict(in_channels=4, out_channels=8, kernel_size=1, stride=2), (7, 7)),
    (dict(in_channels=5, out_channels=5, kernel_size=3, padding=2, dilation=2, groups=5), (6, 10))],
    ids=['stride 2, odd size', 'grouped, dilated, rectangular', '1x1 projection', 'depthwise'])
def test_frozen_conv_input_gradient_is_autograds(conv, size):
    """The folded tails' conv: same output, and its input gradient (a transposed conv, nothing saved) equals
    autograd's through the ordinary conv, at strides that round the output size down."""
    from jointrd_timm.methods.jointrd import _FrozenConv
    torch.manual_seed(0)
    module = torch.nn.Conv2d(**conv).requires_grad_(False)
    x = torch.randn(2, conv['in_channels'], *size, requires_grad=True)
    out = _FrozenConv(module)(x)
    expected = module(x)
    assert out.shape == expected.shape and torch.allclose(out, expected)
    g = torch.randn_like(out)
    got, = torch.autograd.grad(out, x, g)
    want, = torch.autograd.grad(expected, x, g)
    assert torch.allclose(got, want, atol=1e-5)


def test_frozen_conv_refuses_what_it_does_not_compute_and_folding_leaves_such_convs():
    """The lean conv is F.conv2d with the conv's stride, padding, dilation and groups: explicit zero padding only. A
    reflect-padded or padding='same' conv is refused by it and left as it is by the folding."""
    from jointrd_timm.methods.jointrd import _FrozenConv
    from jointrd_timm.methods.jointrd.tails import _lean_frozen
    reflect = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode='reflect').requires_grad_(False)
    same = torch.nn.Conv2d(3, 3, 3, padding='same').requires_grad_(False)
    zeros = torch.nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)
    for conv in (reflect, same):
        with pytest.raises(ValueError, match='explicit zero padding'):
            _FrozenConv(conv)
    stage = _lean_frozen(torch.nn.Sequential(reflect, same, zeros, torch.nn.ReLU()))
    assert [type(m).__name__ for m in stage] == ['Conv2d', 'Conv2d', '_FrozenConv', '_MaskReLU']
