"""Folding across parallel branches (jointrd_timm.deploy.branches): the folded model computes what the model
computes, in float64 to rounding, and the norms / convs the patterns allow are gone; values read elsewhere stay."""
import pytest
import timm
import torch
from torch import nn
from timm.layers import BatchNormAct2d, LayerScale2d

from jointrd_timm.deploy.fold import count_batchnorms, fold_for_deployment


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, LayerScale2d):
                m.gamma.uniform_(-1.0, 1.0)
    return model.double().eval()


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


class RepDw(nn.Module):
    """RepViT's RepVggDw once its identity is gone, then a layer scale: bn(conv3(x) + conv1(x) - conv5(x)) * gamma."""

    def __init__(self, c=6):
        super().__init__()
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.conv5 = nn.Conv2d(c, c, 5, padding=2, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.scale = LayerScale2d(c)
        self.act = nn.Identity()  # timm's absent slots do not break the pattern

    def forward(self, x):
        return self.act(self.scale(self.bn(self.conv3(x) + self.act(self.conv1(x)) - self.conv5(x))))


class Mixed(nn.Module):
    """MixNet's mixed-kernel conv: channel groups through different kernels, concatenated, then one norm."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(4, 5, 5, padding=2, bias=False)])
        self.bn = BatchNormAct2d(8)

    def forward(self, x):
        parts = torch.split(x, [2, 4], 1)
        return self.bn(torch.cat([c(parts[i]) for i, c in enumerate(self.convs)], 1))


class ReadElsewhere(nn.Module):
    """The sum's first conv output is also returned: its values must stay unscaled, so nothing folds across."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.a(x)
        return self.bn(y + self.b(x)), y


class Reflect(nn.Module):
    """Reflect padding and a strided branch: each conv takes the norm's scale, but they cannot become one conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect')
        self.b = nn.Conv2d(4, 4, 1)
        self.c, self.d = nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 1, stride=2)
        self.bn, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn(self.a(x) + self.b(x))
        return self.bn2(self.c(x) + nn.functional.avg_pool2d(self.d(x), 1))


@pytest.mark.parametrize('model, convs_after, report', [
    (RepDw(), 1, dict(folded_into_convs=2, convs_merged=2)),
    (Mixed(), 2, dict(folded_into_convs=1, convs_merged=0)),
    (Reflect(), 4, dict(folded_into_convs=1, convs_merged=0)),
])
def test_norms_and_scales_fold_across_branches_and_parallel_convs_merge(model, convs_after, report):
    model = _randomised(model)
    x = torch.randn(2, 4 if isinstance(model, Reflect) else 6, 9, 7, dtype=torch.float64)
    folded, fold_report = fold_for_deployment(model)
    assert fold_report['parallel_branches'] == report
    assert _convs(folded) == convs_after
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    assert folded(x).dtype == torch.float64  # the split BatchNormAct2d keeps the model's dtype


def test_a_value_read_elsewhere_is_not_rescaled():
    model = _randomised(ReadElsewhere())
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    folded, report = fold_for_deployment(model)
    assert 'parallel_branches' not in report and count_batchnorms(folded) == 1 and _convs(folded) == 2
    with torch.no_grad():
        for got, expected in zip(folded(x), model(x)):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


class WeightReadElsewhere(nn.Module):
    """The graph also reads conv ``a``'s weight directly: a folded scale would change that read too."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x)) + nn.functional.conv2d(x, self.a.weight, None, 1, 1)


class ChangedBetween(nn.Module):
    """The shared input is changed in place between the two convs: one merged call would read only one version."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = self.a(x)
        x.add_(1)
        return a + self.b(x)


class SharedConv(nn.Module):
    """One conv module called twice, once before a norm: the norm belongs to that call only."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.a(2 * x)


class StatisticsFlagOff(nn.Module):
    """timm's BatchNormAct2d with ``track_running_stats`` turned off after training: eval mode still normalises with
    the running statistics it holds, and so must its split."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), BatchNormAct2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize('make', [WeightReadElsewhere, ChangedBetween, SharedConv, StatisticsFlagOff])
def test_what_the_patterns_must_not_touch(make):
    model = _randomised(make())
    if isinstance(model, StatisticsFlagOff):
        model.bn.track_running_stats = False
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x.clone())
        folded, report = fold_for_deployment(model)
        torch.testing.assert_close(folded(x.clone()), expected, rtol=1e-10, atol=1e-10)
    assert 'parallel_branches' not in report


def test_timms_fused_layers_keep_the_models_dtype():
    """timm's LeViT fuse() builds float32 layers whatever the model's dtype: a float64 model stays float64."""
    model = timm.create_model('levit_128s', num_classes=5, img_size=64).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    folded, report = fold_for_deployment(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-7, atol=1e-7)
    assert report['batchnorms_after'] == 0
