"""A leaky fade (shortcut_fade_leak, jointrd_timm.twins.leak): the twin's ReLUs leak while its shortcuts fade,
0 at both ends of the fade, and the deployed twin holds ReLUs again."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import jointrd_timm  # noqa: F401
from jointrd_timm.methods import JointRD, JointRDConfig
from jointrd_timm.methods.fading import FadingStudent, ShortcutFade
from jointrd_timm.recipes import DEFAULT_RECIPE
from jointrd_timm.twins.fade import deployable, finish_fade, is_fading, set_shortcut_scale, shortcut_scale
from jointrd_timm.twins.leak import LeakingReLU, activation_leaks, make_leaky, restore_relus, set_activation_leak
from jointrd_timm.twins.transfer import load_teacher_weights


def _pair(arch='resnet20_cifar'):
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10).eval()
    twin = timm.create_model(f'plain_{arch}', num_classes=10, shortcut_fade=True)
    load_teacher_weights(twin, teacher)
    return teacher, twin


def _relus(model):
    return [m for m in model.modules() if type(m) is nn.ReLU]


def test_leaking_relu_is_the_relu_at_slope_zero_and_the_leaky_relu_above():
    x = torch.randn(4, 8, requires_grad=True)
    act = LeakingReLU()
    assert torch.equal(act(x), torch.relu(x))
    set_activation_leak(act, 0.2)
    out = act(x)
    assert torch.allclose(out, F.leaky_relu(x, 0.2), atol=1e-7)
    out.sum().backward()
    assert torch.allclose(x.grad, torch.where(x > 0, 1.0, 0.2))
    assert 'negative_slope=0.2' in repr(act) and act.state_dict() == {}  # the slope is not in the state dict
    with pytest.raises(ValueError, match='an activation leak must be a number >= 0'):
        set_activation_leak(act, -0.1)


def test_make_leaky_replaces_every_relu_module_without_changing_the_function_and_restore_gives_them_back():
    teacher, twin = _pair()
    count = len(_relus(twin))
    inplace = [m.inplace for m in _relus(twin)]
    x = torch.randn(2, 3, 32, 32)
    twin.eval()
    before = twin(x)
    assert make_leaky(twin) == count > 0 and not _relus(twin)
    assert make_leaky(twin) == count  # idempotent
    assert torch.equal(twin(x), before)  # slope 0: the same function, bit for bit
    assert torch.equal(twin(x), teacher(x))  # s = 1: still the teacher
    set_activation_leak(twin, 0.1)
    assert not torch.allclose(twin(x), before)
    with pytest.raises(ValueError, match=r'The activations still leak \(negative slope 0.1'):
        restore_relus(twin)
    assert activation_leaks(twin) == [pytest.approx(0.1)] * count  # refused: nothing changed
    set_activation_leak(twin, 0.0)
    restore_relus(twin)
    assert [m.inplace for m in _relus(twin)] == inplace and not activation_leaks(twin)
    assert torch.equal(twin(x), before)


def test_the_slope_peaks_mid_fade_the_twin_starts_as_its_teacher_and_deploys_with_relus():
    fade = ShortcutFade(1.0, leak=0.3)
    assert [fade.leak_at(s) for s in (1.0, 0.5, 0.0)] == [0.0, pytest.approx(0.3), 0.0]
    assert fade.leak_at(0.25) == pytest.approx(0.3 * 4 * 0.25 * 0.75)
    teacher, twin = _pair()
    method = FadingStudent(twin, fade, num_epochs=1, steps_per_epoch=8).train()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        teacher.train()
        assert torch.equal(method(x), teacher(x))  # step 0: s = 1, slope 0, the teacher exactly
    leaks = []
    for _ in range(6):
        method(x)
        leaks.append(activation_leaks(twin)[0])
        applied = shortcut_scale(twin)  # the s of this step (one fade for all blocks)
        assert activation_leaks(twin) == [pytest.approx(fade.leak_at(applied))] * len(activation_leaks(twin))
    assert max(leaks) > 0.2 and leaks.index(max(leaks)) not in (0, len(leaks) - 1)  # rises, then falls
    method(x)  # the last step: s = 0, slope 0
    assert activation_leaks(twin) == [0.0] * len(activation_leaks(twin))
    twin.eval()
    deployed = deployable(twin)
    assert not is_fading(deployed) and not any(isinstance(m, LeakingReLU) for m in deployed.modules())
    assert len(_relus(deployed)) == len(activation_leaks(twin))
    assert torch.equal(deployed(x), twin(x))


def test_jointrd_sets_the_slope_from_its_shortcut_scale_and_finish_fade_refuses_a_leaking_twin():
    teacher, twin = _pair()
    model = JointRD(twin, teacher, JointRDConfig(shortcut_fade=1.0, shortcut_fade_leak=0.2)).train()
    model.set_epoch(0, steps_per_epoch=4, num_epochs=2)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for _ in range(3):
        model(x, y)
    s = model.shortcut_scale
    assert 0 < s < 1 and activation_leaks(twin)[0] > 0
    with pytest.raises(ValueError, match='have not faded out'):
        finish_fade(twin)
    set_shortcut_scale(twin, 0.0)  # shortcuts gone but the activations still leak: refused, nothing changed
    with pytest.raises(ValueError, match='The activations still leak'):
        finish_fade(twin)
    assert is_fading(twin) and activation_leaks(twin)[0] > 0


def test_bad_leaks_and_models_without_relu_modules_are_refused_and_recipes_carry_the_leak():
    for bad in (-0.1, 1.5, True, '0.2'):
        with pytest.raises(ValueError, match=r'shortcut_fade_leak must be in \[0, 1\]'):
            JointRDConfig(shortcut_fade_leak=bad)  # checked even without a fade
    _, twin = _pair()
    for name, module in list(twin.named_modules()):
        if type(module) is nn.ReLU:
            parent, _, child = name.rpartition('.')
            setattr(twin.get_submodule(parent), child, nn.SiLU())
    with pytest.raises(ValueError, match='has no nn.ReLU module to make leaky'):
        FadingStudent(twin, ShortcutFade(0.5, leak=0.1))
    recipe = DEFAULT_RECIPE.replace(shortcut_fade_leak=0.2)
    assert recipe.id == 'default,shortcut_fade_leak=0.2' and recipe.jointrd_config().fade.leak == 0.2
    assert recipe.fade_fields()['shortcut_fade_leak'] == 0.2
    assert 'shortcut_fade_leak' not in DEFAULT_RECIPE.fade_fields()
    from jointrd_timm.integrations.torchdistill import fading_model
    alone = fading_model(dict(model_name='plain_resnet20_cifar', num_classes=10), 0.5, shortcut_fade_leak=0.2)
    assert alone.fade.leak == 0.2 and activation_leaks(alone.student)
