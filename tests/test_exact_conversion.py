"""Exact shortcut removal (RM, deploy.exact): the converted network computes what the residual one does, has no
shortcut addition left, grows as the method says, and every case it cannot reproduce is refused by name."""
import copy
import json

import pytest
import timm
import torch
from timm.layers import BlurPool2d
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn
from torchvision.models import resnet as tv_resnet

import jointrd_timm  # noqa: F401  (CIFAR teachers, plain_* twins)
from jointrd_timm.cli import main
from jointrd_timm.deploy import ExactConversionError, ExactPlainBlock, exact_conversion_report, exact_plain
from jointrd_timm.deploy.memory import analyze_activation_memory
from jointrd_timm.twins import count_shortcut_additions, find_unhandled_residual_blocks, shortcut_additions

SMALL = dict(channels=(8, 16, 32, 64))
BLOCKS = (BasicBlock, Bottleneck, tv_resnet.BasicBlock, tv_resnet.Bottleneck)  # timm's and torchvision's


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (negative scales included), so folding is really tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                m.weight.copy_(0.5 + 0.5 * torch.randn(n, generator=generator))
                m.bias.copy_(0.3 * torch.randn(n, generator=generator))
    return model.eval()


def _expected_parameters(model: nn.Module) -> int:
    """Parameters after the conversion, from the layout the method prescribes: every conv of a block's branch
    but the last gains C_in carried output channels (and, after the first, C_in carried inputs, as extra groups
    when grouped); the last conv gains C_in inputs; every conv gets a bias, BN and the shortcut module go."""
    total = sum(p.numel() for p in model.parameters())
    for block in model.modules():
        if type(block) not in BLOCKS:
            continue
        total -= sum(p.numel() for p in block.parameters())
        convs = [m for name, m in block.named_children() if name.startswith('conv')]
        carried = convs[0].in_channels
        for i, conv in enumerate(convs):
            last, per_group = i == len(convs) - 1, conv.in_channels // conv.groups
            out = conv.out_channels + (0 if last else carried)
            per_group_in = per_group if conv.groups > 1 else conv.in_channels + (carried if i > 0 else 0)
            total += out * per_group_in * conv.kernel_size[0] * conv.kernel_size[1] + out
    return total


CASES = {
    'resnet20_cifar': ('resnet20_cifar', dict(channels=(8, 16, 32)), (32, 32)),  # identity + 1x1 stride-2 projections
    'resnet18_cifar-odd': ('resnet18_cifar', dict(SMALL, stem_width=8), (33, 37)),  # strided Dirac at odd sizes
    'resnet50_cifar': ('resnet50_cifar', dict(channels=(4, 8, 16, 32), stem_width=8), (32, 32)),  # bottlenecks
    'resnet26-odd': ('resnet26', SMALL, (65, 71)),  # 7x7 stem + max-pool, stride in conv2
    'resnet26d': ('resnet26d', SMALL, (64, 64)),  # deep stem, 2x2 average-pool shortcuts in the strided conv2
    'resnet18d': ('resnet18d', SMALL, (64, 96)),  # average-pool shortcuts in the strided conv1
    'resnext': ('resnet26', dict(SMALL, cardinality=4, base_width=32), (64, 64)),  # grouped conv2
    'dilated': ('resnet26', dict(SMALL, output_stride=16), (64, 64)),  # dilated stage, 1x1 stride-1 projection
    'drop-path-eval': ('resnet20_cifar', dict(channels=(8, 16, 32), drop_path_rate=0.2), (32, 32)),
    # torchvision's blocks: one ReLU module after every conv and the addition, stride in conv2 of its bottleneck
    'torchvision-resnet': (lambda: tv_resnet.ResNet(tv_resnet.BasicBlock, [2, 1, 1, 1], num_classes=5), {}, (64, 64)),
    'torchvision-resnext-odd': (lambda: tv_resnet.ResNet(tv_resnet.Bottleneck, [1, 1, 1, 1], groups=4,
                                                         width_per_group=8, num_classes=5), {}, (65, 71)),
}


@pytest.mark.parametrize('case', list(CASES))
def test_conversion_reproduces_the_model_without_shortcuts(case):
    name, kwargs, (height, width) = CASES[case]
    torch.manual_seed(0)
    model = _randomize_norms(name(**kwargs) if callable(name) else timm.create_model(name, **kwargs))
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    plain = exact_plain(model)
    with torch.no_grad():
        reference = model(x)
        error = (plain(x) - reference).abs().max().item()
        exact = (exact_plain(copy.deepcopy(model).double())(x.double()) - model.double()(x.double())).abs().max()
    model.float()
    scale = reference.abs().max().item()
    assert error <= 1e-4 * scale, f'float32: {error} vs output scale {scale}'
    assert exact.item() <= 1e-10 * scale, f'float64: {exact.item()} vs output scale {scale}'  # exact, not approximate
    # the input model is untouched
    after_conversion = model.state_dict()
    assert all(torch.equal(v, after_conversion[k]) for k, v in state.items())
    assert all(type(m) is not ExactPlainBlock for m in model.modules())
    # no shortcut addition left, and every block is a plain conv-ReLU chain
    blocks = [m for m in plain.modules() if isinstance(m, ExactPlainBlock)]
    assert len(blocks) == sum(type(m) in BLOCKS for m in model.modules())
    assert all(type(layer) in (nn.Conv2d, nn.ReLU) for block in blocks for layer in block)
    assert all(shortcut_additions(block) == 0 for block in blocks)
    assert analyze_activation_memory(model, x).shortcut_additions == len(blocks)
    assert analyze_activation_memory(plain, x).shortcut_additions == 0
    assert count_shortcut_additions(plain) == 0 and find_unhandled_residual_blocks(plain) == []
    # the price: wider convs, exactly as the method lays them out
    after = sum(p.numel() for p in plain.parameters())
    assert after == _expected_parameters(model) and after > sum(p.numel() for p in model.parameters())


def test_average_pool_shortcut_refuses_odd_input_sizes():
    model = _randomize_norms(timm.create_model('resnet26d', **SMALL))
    plain = exact_plain(model)
    # 33x37 -> stem 17x19 -> max-pool 9x10: the first average-pool shortcut (layer2.0) would average a partial window
    with pytest.raises(AssertionError, match=r'layer2\.0: .*even height and width'):
        plain(torch.randn(1, 3, 33, 37))
    with pytest.raises(ExactConversionError, match=r'layer2\.0'):
        exact_conversion_report(model, plain, input_size=33)
    report = exact_conversion_report(model, plain, input_size=64)
    assert report['even_input_blocks'] == ['layer2.0', 'layer3.0', 'layer4.0']
    assert report['relative_error'] < 1e-5 and report['params']['plain'] > report['params']['residual']
    assert report['flops']['plain'] > report['flops']['residual']


class PreActBlock(nn.Module):
    """A pre-activation block (He et al. 2016, identity mappings): its output is not a ReLU's."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(channels), nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))


class PreActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = PreActBlock(8)

    def forward(self, x):
        return self.block(self.stem(x))


def _with(name, kwargs=None, edit=None, train=False):
    def build():
        model = timm.create_model(name, **(kwargs or {})).train(train)
        if edit:
            edit(model)
        return model
    return build


REFUSALS = {
    'pre-activation': (PreActNet, r'^block \(test_exact_conversion\.PreActBlock\): .*pre-activation'),
    'timm pre-activation': (_with('resnetv2_50', dict(channels=(16, 32, 64, 128))),
                            r'^stages\.0\.blocks\.0 \(resnetv2\.PreActBottleneck\)'),
    'linear bottleneck': (_with('resnet26', SMALL, lambda m: setattr(m.layer1[0], 'act3', nn.Identity())),
                          r'^layer1\.0 \(resnet\.Bottleneck\): `act3` is Identity.*after the addition'),
    'squeeze-excitation': (_with('seresnet18', SMALL), r'^layer1\.0 \(resnet\.BasicBlock\): .*`se` \(SEModule\)'),
    'anti-aliasing': (_with('resnet18', dict(SMALL, aa_layer=BlurPool2d)), r'^layer2\.0 .*`aa` \(BlurPool2d\)'),
    'stem without ReLU': (_with('resnet20_cifar', edit=lambda m: setattr(m, 'act1', nn.Identity())),
                          r'^layer1\.0 .*comes from `bn1` \(BatchNorm2d\) and can be negative'),
    'drop path in train mode': (_with('resnet20_cifar', dict(drop_path_rate=0.1), train=True),
                                r'^layer1\.1 .*DropPath.*model\.eval\(\)'),
    'groups that cannot carry': (_with('resnet26', dict(SMALL, cardinality=2, base_width=40)),
                                 r'^layer1\.0 .*`conv2` has 2 groups of 5'),
    'same-padded average pool': (_with('resnet26d', dict(SMALL, output_stride=16)), r'^layer4\.0 .*AvgPool2dSame'),
    'group norm': (_with('resnet20_cifar', dict(norm_layer='groupnorm1')),
                   r'^layer1\.0 .*GroupNorm1.*cannot be folded'),
    'already plain': (_with('plain_resnet20_cifar'), r"has none of timm's and torchvision's post-activation "
                                                   r'resnet.BasicBlock'),
}


@pytest.mark.parametrize('case', list(REFUSALS))
def test_inexact_cases_are_refused_naming_the_block(case):
    build, message = REFUSALS[case]
    with pytest.raises(ExactConversionError, match=message):
        exact_plain(build())


def test_drop_path_in_eval_mode_converts():
    model = timm.create_model('resnet20_cifar', drop_path_rate=0.1).eval()
    assert len([m for m in exact_plain(model).modules() if isinstance(m, ExactPlainBlock)]) == 9


def test_cli_converts_reports_and_exports(tmp_path, capsys):
    code = main(['exact', 'resnet20_cifar', '--random-weights', '--output-dir', str(tmp_path), '--input-size', '32',
                 '--formats', 'torchscript'])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report['blocks'] == 9 and report['relative_error'] < 1e-5
    assert report['params']['plain'] > report['params']['residual']
    assert report['files']['torchscript']['max_abs_error'] < 1e-4
    assert (tmp_path / 'resnet20_cifar_exact.torchscript.pt').is_file()
    assert main(['exact', 'seresnet18', '--random-weights', '--output-dir', str(tmp_path)]) == 1
    assert 'layer1.0 (resnet.BasicBlock)' in capsys.readouterr().err
