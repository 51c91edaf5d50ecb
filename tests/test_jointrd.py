"""JointRD in plain PyTorch: eta, the loss by hand, gradient routes, frozen teacher, sampling, layout errors."""
import copy
import dataclasses
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import jointrd_timm  # noqa: F401
from jointrd_timm.methods import JointRD, JointRDConfig, eta_schedule
from jointrd_timm.methods.jointrd import jointrd_loss, scale_grad, stage_weights
from jointrd_timm.methods.feature_losses import MarginFeatureLoss, bn_margin
from jointrd_timm.methods.stages import StageLayoutError, StageSplit


def pair(config=None, arch='resnet20_cifar', run_length=(10, 100), **kwargs):
    """A JointRD pair; ``run_length`` (epochs, steps per epoch) given at construction, as a plain loop would."""
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10, **kwargs)
    twin = timm.create_model(f'plain_{arch}', num_classes=10, **kwargs)
    return JointRD(twin, teacher, config or JointRDConfig(), num_epochs=run_length[0], steps_per_epoch=run_length[1])


@pytest.mark.parametrize('progress, expected', [(0, 1.0), (30, 0.75), (60, 0.5), (90, 0.5), (15, 0.5 + 0.5 * (1 + math.cos(math.pi / 4)) / 2)])
def test_eta_schedule_values(progress, expected):
    assert eta_schedule(progress, eta_min=0.5, horizon=60) == pytest.approx(expected)


def test_eta_follows_epochs_steps_and_horizon_fraction():
    model = pair(JointRDConfig(eta_min=5e-3, eta_horizon_fraction=0.5))
    model.set_epoch(3, steps_per_epoch=4, num_epochs=12)  # horizon 6 epochs
    assert model.eta == pytest.approx(eta_schedule(3.0, 5e-3, 6.0))
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert model.eta == pytest.approx(eta_schedule(3.25, 5e-3, 6.0))
    with pytest.raises(RuntimeError, match='run length must be known'):
        pair(JointRDConfig(eta_horizon_fraction=0.5), run_length=(0, 0)).eta


def test_a_plain_loop_advances_eta_without_set_epoch():
    """Given the run length at construction, every train-mode forward is a step: eta follows the schedule per step
    and epochs roll over by themselves; without it, the first train-mode forward refuses instead of keeping eta at 1."""
    model = pair(JointRDConfig(eta_min=0.5, eta_horizon=1), run_length=(2, 3)).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    etas = [model(x, y)['eta'] for _ in range(4)]
    assert etas == pytest.approx([eta_schedule(k / 3, 0.5, 1) for k in range(4)])
    assert (int(model.epoch), int(model.step_in_epoch)) == (1, 1)
    bare = pair(JointRDConfig(eta_min=0.5), run_length=(0, 0)).train()
    with pytest.raises(RuntimeError, match='run length must be known'):
        bare(x, y)
    held = pair(JointRDConfig(eta_min=1.0), run_length=(0, 0)).train()  # eta held at 1: nothing to schedule
    assert held(x, y)['eta'] == 1.0
    with pytest.raises(ValueError, match='num_epochs must be a positive integer'):
        pair(run_length=(0, 5))


def test_stage_split_reproduces_the_model():
    for arch in ('resnet20_cifar', 'resnet18', 'efficientnet_b0', 'convnext_atto', 'regnetx_002'):
        model = timm.create_model(arch).eval()
        x = torch.randn(2, 3, 64, 64)
        split = StageSplit(model, x)
        assert torch.allclose(split(x, 0)[0], model(x), atol=1e-5)
    assert StageSplit(timm.create_model('resnet18')).boundaries == ['layer1', 'layer2', 'layer3', 'layer4']


@pytest.mark.parametrize('arch', ['mobilenetv3_small_050', 'ghostnet_050'])
def test_head_convs_after_pooling_stay_in_the_head(arch):
    # their conv_head runs in forward_head on the pooled map; in the neck it ran twice (conv2d on a [1, 1] input)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    split = StageSplit(model, x)
    assert model.conv_head in list(split.head_modules) and model.conv_head not in list(split.neck)
    logits, feature = split(x, 0)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(feature, model.forward_features(x))
    jointrd = pair(arch=arch)
    jointrd.set_epoch(0, 1, 1)
    out = jointrd.train()(x, torch.tensor([1, 2]))
    assert torch.isfinite(out['loss'])
    out['loss'].backward()
    assert jointrd.student.conv_head.weight.grad.abs().sum() > 0


def test_loss_equals_hand_computation():
    model = pair(JointRDConfig(eta_min=0.5, eta_horizon=10, feature_loss_weight=1e-3, kd_weight=0.5))
    model.set_epoch(5, 0, 10)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    out = model(x, y)
    eta = 0.5 + 0.5 * (1 + math.cos(math.pi * 5 / 10)) / 2
    assert out['eta'] == pytest.approx(eta)

    # by hand, from the modules themselves
    teacher, twin = model.teacher, model.student
    pre = {}
    hook_t = teacher.layer3[-1].act2.register_forward_pre_hook(lambda m, a: pre.setdefault('t', []).append(a[0].clone()))
    hook_s = twin.layer3[-1].act2.register_forward_pre_hook(lambda m, a: pre.setdefault('s', []).append(a[0].clone()))
    with torch.no_grad():
        z_t = teacher(x)
    stem = lambda m, v: m.layer1(m.act1(m.bn1(m.conv1(v))))  # noqa: E731
    h1 = stem(twin, x)
    h2 = twin.layer2(h1)
    z_s = twin.fc(twin.global_pool(twin.layer3(h2)))
    z_1 = teacher.fc(teacher.global_pool(teacher.layer3(teacher.layer2(h1))))
    z_2 = teacher.fc(teacher.global_pool(teacher.layer3(h2)))
    hook_t.remove(), hook_s.remove()
    f_t, f_1, f_2 = pre['t']
    f_s = pre['s'][0]
    n = 3
    margin_loss = MarginFeatureLoss(bn_margin(teacher.layer3[-1].bn2))
    c = model.connectors
    ce = (F.cross_entropy(z_s, y) + eta * (F.cross_entropy(z_1, y) + F.cross_entropy(z_2, y))) / n
    feat = (margin_loss(c[0](f_s), f_t) + eta * (margin_loss(c[1](f_1), f_t) + margin_loss(c[2](f_2), f_t))) / n
    kd = F.kl_div(F.log_softmax(z_s / 4, 1), F.softmax(z_t / 4, 1), reduction='batchmean') * 16
    expected = ce + 1e-3 * feat + 0.5 * kd
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-4)
    assert torch.allclose(out['teacher_logits'], z_t, atol=1e-5)


@pytest.mark.parametrize('hybrid_paths', [None, 1])
def test_loss_normalizations_divide_the_same_sums(hybrid_paths):
    config = JointRDConfig(eta_min=0.5, eta_horizon=10, feature_loss_weight=1e-3, hybrid_paths=hybrid_paths)
    model = pair(config, arch='resnet18_cifar')
    model.set_epoch(5, 0, 10)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    torch.manual_seed(3)
    out = model(x, y)
    eta, n = out['eta'], 4
    losses = {kind: jointrd_loss(out, y, n, dataclasses.replace(config, loss_normalization=kind),
                                 model.feature_loss) for kind in ('stages', 'none', 'weights', 'per_stage')}
    total = losses['none']['loss'].item()
    # per_stage divides gradients in the forward, not the loss
    assert losses['per_stage']['loss'].item() == total
    assert losses['stages']['loss'].item() == pytest.approx(total / n, rel=1e-5)
    assert losses['weights']['loss'].item() == pytest.approx(total / (1 + eta * (n - 1)), rel=1e-5)
    assert losses['none']['feature'].item() == pytest.approx(n * losses['stages']['feature'].item(), rel=1e-5)
    # 'none' is the twin alone's objective plus the hybrid terms: CE(z_S) + eta * (n-1)/m * sum of m sampled CEs
    ce = F.cross_entropy(out['logits'], y) + eta * out['path_scale'] * sum(
        F.cross_entropy(z, y) for z in out['hybrid_logits'])
    assert losses['none']['loss'].item() - ce.item() == pytest.approx(1e-3 * losses['none']['feature'].item(),
                                                                      rel=1e-4)


@pytest.mark.parametrize('hybrid_paths', [None, 2])
def test_per_stage_normalization_divides_each_stage_gradient_by_its_weights(hybrid_paths):
    config = JointRDConfig(eta_min=0.5, eta_horizon=10, feature_loss_weight=1e-3, hybrid_paths=hybrid_paths,
                           kd_weight=0.5, loss_normalization='none')
    ref = pair(config, arch='resnet18_cifar')
    per_stage = copy.deepcopy(ref)
    per_stage.config = dataclasses.replace(config, loss_normalization='per_stage')
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    outs = {}
    for name, model in (('none', ref), ('per_stage', per_stage)):
        model.set_epoch(3, 0, 10)
        model.train()
        torch.manual_seed(5)  # the same sampled paths
        outs[name] = model(x, y)
        outs[name]['loss'].backward()
    eta, n = outs['none']['eta'], 4
    assert 0.5 < eta < 1 and outs['none']['paths'] == outs['per_stage']['paths']
    # the forward is unchanged: same logits, same (undivided) loss
    assert torch.equal(outs['none']['logits'], outs['per_stage']['logits'])
    assert outs['per_stage']['loss'].item() == pytest.approx(outs['none']['loss'].item(), rel=1e-6)
    weights = stage_weights(n, eta)
    assert weights == pytest.approx([1 + 3 * eta, 1 + 2 * eta, 1 + eta, 1])
    stage_of = {id(p): j for j, stage in enumerate(per_stage.student_stages.stages) for p in stage.parameters()}
    checked = set()
    for (name, p), q in zip(per_stage.student.named_parameters(), ref.student.parameters()):
        # the head (after stage n) gets the twin's own terms only: weight 1, like stage n
        w = weights[stage_of.get(id(p), n - 1)]
        assert (p.grad - q.grad / w).abs().max() <= 1e-4 * (q.grad / w).abs().max(), name
        checked.add(stage_of.get(id(p), 'head'))
    assert checked == {0, 1, 2, 3, 'head'}
    # the gradients really differ from 'none' where W > 1
    first = next(per_stage.student_stages.stages[0].parameters())
    assert not torch.allclose(first.grad, next(ref.student_stages.stages[0].parameters()).grad)


def test_scale_grad_is_identity_forward_and_scales_backward():
    x = torch.randn(3, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([0.25, 0.5, 0.75]))
    assert scale_grad(x, 1.0) is x


def test_weights_normalization_at_eta_zero_trains_the_twin_as_if_alone():
    config = JointRDConfig(eta_min=0.0, eta_horizon=2, loss_normalization='weights')
    model = pair(config)
    model.set_epoch(3, 0, 4)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    out = model(x, y)
    assert out['eta'] == 0
    model.loss(out, y)['loss'].backward()
    twin = copy.deepcopy(model.student)
    twin.zero_grad()
    F.cross_entropy(twin(x), y).backward()
    for (name, p), q in zip(model.student.named_parameters(), twin.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_margin_formula():
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.1]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 1.0]))
    m = bn_margin(bn)
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda v: 0.5 * math.erfc(-v / math.sqrt(2))  # noqa: E731
    assert m[0].item() == pytest.approx(0 - 1 * phi(0) / Phi(0), rel=1e-5)
    assert m[1].item() == pytest.approx(-1 - 2 * phi(-0.5) / Phi(0.5), rel=1e-5)
    assert m[2].item() == pytest.approx(-0.3)  # Phi(-10) < 1e-3: -3s


def test_gradients_reach_first_stage_through_teacher_tails_and_teacher_stays_frozen():
    model = pair(JointRDConfig(lean_memory=False))  # lean memory detaches the returned hybrid logits
    model.train()
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert not model.teacher.training
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = model(x, y)
    # the hybrid CE terms alone give the student's first stage a gradient (it flows through the teacher's tails)
    hybrid = sum(F.cross_entropy(z, y) for z in out['hybrid_logits'])
    grad = torch.autograd.grad(hybrid, model.student.layer1[0].conv1.weight, retain_graph=True)[0]
    assert grad.abs().sum() > 0
    out['loss'].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    optimizer.step()
    for key, value in model.teacher.state_dict().items():  # weights AND BN running statistics
        assert torch.equal(value, teacher_state[key]), key
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_joint_mode_updates_teacher_only_through_its_own_loss():
    model = pair(JointRDConfig(teacher_mode='joint', lean_memory=False))  # hybrid logits attached to the tails
    model.train()
    assert model.teacher.training
    alone = copy.deepcopy(model.teacher)  # the same teacher, fed only its own batch
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = model(x, y)
    alone(x)
    # the hybrid paths ran student features through the teacher in train mode, but its BN running statistics saw
    # only its own batch
    for key, value in alone.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[key], value), key
    assert not torch.equal(model.teacher.bn1.running_mean, pair().teacher.bn1.running_mean)  # they did update
    hybrid = sum(F.cross_entropy(z, y) for z in out['hybrid_logits'])
    teacher_params = [p for p in model.teacher.parameters()]
    grads = torch.autograd.grad(hybrid, teacher_params, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads)  # the student's loss never moves the teacher
    out['loss'].backward()
    assert model.teacher.fc.weight.grad.abs().sum() > 0  # its own CE does


def test_eval_mode_is_the_twin():
    model = pair().eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model.student(x))


def test_path_sampling_statistics_and_scale():
    model = pair(JointRDConfig(hybrid_paths=1), arch='resnet18_cifar')
    assert model.num_stages == 4
    torch.manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(600):
        paths = model._sample_paths()
        assert len(paths) == 1
        counts[paths[0]] += 1
    assert counts[0] == 0
    freq = counts[1:] / 600
    assert torch.all((freq - 1 / 3).abs() < 0.06), freq
    model.train()
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert out['path_scale'] == pytest.approx(3.0) and len(out['hybrid_logits']) == 1


def test_margin_falls_back_to_mse_where_no_preactivation():
    model = pair(JointRDConfig(feature_loss_weight=1e-3), arch='efficientnet_b0')
    assert not model.uses_margin and type(model.feature_loss).__name__ == 'MSEFeatureLoss'
    assert pair(JointRDConfig(feature_loss_weight=1e-3)).uses_margin


def test_stage_layout_mismatch_is_a_clear_error():
    with pytest.raises(StageLayoutError, match=r'resnet20_cifar has 3 stages.*plain_resnet18_cifar has 4'):
        JointRD(timm.create_model('plain_resnet18_cifar'), timm.create_model('resnet20_cifar'))


def test_config_errors():
    with pytest.raises(ValueError, match=r"Unknown JointRD setting\(s\) \['etamin'\]"):
        JointRDConfig.from_dict({'etamin': 0.5})
    with pytest.raises(ValueError, match="teacher_mode must be 'frozen' or 'joint'"):
        JointRDConfig(teacher_mode='both')
    with pytest.raises(ValueError, match=r"loss_normalization must be one of \['stages', 'none', 'weights', 'per_stage'\].*got 'mean'"):
        JointRDConfig(loss_normalization='mean')


@pytest.mark.parametrize('dirac', [False, True, (0.0, 1.0)])
def test_twin_initialised_from_the_teacher(dirac):
    """jointrd_model(init_student_from_teacher=True): every twin weight that the teacher has starts equal to it
    (through the Dirac parametrisation: the effective conv equals the teacher's conv), nothing else changes."""
    from jointrd_timm.integrations.torchdistill import jointrd_model
    torch.manual_seed(0)
    model = jointrd_model(teacher=dict(model_name='resnet20_cifar', num_classes=10),
                          student=dict(model_name='plain_resnet20_cifar', num_classes=10, dirac=bool(dirac),
                                       **(dict(dirac_init=dirac) if isinstance(dirac, tuple) else {})),
                          init_student_from_teacher=True)
    teacher = dict(model.teacher.named_parameters())
    compared = 0
    for name, module in model.student.named_modules():
        if isinstance(module, torch.nn.Conv2d) and f'{name}.weight' in teacher:
            torch.testing.assert_close(module.weight, teacher[f'{name}.weight'])  # effective weight under Dirac
            if dirac == (0.0, 1.0) and name != 'conv1':  # started as its plain weight: the teacher's, stored as is
                assert torch.equal(module.parametrizations.weight.original, teacher[f'{name}.weight'])
            compared += 1
    assert compared == 19  # stem + 18 block convs of resnet20 (projections are gone from the twin)
    torch.testing.assert_close(model.student.fc.weight, teacher['fc.weight'])


def test_a_shared_activation_leaves_nothing_on_the_feature_tap():
    # SE-ResNet blocks apply one ReLU module several times: only the last call is the feature, the others must not
    # stay on the hook (they would hold the graph, and deployable() could not deep-copy the twin)
    # (the taps exist only when the feature loss reads them, lambda > 0)
    assert pair(arch='legacy_seresnet18')._student_tap is None
    jointrd = pair(JointRDConfig(feature_loss_weight=1e-3), arch='legacy_seresnet18')
    jointrd.set_epoch(0, 1, 1)
    jointrd.train()(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))['loss'].backward()
    assert jointrd._student_tap.values == [] and jointrd._teacher_tap.values == []
    copy.deepcopy(jointrd.student)


def test_jointrd_takes_its_config_as_a_dict_and_refuses_other_types():
    teacher = timm.create_model('resnet20_cifar', num_classes=10)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10)
    pair = JointRD(twin, teacher, dict(eta_min=1.0, kd_weight=0.5), num_epochs=1, steps_per_epoch=2)
    assert pair.config == JointRDConfig(eta_min=1.0, kd_weight=0.5)
    with pytest.raises(ValueError, match=r"Unknown JointRD setting\(s\) \['nosuch'\]"):
        JointRD(twin, teacher, dict(nosuch=1))
    with pytest.raises(TypeError, match='JointRD config must be a JointRDConfig or a dict of its fields, got int'):
        JointRD(twin, teacher, 5)


def test_a_teacher_given_no_weights_is_warned_about(tmp_path):
    import warnings
    from jointrd_timm.integrations.hub import save_trained_model
    from jointrd_timm.integrations.torchdistill import jointrd_model
    kwargs = dict(model_name='resnet20_cifar', num_classes=10)
    with pytest.warns(UserWarning, match=r'The teacher resnet20_cifar is given no weights .* randomly initialised'):
        jointrd_model(kwargs)
    folder = save_trained_model(timm.create_model('resnet20_cifar', num_classes=10), tmp_path / 't')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        jointrd_model(dict(kwargs, checkpoint=str(folder)))


def test_a_frozen_teacher_with_a_re_initialised_head_is_refused(tmp_path):
    """reset_head on a teacher that stays frozen (JointRD's default, CAKD, APS, step-wise): its random classifier
    would give every target; a joint teacher, which trains, may start so."""
    from jointrd_timm.integrations.hub import save_trained_model
    from jointrd_timm.integrations.torchdistill import aps_model, cakd_model, jointrd_model
    folder = save_trained_model(timm.create_model('resnet20_cifar', num_classes=100), tmp_path / 'teacher')
    teacher = dict(model_name='resnet20_cifar', num_classes=10, checkpoint=str(folder), reset_head=True)
    for build in (lambda: jointrd_model(teacher), lambda: cakd_model(teacher), lambda: aps_model(teacher)):
        with pytest.raises(ValueError, match='reset_head re-initialises the classifier of a teacher that stays frozen'):
            build()
    joint = jointrd_model(teacher, jointrd=dict(teacher_mode='joint'))
    assert joint.teacher.get_classifier().out_features == 10
