"""The twin API beyond the common path: shortcut scales that are not weights, numeric scalars of other types, Dirac
twins built on another device, dirac_init's form, CIFAR models under timm's device / dtype arguments, make_plain on a
twin whose blocks keep their class, and a deployed twin saved by timm's own save_for_hf."""
import json

import numpy as np
import pytest
import timm
import torch
from torch import nn

import jointrd_timm  # noqa: F401  (plain_* names)
from jointrd_timm import make_plain
from jointrd_timm.twins.fade import (SCALE, deployable, finish_fade, make_fading, set_shortcut_scale,
                                     shortcut_scales)


def _fading():
    torch.manual_seed(0)
    return make_fading(timm.create_model('resnet18', num_classes=5)).eval()


@pytest.mark.parametrize('value', [float('nan'), 1.5, -0.1, float('inf')])
def test_a_shortcut_scale_outside_zero_to_one_is_refused(value):
    model = _fading()
    with pytest.raises(ValueError, match=r'shortcut scale s weighs the shortcut from 1 .* give values in \[0, 1\]'):
        set_shortcut_scale(model, value)
    values = [0.5] * len(shortcut_scales(model))
    values[-1] = value
    with pytest.raises(ValueError, match=r'give values in \[0, 1\]'):
        set_shortcut_scale(model, values)
    assert shortcut_scales(model) == [1.0] * len(values)  # nothing was set


def test_a_shortcut_scale_may_be_any_real_scalar():
    model = _fading()
    for value in (np.float32(0.25), torch.tensor(0.5), np.float64(0.75), 1):
        set_shortcut_scale(model, value)
        assert shortcut_scales(model) == [float(value)] * len(shortcut_scales(model))
    set_shortcut_scale(model, np.zeros(len(shortcut_scales(model))))
    assert set(shortcut_scales(model)) == {0.0}


def test_finish_fade_refuses_while_any_block_still_has_a_shortcut():
    model = _fading()
    set_shortcut_scale(model, 0.0)
    blocks = [m for m in model.modules() if hasattr(m, SCALE)]
    getattr(blocks[-1], SCALE).fill_(-0.5)  # below 0: the largest scale is 0, the shortcut still there
    with pytest.raises(ValueError, match=r'scale s = -0.5, not 0'):
        finish_fade(model)
    getattr(blocks[-1], SCALE).fill_(float('nan'))
    with pytest.raises(ValueError, match=r'scale s = nan, not 0'):
        finish_fade(model)


def test_a_dirac_twin_builds_on_the_meta_device_and_in_float64():
    meta = timm.create_model('plain_resnet18', dirac=True, device='meta')
    params = dict(meta.named_parameters())
    alphas = [p for n, p in params.items() if n.endswith('alpha')]
    assert alphas and all(p.device.type == 'meta' for p in params.values())
    double = timm.create_model('plain_resnet18', dirac=True, dtype=torch.float64, num_classes=3).eval()
    assert all(p.dtype == torch.float64 for p in double.parameters())
    assert double(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize('dirac_init', [(1.0,), 0.5, (1.0, 'a'), (1.0, 0.1, 0.2)])
def test_dirac_init_must_be_two_numbers(dirac_init):
    with pytest.raises(ValueError, match=r'dirac_init must be two numbers, \(alpha, beta\)'):
        timm.create_model('plain_resnet18', dirac=True, dirac_init=dirac_init)


@pytest.mark.parametrize('name', ['resnet20_cifar', 'plain_resnet20_cifar'])
def test_cifar_models_take_timms_device_and_dtype(name):
    model = timm.create_model(name, dtype=torch.float64, num_classes=4).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).shape == (2, 4)
    meta = timm.create_model(name, device='meta')
    assert {p.device.type for p in meta.parameters()} == {'meta'}


@pytest.mark.parametrize('name', ['plain_regnetx_002', 'plain_resnet18'])
def test_make_plain_refuses_a_twin_whatever_its_blocks_class(name):
    twin = timm.create_model(name)
    with pytest.raises(ValueError, match='is already plain'):
        make_plain(twin)


def test_a_deployed_twin_saved_by_timms_own_save_for_hf_loads_back(tmp_path):
    from timm.models import save_for_hf
    torch.manual_seed(0)
    fading = timm.create_model('plain_resnet18', shortcut_fade=True, dirac=True, num_classes=3).eval()
    set_shortcut_scale(fading, 0.0)
    deployed = deployable(fading)
    save_for_hf(deployed, str(tmp_path / 'saved'), safe_serialization=True)
    loaded = timm.create_model(f'local-dir:{tmp_path / "saved"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), deployed(x))
    assert not any(n.endswith(('alpha', 'beta')) for n, _ in loaded.named_parameters())


def test_the_fade_api_is_reachable_from_the_package():
    names = ('make_fading', 'set_shortcut_scale', 'shortcut_scales', 'finish_fade', 'is_fading', 'NotResidualError',
             'UnsupportedBlockError')
    assert all(name in jointrd_timm.__all__ and hasattr(jointrd_timm, name) for name in names)
    model = jointrd_timm.make_fading(timm.create_model('resnet18', num_classes=3))
    jointrd_timm.set_shortcut_scale(model, 0.0)
    assert jointrd_timm.is_fading(model) and not jointrd_timm.is_fading(jointrd_timm.finish_fade(model))


def test_a_feature_twin_carries_its_own_config_and_the_tag_asked_for():
    features = timm.create_model('plain_resnet18', features_only=True)
    assert features.pretrained_cfg['architecture'] == 'plain_resnet18' and 'num_classes' not in features.pretrained_cfg
    tagged = timm.create_model('plain_resnet18.tv_in1k', features_only=True)
    expected = timm.models.get_pretrained_cfg('resnet18.tv_in1k').to_dict()
    assert tagged.pretrained_cfg['tag'] == 'tv_in1k' and tagged.pretrained_cfg['architecture'] == 'plain_resnet18'
    assert tagged.pretrained_cfg['input_size'] == expected['input_size']
    assert tagged.pretrained_cfg.get('test_input_size') == expected.get('test_input_size')


def _trained_looking(model):
    with torch.no_grad():  # BN statistics away from their init, so equal outputs mean the weights travelled
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize('derive', ['make_plain', 'make_fading'])
def test_a_twin_made_in_place_saves_as_its_twin_and_loads_back(tmp_path, derive):
    from jointrd_timm.integrations.hub import load_model, save_trained_model
    torch.manual_seed(0)
    teacher = timm.create_model('resnet18d', num_classes=5)
    twin = _trained_looking(getattr(jointrd_timm, derive)(teacher, keep_projection_shortcuts=True)).eval()
    assert twin.pretrained_cfg['architecture'] == 'plain_resnet18d'
    if derive == 'make_fading':
        assert twin.pretrained_model_args['shortcut_fade'] is True
        set_shortcut_scale(twin, 0.0)
    save_trained_model(twin, tmp_path / 'saved')
    config = json.loads((tmp_path / 'saved' / 'config.json').read_text())
    assert config['architecture'] == 'plain_resnet18d'
    assert config['model_args']['keep_projection_shortcuts'] is True
    from timm.models import save_for_hf
    save_for_hf(deployable(twin), str(tmp_path / 'timm'), safe_serialization=True)  # timm's own writer
    assert json.loads((tmp_path / 'timm' / 'config.json').read_text())['model_args'][
        'keep_projection_shortcuts'] is True
    for loaded in (load_model(str(tmp_path / 'saved')),
                   timm.create_model(f'local-dir:{tmp_path / "saved"}', pretrained=True),
                   timm.create_model(f'local-dir:{tmp_path / "timm"}', pretrained=True)):
        x = torch.randn(2, 3, 48, 40)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), deployable(twin)(x))
        assert any('downsample' in n for n, _ in loaded.named_parameters())  # the projections it kept


def test_a_twin_made_in_place_of_an_architecture_without_a_registered_twin_is_refused_at_save(tmp_path):
    from jointrd_timm.errors import InputError
    from jointrd_timm.integrations.hub import save_trained_model
    model = timm.create_model('resnet18', num_classes=3)
    model.pretrained_cfg = dict(model.pretrained_cfg, architecture='my_resnet')  # e.g. a user's own entrypoint
    twin = make_plain(model)
    assert twin.pretrained_cfg['architecture'] == 'my_resnet'
    with pytest.raises(InputError, match=r'twin of my_resnet .* timm knows no plain_my_resnet .* state_dict'):
        save_trained_model(twin, tmp_path / 'saved')
    assert not (tmp_path / 'saved').exists()


def test_a_dirac_twin_loads_a_teacher_tag_strictly_and_starts_as_the_teacher():
    teacher = timm.create_model('resnet20_cifar.ce_full_cifar10', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    for init in ((1.0, 0.1), (0.0, 1.0)):  # same classes as the teacher's file: timm loads strictly
        fading = timm.create_model('plain_resnet20_cifar.ce_full_cifar10', pretrained=True, shortcut_fade=True,
                                   dirac=True, dirac_init=init).eval()
        with torch.no_grad():
            torch.testing.assert_close(fading(x), teacher(x), rtol=1e-4, atol=1e-4)
        plain = timm.create_model('plain_resnet20_cifar.ce_full_cifar10', pretrained=True, dirac=True,
                                  dirac_init=init)
        convs = dict(deployable(plain).named_modules())
        for name, m in teacher.named_modules():
            if isinstance(m, torch.nn.Conv2d) and name in convs:  # the twin's effective convs are the teacher's
                torch.testing.assert_close(convs[name].weight, m.weight, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('feature_cls', ['hook', 'getter'])
def test_feature_twins_of_every_wrapper_load_the_teachers_weights(tmp_path, feature_cls):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    teacher = _trained_looking(timm.create_model('test_resnet'))
    file = tmp_path / 'teacher.safetensors'
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(file))
    kwargs = dict(pretrained=True, features_only=True, pretrained_cfg_overlay=dict(file=str(file)))
    listed = timm.create_model('plain_test_resnet.r160_in1k', **kwargs).eval()
    wrapped = timm.create_model('plain_test_resnet.r160_in1k', feature_cls=feature_cls, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = listed(x), wrapped(x)
    got = list(got.values()) if isinstance(got, dict) else got
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_make_fading_refuses_as_make_plain_does_with_the_reason():
    from jointrd_timm.twins import NotResidualError, UnsupportedBlockError
    with pytest.raises(NotResidualError, match='VGG has no shortcut addition anywhere'):
        make_fading(timm.create_model('vgg11', num_classes=3))
    with pytest.raises(UnsupportedBlockError, match=r'refused by design: the model mixes tokens with Attention'):
        make_fading(timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, depth=2))


class _UserTransformerBlock(nn.Module):
    """A user's transformer block on torch's own nn.MultiheadAttention, its shortcut in plain code."""

    def __init__(self, dim=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x):
        return x + self.attn(x, x, x, need_weights=False)[0]


def test_torchs_own_attention_is_named_as_the_token_mixer():
    """torch's nn.MultiheadAttention (torchvision's ViT, a user's transformer) is a token mixer like timm's
    Attention: refused by design, with its name, not as an unknown block."""
    from jointrd_timm.twins import UnsupportedBlockError
    from jointrd_timm.twins.derive import token_mixers
    model = nn.Sequential(_UserTransformerBlock(), _UserTransformerBlock())
    assert token_mixers(model) == ['MultiheadAttention'] and token_mixers(nn.Conv2d(3, 3, 1)) == []
    with pytest.raises(UnsupportedBlockError, match='mixes tokens with MultiheadAttention'):
        make_plain(model)
