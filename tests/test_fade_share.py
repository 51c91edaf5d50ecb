"""The 'share' fade (twins.fade.ShareGain / pin_shortcut_share) and the fade probes (twins.probe)."""
import pytest
import timm
import torch
from torch import nn

import jointrd_timm
from jointrd_timm.methods import FadingStudent, JointRD, JointRDConfig
from jointrd_timm.recipes import DEFAULT_RECIPE
from jointrd_timm.twins.fade import deployable, pin_shortcut_share, set_shortcut_scale, ShareGain
from jointrd_timm.twins.probe import FadeProbe, batchnorm_drift


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5


@pytest.fixture
def pair():
    torch.manual_seed(0)
    teacher = timm.create_model('resnet20_cifar', num_classes=10, zero_init_last=False)
    _randomize_bn(teacher)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True)
    jointrd_timm.load_teacher_weights(twin, teacher)
    return teacher, twin


def test_share_fade_starts_as_the_teacher_and_deploys_as_the_plain_twin(pair):
    teacher, twin = pair
    pin_shortcut_share(twin)
    pin_shortcut_share(twin)  # idempotent
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(teacher.train()(x), twin.train()(x))
    gains = [m for m in twin.modules() if isinstance(m, ShareGain)]
    assert len(gains) == 9 and all(float(g.gain) == 1.0 and float(g.reference) > 0 for g in gains)
    set_shortcut_scale(twin, 0.0)
    plain = timm.create_model('plain_resnet20_cifar', num_classes=10)
    deployed = deployable(twin)
    assert not any(isinstance(m, ShareGain) for m in deployed.modules())
    plain.load_state_dict(deployed.state_dict())  # strict: no gain buffers left
    assert torch.equal(plain.eval()(x), twin.eval()(x))


def test_share_fade_holds_the_shortcut_share_when_a_branch_shrinks(pair):
    """Shrinking a branch's last BN by 10 leaves the shortcut's share of that block where 'share' puts it; with
    'scale' the shortcut's share grows (what a network can do for free while s falls)."""
    _, twin = pair
    block = 'layer2.1'
    x = torch.randn(8, 3, 32, 32)
    shares = {}
    for mode in ('scale', 'share'):
        model = __import__('copy').deepcopy(twin).train()
        if mode == 'share':
            pin_shortcut_share(model)
        set_shortcut_scale(model, 0.5)
        with FadeProbe(model) as probe:
            model(x)  # the first step measures the share fade's reference
            probe.reset()
            model(x)
            before = probe.stats()[block]['shortcut_share']
            bn = model.get_submodule(block).bn2
            bn.weight.data *= 0.1
            bn.bias.data *= 0.1
            probe.reset()
            model(x)
            shares[mode] = (before, probe.stats()[block]['shortcut_share'])
    before, after = shares['share']
    assert after == pytest.approx(before, rel=1e-4)
    before, after = shares['scale']
    assert after > before + 0.1


def test_share_gain_state_resumes_and_eval_uses_the_running_gain(pair):
    _, twin = pair
    pin_shortcut_share(twin)
    twin.train()
    for _ in range(3):
        twin(torch.randn(4, 3, 32, 32))
    gain = next(m for m in twin.modules() if isinstance(m, ShareGain))
    branch, shortcut = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    gain.eval()
    assert torch.equal(gain(branch, shortcut, torch.tensor(0.5)), 0.5 * gain.gain)
    resumed = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True)
    pin_shortcut_share(resumed)
    resumed.load_state_dict(twin.state_dict())  # strict, the gains' reference and running gain included
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(resumed.eval()(x), twin.eval()(x))


def test_share_gain_measures_the_ratio_against_the_first_step():
    gain = ShareGain(momentum=0.5).train()
    branch, shortcut = torch.full((2, 3), 2.0), torch.full((2, 3), 1.0)
    assert float(gain(branch, shortcut, torch.tensor(1.0))) == pytest.approx(1.0)
    assert float(gain.reference) == pytest.approx(2.0)
    # branch halves: the shortcut is scaled by half too, and the running gain moves halfway towards it
    assert float(gain(branch / 2, shortcut, torch.tensor(0.8))) == pytest.approx(0.4)
    assert float(gain.gain) == pytest.approx(0.75)


def test_methods_and_recipe_carry_the_fade_mode(pair):
    teacher, twin = pair
    with pytest.raises(ValueError, match="shortcut_fade_mode must be one of"):
        JointRDConfig(shortcut_fade=0.5, shortcut_fade_mode='gain')
    with pytest.raises(ValueError, match="shortcut_fade_mode must be one of"):
        FadingStudent(twin, 0.5, mode='gain')
    alone = FadingStudent(__import__('copy').deepcopy(twin), 0.5, mode='share', num_epochs=1, steps_per_epoch=4)
    assert sum(isinstance(m, ShareGain) for m in alone.modules()) == 9
    pair_method = JointRD(twin, teacher, JointRDConfig(shortcut_fade=0.5, shortcut_fade_mode='share'),
                          num_epochs=1, steps_per_epoch=4)
    assert sum(isinstance(m, ShareGain) for m in pair_method.student.modules()) == 9
    recipe = DEFAULT_RECIPE.replace(shortcut_fade_mode='share')
    assert recipe.jointrd_fields()['shortcut_fade_mode'] == 'share'
    assert recipe.twin_alone_model('resnet20_cifar', None)['kwargs']['shortcut_fade_mode'] == 'share'
    assert 'shortcut_fade_mode' not in DEFAULT_RECIPE.jointrd_fields()


def test_probe_records_the_terms_and_leaves_the_outputs_unchanged(pair):
    _, twin = pair
    twin.train()
    set_shortcut_scale(twin, 0.25)
    x = torch.randn(4, 3, 32, 32)
    code = {n: m.code for n, m in twin.named_modules() if hasattr(m, 'code')}
    before = twin(x)
    block = twin.get_submodule('layer1.0')
    inputs = {}
    handle = block.register_forward_hook(lambda m, a, o: inputs.__setitem__('x', a[0]))
    with FadeProbe(twin) as probe:
        out = twin(x)
        stats = probe.stats()['layer1.0']
        out.sum().backward()
        grads = probe.gradient_norms()
    handle.remove()
    assert torch.equal(out, before)
    assert {n: m.code for n, m in twin.named_modules() if hasattr(m, 'code')} == code
    # by hand: the block's branch and its scaled identity shortcut
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.act1(block.bn1(block.conv1(inputs['x'])))))
        shortcut = 0.25 * inputs['x']
    b, s = branch.pow(2).mean().sqrt().item(), shortcut.pow(2).mean().sqrt().item()
    assert stats['branch_rms'] == pytest.approx(b, rel=1e-5)
    assert stats['shortcut_rms'] == pytest.approx(s, rel=1e-5)
    assert stats['shortcut_share'] == pytest.approx(s / (b + s), rel=1e-5)
    expected = torch.stack([p.grad.pow(2).sum() for p in block.parameters()]).sum().sqrt().item()
    assert grads['layer1.0'] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match='no fading blocks'):
        FadeProbe(timm.create_model('plain_resnet20_cifar', num_classes=10))


def test_batchnorm_drift_is_zero_for_matching_statistics_and_leaves_them_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        h = model[0](x)
    model[1].running_mean = h.mean((0, 2, 3))
    model[1].running_var = h.var((0, 2, 3), unbiased=False)
    mean, var = model[1].running_mean.clone(), model[1].running_var.clone()
    assert batchnorm_drift(model.eval(), x)['1'] == pytest.approx(0.0, abs=1e-4)
    assert not model.training
    assert torch.equal(model[1].running_mean, mean) and torch.equal(model[1].running_var, var)
    model[1].running_var = var * 4
    assert batchnorm_drift(model, x)['1'] == pytest.approx(float(torch.log(torch.tensor(4.0))) + 0.0, rel=0.05)
