"""The shortcut-free twins, in timm's test style: parametrised over registered plain_* models."""
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import jointrd_timm
from jointrd_timm import count_shortcut_additions, load_teacher_weights, make_plain
from jointrd_timm.models.plain_twins import TWIN_MODULES
from jointrd_timm.twins import NotResidualError, UnsupportedBlockError
from jointrd_timm.twins.dirac import apply_dirac, fold_dirac, has_dirac
from jointrd_timm.twins.verify import dead_parameters

# One small architecture for every family and every rule in the default run; the second ones of a family (the same
# rule on another variant: SE / ECA attention, bottlenecks, another stem) are slow-marked (run with -m slow). The
# coverage benchmark covers all of them.
SAMPLE = [
    'resnet20_cifar', 'resnet56_cifar', 'resnet18_cifar',  # CIFAR teachers (all in the suite)
    'resnet18', 'resnet10t',  # resnet.py
    'resnetv2_18',  # pre-activation
    'regnetx_002',  # regnet
    'efficientnet_b0', 'mobilenetv3_small_050', 'efficientnet_em', 'mobilenetv4_conv_small',
    'hardcorenas_a',  # efficientnet blocks (DS, IR, Edge, UIR)
    'convnext_atto',  # convnext
    'repvgg_a0', 'gernet_s', 'resnet32ts',  # byobnet
    'cspresnet50', 'cs3darknet_s',  # cspnet
    'res2net50_26w_4s', 'resnest14d', 'skresnet18', 'nf_resnet26', 'dla34', 'legacy_seresnet18', 'hrnet_w18_small',
    # graph rules (families/graph.py; tests/test_graph_rules.py runs every graph-rule class)
    'dpn48b', 'ghostnet_050', 'repvit_m0_9', 'starnet_s050', 'legacy_xception',
]
SAMPLE_SLOW = ['resnet50_cifar', 'resnet26d', 'seresnext26t_32x4d', 'ecaresnet26t', 'resnetrs50', 'resnetv2_50',
               'regnety_002', 'mobilenetv2_050', 'mobileone_s0']
INPUT = 64


def _input(model, batch=2, side=INPUT):
    cfg = model.pretrained_cfg
    size = cfg['input_size'][1:] if cfg.get('fixed_input_size') else (min(side, cfg['input_size'][1]),) * 2
    return torch.randn(batch, cfg['input_size'][0], *size)


@pytest.mark.parametrize('teacher', SAMPLE + [pytest.param(t, marks=pytest.mark.slow) for t in SAMPLE_SLOW])
def test_twin_has_no_shortcut_left_and_every_parameter_gets_a_gradient(teacher):
    torch.manual_seed(0)
    residual = timm.create_model(teacher)
    twin = timm.create_model(f'plain_{teacher}', num_classes=7)
    assert twin.pretrained_cfg['architecture'] == f'plain_{teacher}'
    assert count_shortcut_additions(residual) > 0
    assert count_shortcut_additions(twin) == 0
    assert twin.plain_report.shortcuts_removed == count_shortcut_additions(residual)
    # the plain twin has no projection branches left, hence no unused parameters
    assert all(not name.split('.')[-2].startswith(('downsample', 'project')) for name, _ in twin.named_parameters()
               if '.' in name and teacher not in ('regnetx_002', 'regnety_002'))
    x = _input(twin, side=32)  # a stride-32 net ends at 1x1: a gradient still reaches every parameter
    y = twin(x)
    assert y.shape == (2, 7)
    assert torch.isfinite(y).all()
    dead = dead_parameters(twin, x)
    assert dead == [], f'plain_{teacher}: parameters with an all-zero gradient at init: {dead[:5]}'


@pytest.mark.parametrize('teacher', ['resnet50', 'resnet56_cifar', 'regnetx_002'] + [
    pytest.param(t, marks=pytest.mark.slow) for t in ('convnext_atto', 'resnetv2_50', 'cspresnet50')])
def test_paper_variant_keeps_exactly_the_projections(teacher):
    residual = timm.create_model(teacher)
    twin = timm.create_model(f'plain_{teacher}', keep_projection_shortcuts=True)
    kept = twin.plain_report.kept_projections
    assert count_shortcut_additions(twin) == len(kept)
    assert count_shortcut_additions(residual) - len(kept) == twin.plain_report.shortcuts_removed
    if teacher == 'resnet50':  # layer1.0 (width 64 -> 256) and the stride-2 first blocks of layers 2-4
        assert kept == ['layer1.0', 'layer2.0', 'layer3.0', 'layer4.0']
    if teacher == 'resnet56_cifar':  # the paper's plain-CNN keeps the stride-2 projections of stages 2 and 3
        assert kept == ['layer2.0', 'layer3.0']


def test_paper_variant_dla_keeps_tree_projections():
    # DLA hands the projected shortcut from the tree to its first child block, so the per-module FX count cannot
    # see it; check the kept projection modules instead.
    twin = timm.create_model('plain_dla34', keep_projection_shortcuts=True)
    kept = twin.plain_report.kept_projections
    assert kept and all(twin.get_submodule(name).project is not None for name in kept)
    plain = timm.create_model('plain_dla34')
    assert all(plain.get_submodule(name).project is None for name in kept)


@pytest.mark.parametrize('teacher', ['resnet20_cifar', 'resnet18', 'regnetx_002', 'efficientnet_b0', 'convnext_atto'])
def test_features_only_channels_match_feature_info(teacher):
    features = timm.create_model(f'plain_{teacher}', features_only=True)
    outs = features(_input(features, 1) if hasattr(features, 'pretrained_cfg') else torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == features.feature_info.channels()
    assert count_shortcut_additions(features) == 0


@pytest.mark.parametrize('teacher', ['resnet20_cifar', 'resnet18', 'efficientnet_b0', 'convnext_atto'])
def test_forward_intermediates_match_forward_features(teacher):
    model = timm.create_model(f'plain_{teacher}').eval()
    x = _input(model, 1)
    final, intermediates = model.forward_intermediates(x)
    assert torch.allclose(final, model.forward_features(x), atol=1e-5)
    assert len(intermediates) == len(model.feature_info)


def test_cifar_resnet_intermediate_indices_follow_timm():
    from jointrd_timm.models.cifar_resnet import intermediate_indices
    assert intermediate_indices(4) == ([0, 1, 2, 3], 3)
    assert intermediate_indices(4, 2) == ([2, 3], 3)
    assert intermediate_indices(4, [0, -1]) == ([0, 3], 3)
    with pytest.raises(ValueError, match=r'last-n \(5\) is out of range \(1 to 4\)'):
        intermediate_indices(4, 5)
    with pytest.raises(ValueError, match=r'feature index 4 is out of range \(0 to 3\)'):
        intermediate_indices(4, [1, 4])
    model = timm.create_model('resnet20_cifar').eval()
    x = torch.randn(1, 3, 32, 32)
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [o.shape[1] for o in last_two] == [32, 64]
    assert model.prune_intermediate_layers(indices=[1]) == [1] and model.layer2 is not None
    assert isinstance(model.layer3, nn.Identity)


@pytest.mark.parametrize('teacher', ['resnet20_cifar', 'regnetx_002', 'mobilenetv3_small_050'] + [
    pytest.param(t, marks=pytest.mark.slow) for t in ('resnet18', 'repvgg_a0', 'dla34', 'res2net50_26w_4s')])
def test_torchscript_where_timm_scripts_the_teacher(teacher):
    try:
        torch.jit.script(timm.create_model(teacher))
    except Exception:
        pytest.skip(f'timm does not script {teacher} either')
    twin = timm.create_model(f'plain_{teacher}').eval()
    scripted = torch.jit.script(twin)
    x = _input(twin, 1)
    assert torch.allclose(scripted(x), twin(x), atol=1e-5)


def test_usual_timm_kwargs_and_reset_classifier():
    model = timm.create_model('plain_resnet18', num_classes=5, drop_rate=0.2, in_chans=1)
    assert model.num_classes == 5 and model.drop_rate == 0.2 and model.conv1.in_channels == 1
    model.reset_classifier(3)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)
    assert model.get_classifier().out_features == 3
    drop_path = timm.create_model('plain_resnet18', drop_path_rate=0.5)  # stochastic depth has no place in a plain net
    assert not any(type(m).__name__ == 'DropPath' for m in drop_path.modules())


@pytest.mark.parametrize('name', ['resnet20_cifar', 'plain_resnet20_cifar', 'resnet50_cifar', 'plain_resnet18'])
def test_head_options_behave_as_timms_resnet_head(name):
    """No pooling: unpooled, unflattened features (as timm's resnet18 gives them); 'catavgmax' doubles the
    classifier's input, at creation and through reset_classifier."""
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model(name, num_classes=0, global_pool='').eval()
    features = model.forward_features(x)
    assert features.dim() == 4 and torch.equal(model(x), features)
    model = timm.create_model(name, num_classes=5, global_pool='catavgmax')
    assert model.get_classifier().in_features == 2 * model.num_features and model(x).shape == (2, 5)
    model.reset_classifier(0, '')
    assert model(x).dim() == 4
    model.reset_classifier(3, 'catavgmax')
    assert model(x).shape == (2, 3) and model.forward_head(model.forward_features(x), pre_logits=True).shape == (
        2, 2 * model.num_features) == (2, model.head_hidden_size)
    model.reset_classifier(4)  # None keeps the pooling, as timm's ResNet does
    assert model.get_classifier().in_features == 2 * model.num_features and model(x).shape == (2, 4)
    model = model.double()
    model.reset_classifier(2)  # the new head on the model's dtype
    assert model(x.double()).dtype == torch.float64


def test_every_registered_twin_has_a_cfg_and_never_overwrites_timm():
    twins = timm.list_models('plain_*')
    assert len(twins) > 400
    teachers = set(timm.list_models()) - set(twins)
    for name in twins:
        assert name[len('plain_'):] in teachers
        assert timm.get_pretrained_cfg(name) is not None
        assert timm.models.model_entrypoint(name).__module__ == 'jointrd_timm.models.plain_twins'
    assert timm.models.model_entrypoint('resnet50').__module__ == 'timm.models.resnet'
    assert {'resnet56_cifar', 'plain_resnet56_cifar'} <= set(timm.list_models('*resnet56*'))


def test_import_is_cheap():
    code = ('import time, timm; t = time.perf_counter(); import jointrd_timm; '
            'print(time.perf_counter() - t)')
    seconds = float(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)
    assert seconds < 1.0, f'import jointrd_timm took {seconds:.2f} s after import timm'


@pytest.mark.parametrize('teacher', ['resnet20_cifar', 'resnet18', 'regnetx_002', 'efficientnet_b0', 'dla34'])
def test_teacher_weights_transfer(teacher):
    residual = timm.create_model(teacher)
    twin = timm.create_model(f'plain_{teacher}')
    dropped = load_teacher_weights(twin, residual.state_dict())
    removed = tuple(twin.plain_report.removed_modules)
    assert all(key.startswith(removed) for key in dropped)
    teacher_state = residual.state_dict()
    for key, value in twin.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key


def test_teacher_weights_transfer_into_dirac_twin_gives_teacher_convs():
    residual = timm.create_model('resnet20_cifar')
    twin = timm.create_model('plain_resnet20_cifar', dirac=True)
    load_teacher_weights(twin, residual)
    fold_dirac(twin)
    assert torch.allclose(twin.layer1[0].conv1.weight, residual.layer1[0].conv1.weight, atol=1e-5)


@pytest.mark.parametrize('teacher', ['resnet20_cifar', 'resnet50_cifar', 'regnetx_002', 'mobilenetv2_050'])
def test_dirac_fold_is_exact(teacher):
    torch.manual_seed(0)
    twin = timm.create_model(f'plain_{teacher}', dirac=True)
    assert has_dirac(twin)
    with torch.no_grad():  # move alpha/beta away from their init so the fold has something to fold
        for name, p in twin.named_parameters():
            if name.endswith(('weight.0.alpha', 'weight.0.beta')):
                p.uniform_(0.5, 1.5)
    twin.eval()
    x = _input(twin)
    before = twin(x)
    fold_dirac(twin)
    assert not has_dirac(twin)
    after = twin(x)
    err = (before - after).abs().max().item()
    print(f'{teacher}: Dirac fold max abs error {err:.2e}')
    assert err < 1e-4 * max(1.0, before.abs().max().item())
    assert not any('parametrizations' in k for k in twin.state_dict())


def test_dirac_delta_is_identity_at_alpha_one_beta_zero():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    model = nn.Sequential(conv)
    from jointrd_timm.twins.dirac import DiracWeight
    from torch.nn.utils import parametrize
    parametrize.register_parametrization(conv, 'weight', DiracWeight(conv.weight, 1, 1.0, 0.0))
    x = torch.randn(1, 4, 5, 5)
    y = model(x)
    assert torch.allclose(y[:, :4], x) and torch.all(y[:, 4:] == 0)


# -- bad input -------------------------------------------------------------------------------------------------------
def test_unknown_model_name():
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('plain_not_a_model')
    from jointrd_timm.twins.summary import describe_twin
    with pytest.raises(ValueError, match="Unknown timm model 'resnet5000'"):
        describe_twin('resnet5000')


def test_non_residual_model_is_refused():
    with pytest.raises(NotResidualError, match='no shortcut addition anywhere'):
        make_plain(timm.create_model('vgg11'))


class _HomeMadeResidual(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def test_unsupported_block_in_strict_mode_names_the_class():
    model = timm.create_model('resnet18')
    model.layer2.append(_HomeMadeResidual(128))
    with pytest.raises(UnsupportedBlockError, match=r'test_twins\._HomeMadeResidual \(first at `layer2\.2`\)'):
        make_plain(model)


def test_attention_inside_a_graph_rule_block_is_refused():
    """MetaFormerBlock has a graph rule for PoolFormer / ConvFormer; CAFormer's attention blocks are refused."""
    with torch.device('meta'):
        model = timm.create_model('caformer_s18')
    with pytest.raises(UnsupportedBlockError, match='refused by design: MetaFormer mixes tokens with Attention'):
        make_plain(model)


def test_dead_parameters_tells_a_bias_under_batchnorm_from_an_unused_parameter():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.body(x)

    net = Net().train()
    net(torch.randn(2, 3, 4, 4)).square().mean().backward()
    assert net.body[0].bias.grad.abs().max() < 1e-6  # cancelled by the batch mean in train mode ...
    dead = dead_parameters(net, torch.randn(2, 3, 4, 4))
    assert dead == ['unused.bias', 'unused.weight']  # ... but alive in eval mode, so not dead


def test_dead_parameters_tells_a_gain_held_at_zero_by_its_start_from_a_cut_off_one():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.gain = nn.Parameter(torch.zeros(1))  # starts at 0, so `scale` gets exactly zero gradient at init
            self.scale = nn.Parameter(torch.ones(1))
            self.cut = nn.Conv2d(3, 2, 1)  # computed, then multiplied by a constant 0: never trains

        def forward(self, x):
            return self.conv(x) * self.gain * self.scale + self.conv(x) + 0.0 * self.cut(x)

    net = Net()
    net(torch.randn(2, 3, 4, 4)).square().mean().backward()
    assert net.scale.grad.abs().max() == 0.0  # zero at init ...
    x = torch.randn(2, 3, 4, 4)
    assert dead_parameters(net, x, off_init=0.0) == ['cut.bias', 'cut.weight', 'scale']
    assert dead_parameters(net, x) == ['cut.bias', 'cut.weight']  # ... but alive once `gain` moves
    assert float(net.gain) == 0.0 and float(net.scale) == 1.0  # the check moved a copy, not the model


def test_transformer_is_refused_by_design():
    with pytest.raises(UnsupportedBlockError, match=r'Transformer \(and MLP-Mixer\) blocks are refused by design'):
        make_plain(timm.create_model('vit_tiny_patch16_224'))


def test_mlp_mixer_is_refused_like_a_transformer():
    with pytest.raises(UnsupportedBlockError, match='refused by design'):
        make_plain(timm.create_model('mixer_s32_224'))


def test_non_strict_leaves_unknown_blocks_and_reports_them():
    from jointrd_timm.twins.families.resnet import PlainBasicBlock
    model = timm.create_model('resnet18')
    model.layer1[0].__class__ = type('MyBlock', (type(model.layer1[0]),), {})  # a residual class with no rule
    with pytest.raises(UnsupportedBlockError, match='MyBlock'):
        make_plain(model)
    model = timm.create_model('resnet18')
    model.layer1[0].__class__ = type('MyBlock', (type(model.layer1[0]),), {})
    make_plain(model, strict=False)
    assert model.plain_report.unhandled == ['layer1.0']
    assert isinstance(model.layer1[1], PlainBasicBlock)


def test_non_strict_on_a_model_whose_every_residual_block_lacks_a_rule_says_why_it_still_fails():
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = torch.nn.Sequential(Residual(), Residual())
    with pytest.raises(UnsupportedBlockError, match=r'or call make_plain\(\.\.\., strict=False\)'):
        make_plain(model)
    with pytest.raises(UnsupportedBlockError, match='no block here has a rule') as refused:
        make_plain(model, strict=False)
    assert 'call make_plain' not in str(refused.value)


def test_make_plain_twice_is_an_error():
    twin = timm.create_model('plain_resnet18')
    with pytest.raises(ValueError, match='already plain'):
        make_plain(twin)


def test_state_dict_of_another_architecture_is_refused():
    twin = timm.create_model('plain_resnet34')
    with pytest.raises(ValueError, match='not the teacher of'):
        load_teacher_weights(twin, timm.create_model('resnet18').state_dict())
    with pytest.raises(ValueError, match='shapes differ'):
        load_teacher_weights(timm.create_model('plain_resnet18', num_classes=10), timm.create_model('resnet18'))


def test_derive_command_prints_summary(capsys):
    from jointrd_timm.cli import main
    assert main(['derive', 'resnet20_cifar']) == 0
    out = capsys.readouterr().out
    assert 'shortcut additions: 9 -> 0 (9 removed' in out
    assert 'resnet.BasicBlock x9' in out and 'FLOPs at 32x32' in out
    assert main(['derive', 'vgg11']) == 1


def test_twin_flags_must_be_true_or_false():
    for flag, value in (('dirac', 'yes'), ('shortcut_fade', 0.5), ('keep_projection_shortcuts', 1)):
        with pytest.raises(ValueError, match=f'plain_resnet20_cifar: {flag} must be true or false, got {value!r}'):
            timm.create_model('plain_resnet20_cifar', **{flag: value})


def test_equally_deep_projection_shortcut_is_cut():
    """Xception's projection blocks add ``self.stack(x) + self.shortcut(x)``: two opaque calls, equally deep. The
    operand named as a shortcut is the shortcut, so the twin has none left (it kept four before)."""
    from timm.models.xception_aligned import XceptionModule
    from jointrd_timm.deploy.memory import analyze_activation_memory
    from jointrd_timm.twins.verify import shortcut_additions
    assert shortcut_additions(XceptionModule(8, 16, stride=2, norm_layer=nn.BatchNorm2d)) == 1
    residual = timm.create_model('xception41', num_classes=10).eval()
    twin = make_plain(timm.create_model('xception41', num_classes=10)).eval()
    assert count_shortcut_additions(residual) == 12 == twin.plain_report.shortcuts_removed
    assert not [n for n, _ in twin.named_parameters() if '.shortcut.' in n]
    x = torch.randn(1, 3, 64, 64)
    assert analyze_activation_memory(twin, x).shortcut_additions == 0  # found on the whole graph, independently
    assert analyze_activation_memory(residual, x).shortcut_additions == 12
    paper = timm.create_model('plain_xception41', keep_projection_shortcuts=True)
    assert paper.plain_report.kept_projections == ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.11']
    assert count_shortcut_additions(paper) == 4


class _TwoSubBlocks(nn.Module):
    """A token mixer, then an MLP, each with its shortcut, in one forward (MetaFormer's block)."""

    def __init__(self):
        super().__init__()
        self.norm1, self.mix = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm2 = nn.BatchNorm2d(4)
        self.mlp = nn.Sequential(nn.Conv2d(4, 8, 1), nn.GELU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def test_second_shortcut_of_a_forward_is_measured_from_the_first_sum():
    """The MLP's shortcut starts at the token mixer's sum, several ops from the block's input: it counts, and the
    MetaFormer twins lose both shortcuts of every block (they kept the second one before)."""
    from jointrd_timm.deploy.memory import analyze_activation_memory
    from jointrd_timm.twins.verify import shortcut_additions
    assert shortcut_additions(_TwoSubBlocks()) == 2
    residual = timm.create_model('poolformer_s12', num_classes=10).eval()
    twin = make_plain(timm.create_model('poolformer_s12', num_classes=10)).eval()
    blocks = sum(1 for m in residual.modules() if type(m).__name__ == 'MetaFormerBlock')
    assert count_shortcut_additions(residual) == 2 * blocks == twin.plain_report.shortcuts_removed
    x = torch.randn(1, 3, 64, 64)
    assert analyze_activation_memory(residual, x).shortcut_additions == 2 * blocks
    assert analyze_activation_memory(twin, x).shortcut_additions == 0
