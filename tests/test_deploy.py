"""Deployment: folding and exports equal the eager model; the memory analyzer against a hand computation."""
import copy
import json

import pytest
import timm
import torch
from torch import nn

import jointrd_timm  # noqa: F401
from jointrd_timm.deploy.export import ExportError, export_model
from jointrd_timm.deploy.fold import count_batchnorms, fold_for_deployment
from jointrd_timm.deploy.latency import compare_latency, paired_ratio
from jointrd_timm.deploy.memory import analyze_activation_memory
from jointrd_timm.twins import count_shortcut_additions


@pytest.mark.parametrize('name', ['plain_resnet20_cifar', 'plain_efficientnet_b0', 'plain_repvgg_a0', 'plain_regnetx_002'])
def test_fold_and_exports_match_eager(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, dirac=name.endswith('cifar'))
    with torch.no_grad():  # non-trivial BN statistics and Dirac scales, so folding has real work
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    report = export_model(model, tmp_path, 'twin', input_size=32 if name.endswith('cifar') else 64, atol=1e-4)
    assert report['fold']['traced'] and report['fold']['batchnorms_after'] == 0
    for fmt in ('onnx', 'torchscript'):
        assert report['files'][fmt]['max_abs_error'] < 1e-4
    assert json.loads((tmp_path / 'twin.export.json').read_text())['files'].keys() == {'onnx', 'torchscript'}
    assert not list(tmp_path.glob('.*tmp*'))


def test_a_feature_extractor_exports_one_output_per_feature_map(tmp_path):
    """features_only twins (detection / segmentation backbones): every feature map is an output of the ONNX and
    TorchScript files, each checked against the eager model."""
    import onnxruntime
    torch.manual_seed(0)
    model = timm.create_model('plain_resnet18', features_only=True, out_indices=(1, 3)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    report = export_model(model, tmp_path, 'backbone', input_size=64, atol=1e-4)
    assert all(report['files'][fmt]['max_abs_error'] < 1e-4 for fmt in ('onnx', 'torchscript'))
    x = torch.randn(3, 3, 64, 64)  # another batch size: the batch axis of every output is dynamic
    session = onnxruntime.InferenceSession(report['files']['onnx']['path'], providers=['CPUExecutionProvider'])
    assert [o.name for o in session.get_outputs()] == ['features0', 'features1']
    with torch.no_grad():
        expected = model(x)
    got = session.run(None, {'input': x.numpy()})
    assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected] == [(3, 64, 16, 16), (3, 256, 4, 4)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-4, atol=1e-4)
    scripted = torch.jit.load(report['files']['torchscript']['path'])
    for g, e in zip(scripted(x), expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


class Cancelling(nn.Module):
    """A model whose float32 result is far from its exact one: a large offset added and taken away again."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return ((self.conv(x) * 1e3 + 3e7) - 3e7).mean((2, 3))


def _onnx_returns(monkeypatch, make_output):
    """onnxruntime's sessions answer ``make_output(input)`` (what a different but equally valid float32 kernel, or
    a broken export, would return)."""
    import onnxruntime
    monkeypatch.setattr(onnxruntime.InferenceSession, 'run', lambda self, names, feed: [make_output(feed['input'])])


def test_export_deviation_within_float32_rounding_of_the_model_passes(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Cancelling().eval()
    exact = copy.deepcopy(model).double()
    _onnx_returns(monkeypatch, lambda x: exact(torch.from_numpy(x).double()).float().detach().numpy())
    report = export_model(model, tmp_path, formats=('onnx',), input_size=8, atol=1e-3)
    onnx = report['files']['onnx']
    assert onnx['max_abs_error'] > 1e-3  # far from the eager float32 model ...
    assert report['eager_float64_error'] > 1e-3 and onnx['float64_error'] <= 2 * report['eager_float64_error']


def test_export_deviation_beyond_float32_rounding_is_refused(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten()).eval()
    _onnx_returns(monkeypatch, lambda x: model(torch.from_numpy(x)).detach().numpy() + 0.01)
    (tmp_path / 'model.onnx').write_bytes(b'an earlier export')
    with pytest.raises(ExportError, match=r"more than 0.001, and from its float64 result.*'onnx'.*No file was") as e:
        export_model(model, tmp_path, formats=('onnx',), input_size=8, atol=1e-3)
    recorded = e.value.report
    assert recorded['files']['onnx']['float64_error'] > 0.009 and recorded['eager_float64_error'] < 1e-5
    # the failed export left nothing behind, and the earlier file of that name is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.onnx']
    assert (tmp_path / 'model.onnx').read_bytes() == b'an earlier export'
    with pytest.raises(ExportError):
        export_model(model, tmp_path / 'new', formats=('onnx',), input_size=8, atol=1e-3)
    assert not (tmp_path / 'new').exists()


class SpaceToDepthNet(nn.Module):
    """TResNet's stem: the image is rearranged into 16x the channels before the first conv sees it."""
    pretrained_cfg = dict(input_size=(3, 16, 16))

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(48, 4, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.view(b, c, h // 4, 4, w // 4, 4).permute(0, 3, 5, 1, 2, 4).reshape(b, c * 16, h // 4, w // 4)
        return self.conv(x).mean((2, 3))


def test_export_feeds_the_configured_channels_when_the_stem_rearranges_them(tmp_path):
    report = export_model(SpaceToDepthNet().eval(), tmp_path, formats=('onnx',), input_size=16)
    assert report['files']['onnx']['max_abs_error'] < 1e-5


def test_fold_removes_every_batchnorm_of_a_resnet():
    model = timm.create_model('plain_resnet18').eval()
    folded, report = fold_for_deployment(model)
    assert count_batchnorms(model) == 17 and report["batchnorms_after"] == 0  # 1 stem + 2 x 8 blocks
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(folded(x), model(x), atol=1e-5)


@pytest.mark.parametrize('arch', ['repvgg_a0', 'nf_regnet_b0'])
def test_fold_report_counts_the_same_norms_before_and_after(arch):
    """Before: the model as given (a RepVGG block's branch norms count, before timm's reparameterize folds them);
    NFNets' weight standardisation calls batch_norm on its weights, without statistics: not a norm to fold."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5).eval()
    modules = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    folded, report = fold_for_deployment(model)
    assert report['batchnorms_before'] == modules and report['batchnorms_after'] == 0
    assert (modules > 0) == (arch == 'repvgg_a0')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


class TinyResidual(nn.Module):
    """x -> conv1 -> relu (in place) -> conv2 -> + x -> relu (in place)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))) + x)


class TinyPlain(TinyResidual):
    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))


def test_memory_analyzer_equals_hand_computation():
    x = torch.randn(1, 4, 8, 8)
    s4, s8 = 4 * 64 * 4, 8 * 64 * 4  # bytes of a 4- and an 8-channel 8x8 fp32 map
    # residual: while conv2 runs, x (held for the shortcut), conv1's output (relu in place) and conv2's output live;
    # at the addition x, conv2's output and the sum live. Peak = x + conv1 out + conv2 out.
    report = analyze_activation_memory(TinyResidual(), x)
    assert report.peak_bytes == s4 + s8 + s4
    assert report.shortcut_additions == 1
    assert report.shortcut_only_bytes_at_peak == s4  # x is alive at the peak only for the shortcut
    assert report.shortcut_share == pytest.approx(s4 / (2 * s4 + s8))
    # plain: x dies once conv1 has read it. Peak = x + conv1 out while conv1 runs (= conv1 out + conv2 out later).
    plain = analyze_activation_memory(TinyPlain(), x)
    assert plain.peak_bytes == s4 + s8 and plain.shortcut_additions == 0 and plain.shortcut_only_bytes_at_peak == 0
    assert report.peak_without_shortcut_uses_bytes == plain.peak_bytes


def test_memory_analyzer_sees_resnet50_shortcuts():
    x = torch.randn(1, 3, 224, 224)
    residual = analyze_activation_memory(fold_for_deployment(timm.create_model('resnet50'))[0], x)
    twin = analyze_activation_memory(fold_for_deployment(timm.create_model('plain_resnet50'))[0], x)
    assert residual.shortcut_additions == 16 and twin.shortcut_additions == 0
    assert residual.peak_bytes / twin.peak_bytes >= 1.25


def test_compare_latency_interleaves_and_reports_medians():
    calls = []
    result = compare_latency({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, repeats=6, warmup=1)
    assert set(result) == {'a', 'b'} and result['a']['samples'] == 6
    assert calls[2:6] == ['a', 'b', 'b', 'a']  # rotating order after the warm-up
    # the clock is the caller's: here one that advances 2 ms per call of 'a' and 5 per call of 'b'
    now = [0.0]
    ticks = {'a': 0.002, 'b': 0.005}
    result = compare_latency({k: (lambda k=k: now.__setitem__(0, now[0] + ticks[k])) for k in ticks}, repeats=4,
                             warmup=0, clock=lambda: now[0])
    assert result['a']['median_ms'] == pytest.approx(2.0) and result['b']['median_ms'] == pytest.approx(5.0)
    assert result['a']['times_ms'] == pytest.approx([2.0] * 4)


def test_paired_ratio_reads_the_rounds_not_the_medians():
    # a machine that slows down for two rounds: b is always 1.2x a, which the ratio of the medians does not show
    load = [1.0, 1.0, 3.0, 3.0, 1.0]
    a = [10.0 * f for f in load]
    b = [12.0 * f for f in load[1:] + load[:1]]  # b's samples of round r ran under load[r + 1]: not paired
    paired_b = [12.0 * f for f in load]
    assert paired_ratio(paired_b, a) == pytest.approx(dict(median=1.2, iqr=0.0, low=1.2, high=1.2))
    unpaired = paired_ratio(b, a)
    assert unpaired['iqr'] > 0.5 and unpaired['low'] < unpaired['median'] < unpaired['high']
    with pytest.raises(ValueError, match='same number of rounds'):
        paired_ratio([1.0, 2.0], [1.0])


def test_memory_and_export_commands(tmp_path, capsys):
    from jointrd_timm.cli import main
    assert main(['memory', 'resnet20_cifar', '--batch', '1']) == 0
    out = capsys.readouterr().out
    assert 'plain_resnet20_cifar' in out and 'peak' in out
    assert main(['export', 'plain_resnet20_cifar', '--output-dir', str(tmp_path)]) == 1  # no weights: refused
    assert 'names an architecture without weights' in capsys.readouterr().err
    assert not (tmp_path / 'plain_resnet20_cifar.onnx').exists()
    assert main(['export', 'plain_resnet20_cifar', '--output-dir', str(tmp_path), '--random-weights']) == 0
    assert (tmp_path / 'plain_resnet20_cifar.onnx').is_file()


def test_bench_command_on_a_tiny_pair(tmp_path, capsys):
    from jointrd_timm.cli import main
    out = tmp_path / 'bench'
    assert main(['bench', 'resnet20_cifar', '--batches', '1', '--repeats', '3', '--no-measure',
                 '--output', str(out)]) == 0
    report = json.loads(out.with_suffix('.json').read_text())
    row = report['results'][0]['batches']['1']
    assert row['memory_ratio_analysed'] > 1.0  # the shortcuts hold activations the twin frees
    assert {'residual/eager', 'twin/eager', 'residual/onnxruntime', 'twin/onnxruntime'} <= set(row)
    assert '| resnet20_cifar (32 px) | 1 |' in out.with_suffix('.md').read_text()


def test_one_measurement_serves_bench_and_the_demo_comparison(monkeypatch):
    """deploy.bench.measure_models is the measurement; bench_models and training.compare.measure_models only lay it
    out: same latencies (a fake clock), memory of the folded models, ratios first / second."""
    from jointrd_timm.deploy import bench
    from jointrd_timm.training import compare
    ms = {'teacher/eager': 4.0, 'twin/eager': 2.0}
    monkeypatch.setattr(bench, 'compare_latency', lambda runners, **k: {n: dict(median_ms=ms[n]) for n in runners})
    models = {'teacher': timm.create_model('resnet20_cifar', num_classes=10),
              'twin': timm.create_model('plain_resnet20_cifar', num_classes=10)}
    folded = {k: fold_for_deployment(m)[0] for k, m in models.items()}
    x = torch.randn(1, 3, 32, 32)
    memory = {k: analyze_activation_memory(m, x).peak_bytes for k, m in folded.items()}
    assert memory['teacher'] > memory['twin']  # the shortcut keeps a block input alive
    measured = bench.measure_models(models, (3, 32, 32), batches=(1, 2), fold=True, memory_batches=(1,))
    assert measured['batches'][1]['memory_analysed_bytes'] == memory
    assert 'memory_analysed_bytes' not in measured['batches'][2]
    assert measured['batches'][2]['speedup/eager'] == 2.0
    assert measured['batches'][1]['memory_ratio_analysed'] == memory['teacher'] / memory['twin']
    laid_out = compare.measure_models(models, (3, 32, 32), batches=(1, 2), latency_repeats=3)
    assert laid_out['latency_ms'] == {1: {'teacher': 4.0, 'twin': 2.0}, 2: {'teacher': 4.0, 'twin': 2.0}}
    assert laid_out['speedup'] == {1: 2.0, 2: 2.0}
    assert laid_out['activation_memory_mb'] == {k: v / 2 ** 20 for k, v in memory.items()}
    assert laid_out['params'] == {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert count_batchnorms(models['teacher']) > 0  # the models given are not folded in place
    ms.update({'residual/eager': 3.0, 'twin/eager': 1.5})
    row = bench.bench_models({'residual': folded['teacher'], 'twin': folded['twin']}, 32, (1,), 2, onnx=False)
    assert row['input_size'] == 32 and row['batches'][1]['speedup/eager'] == 2.0
    assert row['batches'][1]['memory_analysed_bytes'] == {'residual': memory['teacher'], 'twin': memory['twin']}


class AttentionBlock(nn.Module):
    """A residual block whose branch holds attention logits with a position term: ``q^T q * c + q^T P``. That
    addition forks from q with no conv on either side: part of the layer, not a shortcut."""

    def __init__(self, hw=16):
        super().__init__()
        self.q = nn.Conv2d(4, 4, 1)
        self.pos = nn.Parameter(torch.randn(4, hw))
        self.proj = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        q = self.q(x).flatten(2)
        # two ops from q on the left, four on the right: only the convs weighed tell this from a shortcut
        logits = torch.matmul(q.transpose(1, 2), q) + torch.matmul(q.transpose(1, 2), self.pos).flip(-1).mul(0.5)
        out = torch.matmul(q, logits.softmax(-1)).reshape(x.shape)
        return x + self.proj(out)


class SplitBlock(nn.Module):
    """Res2Net-like: two pieces of one split tensor added (not a shortcut), then a real shortcut."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(4, 8, 1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = torch.split(self.conv1(x), 4, 1)
        return x + self.conv3(torch.cat([a, self.conv2(a) + b], 1))


class GhostProjection(nn.Module):
    """A stride-2 block whose shortcut is a depthwise + pointwise projection (two convs, four ops: GhostNet's)."""

    def __init__(self):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1, groups=8),
                                    nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.shortcut = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1, groups=4), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 1),
                                      nn.BatchNorm2d(8))

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


class ContextBlock(nn.Module):
    """A residual block holding timm's GlobalContext, whose own addition (x + mlp(context)) weighs convs on one side
    only, like a shortcut, but is the layer's definition (``NOT_SHORTCUT_CLASSES``)."""

    def __init__(self):
        super().__init__()
        from timm.layers import GlobalContext
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gc = GlobalContext(4, fuse_add=True, fuse_scale=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(self.gc(self.conv(x)))


@pytest.mark.parametrize('block, shortcuts', [(AttentionBlock, 1), (SplitBlock, 1), (GhostProjection, 1),
                                              (ContextBlock, 1)])
@pytest.mark.parametrize('folded', [False, True])
def test_memory_analyzer_counts_shortcuts_not_additions_inside_a_layer(block, shortcuts, folded):
    torch.manual_seed(0)
    model = block().eval()
    if folded:  # a folded model is a GraphModule: the module each op ran in is read from its own graph
        model = fold_for_deployment(model)[0]
        assert isinstance(model, torch.fx.GraphModule)
    report = analyze_activation_memory(model, torch.randn(1, 4, 4, 4))
    assert report.shortcut_additions == shortcuts


def test_memory_analyzer_sees_botnet_shortcuts_not_its_attention():
    residual = timm.create_model('botnet26t_256', img_size=64, num_classes=10)
    twin = timm.create_model('plain_botnet26t_256', img_size=64, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    for model, expected in ((residual, 8), (twin, 0)):
        assert analyze_activation_memory(fold_for_deployment(model)[0], x).shortcut_additions == expected
    assert count_shortcut_additions(residual) == 8


class DataDependent(nn.Module):
    """A residual block whose forward branches on a tensor's value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return x + self.conv(x)
        return x - self.conv(x)


def test_an_untraceable_model_gets_a_clear_memory_error_and_bench_still_runs(capsys, monkeypatch):
    from jointrd_timm.cli import main
    from jointrd_timm.deploy import bench, memory
    with pytest.raises(memory.MemoryAnalysisError,
                       match='torch.fx cannot trace DataDependent .*TraceError.*jointrd bench'):
        analyze_activation_memory(DataDependent(), torch.randn(1, 3, 8, 8))
    # without timm's untraceable layers kept whole, tf_* EfficientNets (they pad 'same' from the input's size) are
    # untraceable: the CLI prints one line, no traceback
    monkeypatch.setattr(memory._KeepTimmLayers, 'is_leaf_module', torch.fx.Tracer.is_leaf_module)
    assert main(['memory', 'tf_mobilenetv3_small_minimal_100', '--input-size', '64']) == 1
    err = capsys.readouterr().err
    assert err.startswith('jointrd memory: error: torch.fx cannot trace') and 'Traceback' not in err
    row = bench.bench_models({'residual': DataDependent().eval(), 'twin': DataDependent().eval()}, 8, (1,), 2,
                             onnx=False)['batches'][1]
    assert 'memory_analysed_bytes' not in row and 'cannot trace' in row['memory_analysed_error']
    assert row['speedup/eager'] > 0  # the latencies are measured all the same
    page = bench.markdown(dict(meta=dict(machine='m', threads=1, torch='t', timm='t', repeats=2),
                               results=[dict(teacher='x', input_size=8, batches={1: row})]))
    assert '| not traceable | - |' in page


def test_timm_layers_torch_fx_cannot_trace_are_kept_whole_unless_they_hold_a_shortcut(capsys):
    from timm.layers import Conv2dSame, ScaledStdConv2d
    from timm.models.nfnet import NormFreeBlock
    from jointrd_timm.cli import main
    # Conv2dSame's padding depends on the input's size: kept whole; NormFreeBlock is on timm's no-trace list too, but
    # holds the shortcut: traced through
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2),
                          NormFreeBlock(8, 8, act_layer=nn.ReLU, conv_layer=ScaledStdConv2d)).eval()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    report = analyze_activation_memory(model, torch.randn(1, 3, 16, 16))
    assert (report.shortcut_additions, report.layers_kept_whole) == (1, 1)
    assert report.peak_bytes >= 4 * 8 * 8 * 8 * 2  # the block's input and its branch, at once
    residual = timm.create_model('tf_mobilenetv3_small_minimal_100', num_classes=10)
    twin = timm.create_model('plain_tf_mobilenetv3_small_minimal_100', num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    folded = [analyze_activation_memory(fold_for_deployment(m)[0], x) for m in (residual, twin)]
    assert [r.shortcut_additions for r in folded] == [count_shortcut_additions(residual), 0]
    assert folded[0].shortcut_additions > 0 and all(r.layers_kept_whole > 0 for r in folded)
    assert main(['memory', 'tf_mobilenetv3_small_minimal_100', '--input-size', '64']) == 0
    out = capsys.readouterr().out
    assert out.count('kept whole') == 2 and 'the peak is a lower bound' in out
    from jointrd_timm.deploy import bench
    row = bench.bench_models({'residual': fold_for_deployment(residual)[0], 'twin': fold_for_deployment(twin)[0]}, 64,
                             (1,), 2, onnx=False)['batches'][1]
    assert row['memory_analysed_lower_bound'] and row['memory_analysed_bytes']['twin'] == folded[1].peak_bytes
    page = bench.markdown(dict(meta=dict(machine='m', threads=1, torch='t', timm='t', repeats=2),
                               results=[dict(teacher='x', input_size=64, batches={1: row})]))
    assert page.count('>= ') == 2


def test_export_traces_the_configured_height_and_width_or_the_ones_given(tmp_path):
    import onnx
    torch.manual_seed(0)
    model = timm.create_model('plain_resnet20_cifar', num_classes=10)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 32, 48))  # a wide input, as configured
    for given, shape in ((None, [3, 32, 48]), ((24, 40), [3, 24, 40]), (16, [3, 16, 16])):
        out = tmp_path / str(given)
        report = export_model(model, out, formats=('onnx',), input_size=given, atol=1e-4)
        assert report['input_shape'] == shape and report['files']['onnx']['max_abs_error'] < 1e-4
        dims = onnx.load(str(out / 'model.onnx')).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims][1:] == shape


@pytest.mark.parametrize('name', ['plain_tf_efficientnet_b0', 'tf_mobilenetv3_small_100'])
def test_fold_reaches_the_norms_after_timms_untraceable_same_padding_convs(name):
    """The tf_* ports pad inside Conv2dSame from the input's size, which fx cannot trace: the model is traced with
    those convs kept whole and the BatchNorm after each folded into it."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.bias.uniform_(-0.3, 0.3)
    model.eval()
    folded, report = fold_for_deployment(model)
    assert report['traced'] and report['batchnorms_before'] > 0 and report['batchnorms_after'] == 0
    x = torch.randn(2, 3, 65, 47)  # odd sides: the same-padding differs per side
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.slow  # two fresh processes (about 10 s): the default run stays under 10 minutes on 2 cores
def test_measured_peak_rss_reads_the_input_it_is_given():
    from jointrd_timm.deploy.memory import measure_peak_rss
    torch.set_num_threads(1)
    tall = measure_peak_rss('resnet18', 8, (1, 1024, 64), threads=1)
    small = measure_peak_rss('resnet18', 8, (1, 32, 32), threads=1)
    assert tall - small > 8 * 64 * 512 * 32 * 4  # at least the stem's output grew (8 x 64 x 512 x 32 floats)
    with pytest.raises(ValueError, match=r'\(channels, height, width\)'):
        measure_peak_rss('resnet18', 1, (32, 32))


def test_fold_keeps_the_norm_after_a_weight_standardised_same_padding_conv():
    """StdConv2dSame standardises its weight on every forward: a BN folded into it would be undone."""
    from timm.layers import Conv2dSame, StdConv2dSame
    torch.manual_seed(0)
    model = nn.Sequential(StdConv2dSame(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          Conv2dSame(8, 8, 3, stride=2), nn.BatchNorm2d(8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    model.eval()
    folded, report = fold_for_deployment(model)
    assert report['traced'] and report['batchnorms_after'] == 1  # the standardised conv's norm stays
    x = torch.randn(2, 3, 17, 15)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def _with_random_statistics(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_fold_converts_the_blocks_timm_fuses():
    """LeViT's norms follow linear layers that only timm's ``fuse()`` folds (all 52 were left computed before fold
    used timm's reparameterize_model)."""
    torch.manual_seed(0)
    model = _with_random_statistics(timm.create_model('levit_128s', num_classes=5, img_size=64))
    folded, report = fold_for_deployment(model)
    assert 'reparameterize_error' not in report and report['batchnorms_before'] > 40
    assert report['batchnorms_after'] == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_fold_of_a_model_already_reparameterized_by_timm():
    """timm's FastViT RepMixer cannot be re-parameterised twice: a model the user already converted folds as it is,
    with timm's error in the report, instead of failing."""
    from timm.models import reparameterize_model
    torch.manual_seed(0)
    model = reparameterize_model(_with_random_statistics(timm.create_model('fastvit_t8', num_classes=5)))
    folded, report = fold_for_deployment(model)
    assert 'AttributeError' in report['reparameterize_error'] and report['traced']
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_an_operator_onnx_cannot_translate_and_an_input_too_large_are_refused_leaving_nothing(tmp_path, monkeypatch):
    """Before: a TypeError from torch.onnx (a ViT's attention: 'is_causal must be bool, not Tensor') came out as a
    traceback and left the empty output folder; --input-size 100000 was the allocator's RuntimeError."""
    from jointrd_timm.deploy.export import UnsupportedExportError
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten()).eval()

    def untranslatable(*args, **kwargs):
        raise TypeError("scaled_dot_product_attention(): argument 'is_causal' must be bool, not Tensor")
    monkeypatch.setattr(torch.onnx, 'export', untranslatable)
    with pytest.raises(UnsupportedExportError, match=r"torch.onnx cannot export Sequential: scaled_dot_product_att.*"
                                                     r"TorchScript only"):
        export_model(model, tmp_path / 'out', formats=('onnx', 'torchscript'), input_size=4)
    assert not (tmp_path / 'out').exists()
    report = export_model(model, tmp_path / 'out', formats=('torchscript',), input_size=4)
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['model.export.json', 'model.torchscript.pt']
    assert report['files']['torchscript']['path'] == str(tmp_path / 'out' / 'model.torchscript.pt')
    with pytest.raises(ExportError, match=r'An example input of 2x3x1000000x1000000 does not fit in memory.*'
                                          r'--input-size'):
        export_model(model, tmp_path / 'huge', input_size=10 ** 6)
    assert not (tmp_path / 'huge').exists()
