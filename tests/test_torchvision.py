"""Twins of torchvision models: make_plain derives them through the graph rules of torchvision's residual blocks
(jointrd_timm/twins/families/torchvision.py). Small instances of each family, one per block class; the number of
shortcuts cut is counted from torchvision's own attributes, and the folded twin's whole graph is checked by the
second detector (the activation-memory analysis)."""
import copy
import json
import re

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip('torchvision')
from torchvision import models  # noqa: E402
from torchvision.models import convnext, efficientnet, mnasnet, mobilenetv2, mobilenetv3, regnet, resnet  # noqa: E402

import jointrd_timm  # noqa: E402
from jointrd_timm.deploy.fold import fold_for_deployment  # noqa: E402
from jointrd_timm.deploy.memory import analyze_activation_memory  # noqa: E402
from jointrd_timm.methods import JointRD  # noqa: E402
from jointrd_timm.methods.stages import StageLayoutError, StageSplit  # noqa: E402
from jointrd_timm.training.distill_inputs import DistillError  # noqa: E402
from jointrd_timm.twins.fade import deployable, make_fading, set_shortcut_scale  # noqa: E402


def _small_models():
    """name -> builder of a small model with every block class of the family (5 classes)."""
    return {
        'resnet-basic': lambda: resnet.ResNet(resnet.BasicBlock, [2, 1, 1, 1], num_classes=5),
        'resnext-bottleneck': lambda: resnet.ResNet(resnet.Bottleneck, [2, 1, 1, 1], num_classes=5, groups=4,
                                                    width_per_group=8),
        'mobilenet_v2': lambda: models.mobilenet_v2(width_mult=0.25, num_classes=5),
        'mobilenet_v3_small': lambda: models.mobilenet_v3_small(width_mult=0.25, num_classes=5),
        'efficientnet-mb-fused': lambda: efficientnet.EfficientNet(
            [efficientnet.FusedMBConvConfig(1, 3, 1, 16, 16, 2), efficientnet.FusedMBConvConfig(4, 3, 2, 16, 24, 2),
             efficientnet.MBConvConfig(4, 3, 2, 24, 32, 2)], dropout=0.0, num_classes=5, last_channel=64),
        'regnet_y': lambda: regnet.RegNet(regnet.BlockParams.from_init_params(
            depth=5, w_0=16, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25), num_classes=5, stem_width=16),
        'convnext': lambda: convnext.ConvNeXt([convnext.CNBlockConfig(16, 32, 2), convnext.CNBlockConfig(32, None, 2)],
                                              num_classes=5, layer_scale=0.5),
        'mnasnet': lambda: models.mnasnet0_5(num_classes=5),
    }


def _residual_blocks(model: nn.Module) -> int:
    """The blocks that add a shortcut, as torchvision itself decides it."""
    count = 0
    for m in model.modules():
        if isinstance(m, (resnet.BasicBlock, resnet.Bottleneck, regnet.ResBottleneckBlock, convnext.CNBlock)):
            count += 1
        elif isinstance(m, (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual, efficientnet.MBConv,
                            efficientnet.FusedMBConv)):
            count += bool(m.use_res_connect)
        elif isinstance(m, mnasnet._InvertedResidual):
            count += bool(m.apply_residual)
    return count


def _moved_off_init(model: nn.Module) -> nn.Module:
    """BatchNorm affine weights away from their initial values (zero-init last BNs) and running statistics of real
    batches, as a trained model's are: a twin that dropped a branch by mistake would not match by chance."""
    torch.manual_seed(1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.1, 0.1)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


@pytest.mark.parametrize('name', list(_small_models()))
def test_torchvision_twin_drops_exactly_the_shortcuts_torchvision_adds(name):
    torch.manual_seed(0)
    teacher = _moved_off_init(_small_models()[name]())
    x = torch.randn(2, 3, 64, 64)
    expected = _residual_blocks(teacher)
    assert expected > 0
    # every block of a registered class traces faithfully (blocks built without a shortcut included)
    registered = [m for m in teacher.modules() if type(m).__module__.startswith('torchvision.models')
                  and type(m).__name__ in ('BasicBlock', 'Bottleneck', 'InvertedResidual', 'MBConv', 'FusedMBConv',
                                           'ResBottleneckBlock', 'CNBlock', '_InvertedResidual')]
    assert sum(jointrd_timm.check_graph_rule(teacher, x).values()) == len(registered) >= expected

    twin = jointrd_timm.make_plain(copy.deepcopy(teacher)).eval()
    assert twin.plain_report.shortcuts_removed == expected
    # the second detector, on the whole graph: the teacher's shortcuts, none left in the folded twin
    with torch.no_grad():
        assert analyze_activation_memory(teacher, x[:1]).shortcut_additions == expected
        assert analyze_activation_memory(fold_for_deployment(twin)[0], x[:1]).shortcut_additions == 0

    # the fading twin is the teacher at s = 1; at s = 0 it deploys into the twin's parameters, with its outputs
    fading = make_fading(copy.deepcopy(teacher)).eval()
    with torch.no_grad():
        assert torch.equal(fading(x), teacher(x))
        set_shortcut_scale(fading, 0.0)
        faded = fading(x)
    deployed = deployable(fading).eval()
    twin.load_state_dict(deployed.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(twin(x), faded, atol=1e-5)
        gap = (twin(x) - teacher(x)).abs().max()
    assert gap > 1e-3 * teacher(x).abs().max()  # the shortcuts carried part of the signal

    # the twin trains: every parameter gets a gradient
    twin.train()
    twin(x).square().mean().backward()
    assert all(p.grad is not None for p in twin.parameters())


def test_torchvision_teacher_weights_load_into_its_twin():
    torch.manual_seed(0)
    teacher = _moved_off_init(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5))
    twin = jointrd_timm.make_plain(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5))
    jointrd_timm.load_teacher_weights(twin, teacher.state_dict())  # strict but for the removed projections
    assert torch.equal(twin.conv1.weight, teacher.conv1.weight)
    assert not any('downsample' in k for k in twin.state_dict())


@pytest.mark.parametrize('name', list(_small_models()))
def test_jointrd_cuts_a_torchvision_model_where_its_feature_maps_shrink(name):
    """Without timm's feature_info the stages are read from one forward: the teacher's tail from every stage output
    (its later stages, then its head, with the pooling its forward does in code) computes model(x)."""
    torch.manual_seed(0)
    teacher = _moved_off_init(_small_models()[name]())
    x = torch.randn(2, 3, 64, 64)
    split = StageSplit(teacher, x)
    assert split.num_stages >= 2
    assert split.stage_reductions == sorted(set(split.stage_reductions))  # one stage per feature-map size
    with torch.no_grad():
        expected, outputs = teacher(x), split.features(x)
        assert [h.shape[1:] for h in outputs] == [
            (c, 64 // r, 64 // r) for c, r in zip(split.stage_channels, split.stage_reductions)]
        for k in range(1, split.num_stages + 1):
            torch.testing.assert_close(split(outputs[k - 1], k)[0], expected, atol=1e-5, rtol=1e-4)
    if name == 'resnet-basic':
        assert split.boundaries == ['layer1.1', 'layer2.0', 'layer3.0', 'layer4.0']


@pytest.mark.parametrize('name', ['resnet-basic', 'mobilenet_v2'])
def test_jointrd_trains_a_fading_torchvision_twin_and_deploys_it(name):
    """The recipe on a torchvision model: JointRD with the fading twin (at s = 1 it is the teacher), a few steps
    train every stage of the twin and leave the frozen teacher as it was; the faded twin deploys shortcut-free."""
    from jointrd_timm.recipes import DEFAULT_RECIPE
    from jointrd_timm.twins.verify import count_shortcut_additions
    torch.manual_seed(0)
    teacher = _moved_off_init(_small_models()[name]()).train()  # as a YAML builds it: the split must not move its BN
    teacher_state = copy.deepcopy(teacher.state_dict())
    pair = JointRD(make_fading(copy.deepcopy(teacher)), teacher, DEFAULT_RECIPE.jointrd_config(), num_epochs=1,
                   steps_per_epoch=3)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pair.eval()(x), teacher(x))
    first, last = [next(p for p in stage.parameters()) for stage in (pair.student_stages.stages[0],
                                                                    pair.student_stages.stages[-1])]
    before = [first.detach().clone(), last.detach().clone()]
    optimizer = torch.optim.SGD([p for p in pair.parameters() if p.requires_grad], lr=0.01)
    pair.train()
    for _ in range(3):
        out = pair(x)
        loss = pair.loss(out, torch.randint(0, 5, (4,)))['loss']
        assert len(out['hybrid_logits']) == pair.num_stages - 1
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before[0], first) and not torch.equal(before[1], last)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    deployed = deployable(pair.student).eval()
    assert count_shortcut_additions(deployed) == 0
    set_shortcut_scale(pair.student, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), pair.student.eval()(x), atol=1e-5, rtol=1e-4)


class _Chain(nn.Module):
    """Two torchvision stages and a classifier; ``order`` is the order its forward runs them, ``pool`` the global
    pooling it does in code, ``drop`` a dropout it does in code after the first stage. The classifier is registered
    first, the stages are a ModuleList: neither stops the forward from being a chain."""

    def __init__(self, order=('stem', 0, 1, 'fc'), pool=torch.nn.functional.adaptive_avg_pool2d, drop=0.0):
        super().__init__()
        self.fc = nn.Linear(16, 5)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.ModuleList([
            nn.Sequential(resnet.BasicBlock(8, 8)),
            nn.Sequential(resnet.BasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))))])
        self.order, self.pool, self.drop = order, pool, drop

    def forward(self, x):
        for step in self.order:
            if step == 'fc':
                x = self.fc(self.pool(x, 1).flatten(1))
            elif step == 'stem':
                x = self.stem(x)
            else:
                x = nn.functional.dropout(self.stages[step](x), self.drop, self.training) if step == 0 \
                    else self.stages[step](x)
        return x


def test_a_model_without_timms_interface_is_split_only_when_its_forward_is_a_chain():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    split = StageSplit(_Chain().eval(), x)
    assert (split.boundaries, split.stage_channels, split.stage_reductions, split.num_logits) == (
        ['stages.0.0', 'stages.1.0'], [8, 16], [1, 2], 5)
    advice = r"_Chain lacks feature_info, forward_features, forward_head of timm's model interface.*dict\(module="
    with pytest.raises(StageLayoutError, match=r"runs a child more than once \(it ran \['stem', 'stages.0.0', "
                                               r"'stages.0.0', 'stages.1.0', 'fc'\]\).*" + advice):
        StageSplit(_Chain(order=('stem', 0, 0, 1, 'fc')), x)
    with pytest.raises(StageLayoutError, match=r'does not reproduce model\(x\), .*' + advice):
        StageSplit(_Chain(pool=torch.nn.functional.adaptive_max_pool2d), x)  # a head it cannot see: refused
    with pytest.raises(StageLayoutError, match=r'does not reproduce model\(x\) in train mode \(a dropout.*' + advice):
        StageSplit(_Chain(drop=0.5), x)  # the same in eval mode, not in training
    # at 2x2 the last map is 1x1 and a max equals a mean: the larger input it is checked at tells them apart
    with pytest.raises(StageLayoutError, match=r'does not reproduce model\(x\), .*' + advice):
        StageSplit(_Chain(pool=torch.nn.functional.adaptive_max_pool2d), torch.randn(2, 3, 2, 2))
    with pytest.raises(StageLayoutError, match=r'is a wrapper \(DataParallel\) around the model: give JointRD the '
                                               r'model itself'):
        StageSplit(nn.DataParallel(_Chain()), x)


class _OneSize(nn.Module):
    """torchvision blocks whose feature maps all keep the stem's size: ``groups`` containers of ``blocks`` blocks
    each in a ModuleList (one container: a flat Sequential of blocks)."""

    def __init__(self, groups=2, blocks=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        body = [nn.Sequential(*[resnet.BasicBlock(8, 8) for _ in range(blocks)]) for _ in range(groups)]
        self.body = nn.ModuleList(body) if groups > 1 else body[0]
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        for group in (self.body if isinstance(self.body, nn.ModuleList) else [self.body]):
            x = group(x)
        return self.fc(x.mean((2, 3)))


def test_a_model_whose_maps_keep_one_size_is_cut_where_its_containers_of_blocks_end():
    """No reduction to cut at: the stages end where the outermost containers holding blocks end (else after every
    block); teacher and twin are cut alike and JointRD reaches every twin weight. One block is still refused."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    assert StageSplit(_OneSize().eval(), x).boundaries == ['body.0.1', 'body.1.1']
    assert StageSplit(_OneSize(groups=3, blocks=1).eval(), x).boundaries == ['body.0.0', 'body.1.0', 'body.2.0']
    teacher = _OneSize(groups=1, blocks=3).eval()
    split = StageSplit(teacher, x)
    assert (split.boundaries, split.stage_channels, split.stage_reductions) == (
        ['body.0', 'body.1', 'body.2'], [8, 8, 8], [2, 2, 2])
    from jointrd_timm.recipes import DEFAULT_RECIPE
    pair = JointRD(make_fading(copy.deepcopy(teacher)), teacher, DEFAULT_RECIPE.jointrd_config(), num_epochs=1,
                   steps_per_epoch=2, probe=x)
    assert pair.student_stages.boundaries == split.boundaries
    pair.train()
    pair(torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,)))['loss'].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.student.parameters() if p.requires_grad)
    many = StageSplit(_OneSize(groups=1, blocks=10).eval(), x)  # at most four stages: the blocks grouped in order
    assert many.boundaries == ['body.1', 'body.4', 'body.6', 'body.9']
    with pytest.raises(StageLayoutError, match=r'_OneSize has 1 stage\(s\) with residual blocks; JointRD needs at '
                                               r'least 2\..*where they keep one size: where its containers of blocks'):
        StageSplit(_OneSize(groups=1, blocks=1).eval(), x)


def test_the_adversarial_methods_train_torchvision_twins_on_the_features_their_classifier_gets():
    """APS reads the pooled features a torchvision model hands its classifier: the same as timm's pre-logits of the
    same ResNet with the same weights; one step trains the twin and the discriminator."""
    import timm
    from jointrd_timm.methods.adversarial import AdversarialPortableStudent, ConditionalAdversarialKD
    torch.manual_seed(0)
    tv = _moved_off_init(models.resnet18(num_classes=5))
    same = timm.create_model('resnet18', num_classes=5).eval()
    same.load_state_dict(tv.state_dict())
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 5, (4,))
    with torch.no_grad():
        pooled = AdversarialPortableStudent._pooled
        for got, expected in zip(pooled(tv, x), pooled(same, x)):
            torch.testing.assert_close(got, expected)
    twins = [jointrd_timm.make_plain(copy.deepcopy(tv)) for _ in range(2)]  # before a method freezes the teacher
    for method in (AdversarialPortableStudent(twins[0], tv), ConditionalAdversarialKD(twins[1], tv, num_classes=5)):
        method.train()
        out = method(x, y)
        assert torch.isfinite(out['loss']) and torch.isfinite(out['discriminator_loss'])
        out['loss'].backward()
        assert all(p.grad is not None for p in method.student.parameters())


class _LinearExcite(nn.Module):
    """Squeeze-excite with Linear layers, registered after the classifier: the last Linear is not the classifier."""

    def __init__(self, classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, classes)
        self.excite = nn.Linear(8, 32)

    def forward(self, x):
        h = self.body(x)
        return self.fc(h * self.excite(h)[:, :8].sigmoid())


def test_jointrd_names_torchvision_models_that_predict_other_classes():
    from jointrd_timm.methods.base import check_teacher_student, class_count
    assert class_count(_LinearExcite(10)) == 10  # the logits' width, not the last Linear's
    from jointrd_timm.methods.adversarial import AdversarialPortableStudent
    with pytest.raises(ValueError, match='_LinearExcite does not return what its last nn.Linear computes'):
        AdversarialPortableStudent._pooled(_LinearExcite(10), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match='the teacher _LinearExcite predicts 10 classes but the student _LinearExcite '
                                         'predicts 100'):
        check_teacher_student(_LinearExcite(10), _LinearExcite(100), 'JointRD')
    torch.manual_seed(0)
    with pytest.raises(ValueError, match='the teacher ResNet predicts 5 classes but the student ResNet predicts 7'):
        JointRD(make_fading(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=7)),
                resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5))


def test_a_torchvision_resnet_state_dict_is_a_teacher_of_timms_same_architecture(tmp_path):
    """torchvision's ResNets and timm's share their parameter names: its weights, converted to safetensors, are
    `jointrd distill resnet18 --teacher-weights`'s teacher, computing what the torchvision model computes."""
    from jointrd_timm.cli import main
    from jointrd_timm.training.distill import load_teacher, plan_distill
    torch.manual_seed(0)
    tv = _moved_off_init(models.resnet18(num_classes=10))
    tv.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grey digits
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / 'resnet18.pth')  # a bare state dict, as torchvision users save one
    weights = tmp_path / 'resnet18.safetensors'
    assert main(['convert-checkpoint', str(tmp_path / 'resnet18.pth'), str(weights)]) == 0
    plan = plan_distill('resnet18', 'sklearn:digits', str(tmp_path / 'out'), teacher_weights=str(weights), epochs=1,
                        limit=64, input_size=32)
    assert (plan.teacher.num_classes, plan.teacher.in_chans) == (10, 1)
    teacher = load_teacher(plan.teacher).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), tv(x), atol=1e-5)


def _torchvision_yaml(tmp_path, method='jointrd'):
    """The digits YAML of the runner tests with a torchvision ResNet-18 teacher and its twin (3 channels, 32 px)."""
    from conftest import tiny_yaml
    path = tiny_yaml(tmp_path, method=method, epochs=1, limit=32)
    text = path.read_text().replace('input_size: 8, channels: 1', 'input_size: 32, channels: 3')
    for name in ('resnet20_cifar', 'plain_resnet20_cifar'):
        text = text.replace(f"'{name}', num_classes: 10, in_chans: 1, norm_layer: 'batchnorm2d'",
                            f"'{name.replace('resnet20_cifar', 'torchvision:resnet18')}', num_classes: 10")
    assert text.count('torchvision:resnet18') == 2
    path.write_text(text)
    return path


def test_a_yaml_distills_a_torchvision_teacher_and_saves_a_twin_that_loads_and_evaluates(tmp_path):
    """torchdistill's YAML names torchvision models as torchvision:<name> / plain_torchvision:<name>; the runner
    trains JointRD on them and saves the deployed twin in a folder that load_model (so `jointrd eval`) reads back:
    shortcut-free, with the accuracy the run measured on the same images."""
    from jointrd_timm.integrations.hub import load_model
    from jointrd_timm.io import top1_accuracy
    from jointrd_timm.training.data import load_image_dataset
    from jointrd_timm.training.runner import load_config, train
    from jointrd_timm.twins.verify import count_shortcut_additions
    with pytest.warns(UserWarning, match=r'teacher torchvision:resnet18 is given no weights.*weights=a torchvision '):
        final = train(load_config(str(_torchvision_yaml(tmp_path)), []), output_dir=str(tmp_path / 'out'),
                      device='cpu')
    config = json.loads((tmp_path / 'out' / 'model' / 'config.json').read_text())
    assert (config['architecture'], config['num_classes'], config['pretrained_cfg']['input_size']) == (
        'plain_torchvision:resnet18', 10, [3, 32, 32])
    card = (tmp_path / 'out' / 'model' / 'README.md').read_text()
    assert f"model = load_model('local-dir:{tmp_path / 'out' / 'model'}')" in card and 'validate.py' not in card
    model = load_model(str(tmp_path / 'out'))
    assert type(model) is resnet.ResNet and count_shortcut_additions(model) == 0
    assert not any('downsample' in k for k in model.state_dict())
    test = load_image_dataset('sklearn:digits', split='test', recipe='tensor', input_size=32, channels=3, limit=32)
    with torch.no_grad():
        assert top1_accuracy(model, test) == pytest.approx(final['test_acc_deployed'])
    retrained = load_model(str(tmp_path / 'out'), num_classes=4)  # another label set: a fresh classifier only
    assert retrained.fc.out_features == 4 and torch.equal(retrained.conv1.weight, model.conv1.weight)


@pytest.mark.slow  # ~20 s: two processes; the default run checks 2-process DDP on timm twins (test_runner)
def test_two_processes_train_a_torchvision_twin_with_identical_replicas_and_save_it(tmp_path):
    """DDP over two CPU processes (gloo) on the torchvision YAML: both replicas end with the same weights and the
    saved twin is torchvision's own class, shortcut-free."""
    from conftest import torchrun
    from jointrd_timm.integrations.hub import load_model
    from jointrd_timm.twins.verify import count_shortcut_additions
    result = torchrun(['-m', 'jointrd_timm.cli', 'train', '--config', str(_torchvision_yaml(tmp_path)), '--device',
                       'cpu', '--output-dir', str(tmp_path / 'two')], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / 'two' / 'final.json').read_text())['replica_max_abs_diff'] == 0.0
    model = load_model(str(tmp_path / 'two'))
    assert type(model) is resnet.ResNet and count_shortcut_additions(model) == 0


def test_torchvision_model_names_are_checked_before_anything_is_built():
    from jointrd_timm.integrations.torchdistill import timm_model
    from jointrd_timm.models.torchvision_models import create_torchvision_model
    with pytest.raises(ValueError, match=r"Unknown torchvision model 'resnet81' \(in 'plain_torchvision:resnet81'\): "
                                         r"did you mean one of \['resnet18'"):
        timm_model('plain_torchvision:resnet81', num_classes=10)
    with pytest.raises(ValueError, match='shortcut_fade is an argument of the twin; name it '
                                         'plain_torchvision:resnet18'):
        create_torchvision_model('torchvision:resnet18', shortcut_fade=True)
    with pytest.raises(ValueError, match=r"pretrained is a timm argument; torchvision models take weights \(a "):
        create_torchvision_model('torchvision:resnet18', pretrained=True)
    with pytest.raises(ValueError, match=r"in_chans is a timm argument; torchvision models take the images in 3 "):
        create_torchvision_model('torchvision:resnet18', in_chans=1)
    assert create_torchvision_model('torchvision:resnet18', in_chans=3, num_classes=3).conv1.in_channels == 3
    with pytest.raises(ValueError, match='reset_head needs weights whose head to reset'):
        timm_model('torchvision:resnet18', num_classes=3, reset_head=True)
    fading = create_torchvision_model('plain_torchvision:resnet18', shortcut_fade=True, num_classes=3)
    teacher = create_torchvision_model('torchvision:resnet18', num_classes=3)
    assert (fading.num_classes, fading.pretrained_cfg['architecture'], teacher.pretrained_cfg['architecture']) == (
        3, 'plain_torchvision:resnet18', 'torchvision:resnet18')
    jointrd_timm.load_teacher_weights(fading, teacher)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fading.eval()(x), teacher.eval()(x))  # at s = 1 the fading twin is its teacher


def test_a_saved_torchvision_twin_is_built_back_with_its_builder_arguments(tmp_path):
    """What a torchvision twin was built with (a builder argument, kept projection shortcuts) is saved and rebuilds
    it; the fade is finished on the way; a card saved elsewhere names its own folder; non-data arguments, which
    config.json could not hold, are refused before anything trains."""
    from jointrd_timm.integrations.hub import card_with_source, load_model, model_card, save_trained_model
    from jointrd_timm.integrations.torchdistill import timm_model
    from jointrd_timm.twins.verify import count_shortcut_additions
    torch.manual_seed(0)
    twin = timm_model('plain_torchvision:resnet18', num_classes=3, shortcut_fade=True, keep_projection_shortcuts=True,
                      zero_init_residual=True)
    set_shortcut_scale(twin, 0.0)
    folder = save_trained_model(twin, tmp_path / 'model')
    assert json.loads((folder / 'config.json').read_text())['model_args'] == dict(keep_projection_shortcuts=True,
                                                                                 zero_init_residual=True)
    loaded = load_model(str(folder))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), twin.eval()(x))
    assert count_shortcut_additions(loaded) == 3  # the three projections it kept
    card = model_card(dict(name='t', architecture='plain_torchvision:resnet18', method='m', metrics={}, dataset='d',
                           training={}, local_dir=str(folder)))
    assert "load_model('local-dir:/elsewhere')" in card_with_source(card, 'local-dir:/elsewhere')
    with pytest.raises(ValueError, match=r"builder arguments \['norm_layer'\] include one that is not plain data"):
        timm_model('plain_torchvision:resnet18', norm_layer=nn.BatchNorm2d)


@pytest.mark.parametrize('arch', ['plain_torchvision:resnet18', 'plain_resnet20_cifar'])
def test_a_save_that_fails_leaves_nothing_beside_the_folder(tmp_path, arch):
    from jointrd_timm.errors import InputError
    from jointrd_timm.integrations.hub import save_trained_model
    from jointrd_timm.integrations.torchdistill import timm_model
    save_trained_model(timm_model(arch, num_classes=3), tmp_path / 'model')
    before = {p.name: p.read_bytes() for p in (tmp_path / 'model').iterdir()}
    with pytest.raises(InputError, match='4 class names for a model with 3 outputs'):
        save_trained_model(timm_model(arch, num_classes=3), tmp_path / 'model', label_names=list('abcd'))
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']  # no .model.tmp
    assert {p.name: p.read_bytes() for p in (tmp_path / 'model').iterdir()} == before


DISTILL_TOY = dict(epochs=1, limit=32, input_size=32)


@pytest.mark.slow  # two trainings and the comparison: about a minute
def test_jointrd_distill_takes_a_torchvision_teacher_by_name_and_from_the_folders_it_writes(tmp_path, capsys):
    """`jointrd distill torchvision:mobilenet_v3_small` trains the teacher here (RGB, whatever the data), then its
    twin plain_torchvision:mobilenet_v3_small, saved shortcut-free with the accuracy the comparison states; the
    teacher folder it wrote, and the twin's JointRD run (whose checkpoint holds the teacher), are TEACHERs of a next
    distill."""
    from jointrd_timm.integrations.hub import load_model
    from jointrd_timm.io import top1_accuracy
    from jointrd_timm.training.distill import load_teacher, plan_distill, resolve_teacher, run_distill
    from jointrd_timm.twins.verify import count_shortcut_additions
    torch.manual_seed(0)
    summary = run_distill('torchvision:mobilenet_v3_small', 'sklearn:digits', str(tmp_path / 'out'),
                          latency_repeats=1, **DISTILL_TOY)
    hint = 'give them, e.g. torchvision:mobilenet_v3_small.IMAGENET1K_V1'  # torchvision's weights, as timm's tags
    assert hint in capsys.readouterr().out
    config = json.loads((tmp_path / 'out' / 'model' / 'config.json').read_text())
    assert (summary['twin'], config['architecture'], config['library'], config['pretrained_cfg']['input_size']) == (
        'plain_torchvision:mobilenet_v3_small', 'plain_torchvision:mobilenet_v3_small', 'torchvision', [3, 32, 32])
    twin = load_model(str(tmp_path / 'out' / 'model'))
    assert type(twin) is mobilenetv3.MobileNetV3 and count_shortcut_additions(twin) == 0
    from jointrd_timm.training.runner import load_config
    test = load_config(str(tmp_path / 'out' / 'distill.yaml'), [])['datasets']['test']
    with torch.no_grad():
        assert top1_accuracy(twin, test) == pytest.approx(summary['test_acc']['twin'])
    trained = load_model(str(tmp_path / 'out' / 'teacher' / 'model'))
    x = torch.randn(2, 3, 32, 32)
    for folder in (tmp_path / 'out' / 'teacher' / 'model', tmp_path / 'out' / 'twin'):
        teacher = resolve_teacher(str(folder))
        assert (teacher.arch, teacher.num_classes, teacher.in_chans) == ('torchvision:mobilenet_v3_small', 10, 3)
        with torch.no_grad():
            assert torch.equal(load_teacher(teacher)(x), trained(x))
    plan = plan_distill(str(tmp_path / 'out' / 'twin'), 'sklearn:digits', str(tmp_path / 'again'), **DISTILL_TOY)
    assert not plan.teacher_trained_here and plan.pair['kwargs']['student']['model_name'] == \
        'plain_torchvision:mobilenet_v3_small'


def test_a_torchvision_teacher_keeps_its_builder_arguments_through_distill(tmp_path):
    """A torchvision teacher saved with builder arguments (a half-width MobileNetV2) gives them to its twin and to
    the teacher config of the run, so its weights load."""
    from jointrd_timm.integrations.hub import save_trained_model
    from jointrd_timm.integrations.torchdistill import timm_model
    from jointrd_timm.training.distill import build_configs, plan_distill
    torch.manual_seed(0)
    save_trained_model(timm_model('torchvision:mobilenet_v2', num_classes=10, width_mult=0.5), tmp_path / 'teacher')
    plan = plan_distill(str(tmp_path / 'teacher'), 'sklearn:digits', str(tmp_path / 'out'), **DISTILL_TOY)
    assert {k: plan.pair['kwargs']['student'][k] for k in ('width_mult', 'num_classes')} == dict(width_mult=0.5,
                                                                                               num_classes=10)
    teacher = build_configs(plan, plan.teacher.model)['distill']['models']['model']['kwargs']['teacher']
    built = timm_model(**teacher)
    assert built.features[0][0].out_channels == 16  # 32 at full width
    assert torch.equal(built.features[0][0].weight, timm_model(**plan.teacher.model).features[0][0].weight)


def _cached_torchvision_weights(tmp_path, monkeypatch):
    """A resnet18 state dict where torch's hub cache keeps torchvision's IMAGENET1K_V1 file (as a download leaves
    it), TORCH_HOME pointing there; the model whose weights they are."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    source = _moved_off_init(models.resnet18()).eval()
    path = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    return source


def test_torchvision_weights_by_name_load_from_torchs_cache_with_a_fresh_classifier_for_other_classes(tmp_path,
                                                                                                     monkeypatch):
    from jointrd_timm.integrations.torchdistill import timm_model
    from jointrd_timm.training.distill import build_configs, load_teacher, plan_distill
    source = _cached_torchvision_weights(tmp_path, monkeypatch)
    model = timm_model('torchvision:resnet18', weights='IMAGENET1K_V1', num_classes=10)
    state, reference = model.state_dict(), source.state_dict()
    assert model.fc.out_features == 10 and not torch.equal(model.fc.weight[:10], reference['fc.weight'][:10])
    assert all(torch.equal(v, reference[k]) for k, v in state.items() if not k.startswith('fc.'))
    assert (model.pretrained_cfg['crop_pct'], model.pretrained_cfg['interpolation']) == (224 / 256, 'bilinear')
    same = timm_model('torchvision:resnet18', weights='DEFAULT', reset_head=True)  # as many classes, fresh head
    assert same.fc.out_features == 1000 and not torch.equal(same.fc.weight, reference['fc.weight'])
    with pytest.raises(DistillError, match=r'Teacher torchvision:resnet18.DEFAULT predicts 1000 classes, but the '
                                           r'data sklearn:digits has 10 labels. Pass --num-classes 10'):
        plan_distill('torchvision:resnet18.DEFAULT', 'sklearn:digits', str(tmp_path / 'out'), **DISTILL_TOY)
    plan = plan_distill('torchvision:resnet18.DEFAULT', 'sklearn:digits', str(tmp_path / 'out'), num_classes=10,
                        **DISTILL_TOY)
    assert plan.teacher_trained_here and plan.teacher.data_cfg['crop_pct'] == 224 / 256
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_teacher(plan.teacher)(x), source(x))
    teacher = build_configs(plan, plan.teacher.model)['teacher']['models']['model']['kwargs']
    assert (teacher['weights'], teacher['num_classes']) == ('IMAGENET1K_V1', 10)
    squeezenet = tmp_path / 'torch' / 'hub' / 'checkpoints' / 'squeezenet1_1-b8a52dc0.pth'
    torch.save(models.squeezenet1_1().state_dict(), squeezenet)  # its classifier is a convolution
    assert timm_model('torchvision:squeezenet1_1', weights='DEFAULT').num_classes == 1000  # the weights' classes
    with pytest.raises(ValueError, match='its classifier is not one nn.Linear, so weights for other classes cannot '
                                         'be loaded with a fresh one; give num_classes as the weights have them'):
        timm_model('torchvision:squeezenet1_1', weights='DEFAULT', num_classes=10)


def test_torchvision_teachers_that_cannot_be_had_are_refused_with_the_way_to_provide_them(tmp_path, monkeypatch):
    from jointrd_timm.training.distill import plan_distill
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty'))
    cached = tmp_path / 'empty' / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'
    for teacher, message in (
            ('torchvision:resnet18.IMAGENET1K_V1', f'ResNet18_Weights.IMAGENET1K_V1 of resnet18 are not available: '
                                                   f'{cached} is not in torch\'s hub cache'),
            ('torchvision:resnet18.IMAGENET1K_V9', 'torchvision model resnet18 has no weights \'IMAGENET1K_V9\'; its '
                                                   'weights: IMAGENET1K_V1, DEFAULT.'),
            ('torchvision:resnet81', r"Unknown teacher 'torchvision:resnet81': Unknown torchvision model 'resnet81'"),
            ('plain_torchvision:resnet18', r'is a shortcut-free twin already; give its residual teacher '
                                           r'\(torchvision:resnet18\)'),
            ('torchvision:swin_t', 'is a transformer .* ShiftedWindowAttention'),
            ('torchvision:densenet121', 'DenseNet has no shortcut addition anywhere')):
        with pytest.raises(DistillError, match=re.escape(message) if 'not available' in message else message):
            plan_distill(teacher, 'sklearn:digits', str(tmp_path / 'out'), num_classes=10, **DISTILL_TOY)
        assert not (tmp_path / 'out').exists()


def test_teacher_weights_of_a_torchvision_architecture(tmp_path):
    """--teacher-weights with a torchvision name: a bare state dict of that model (safetensors), its classes read
    from the classifier; a stem for other than 3 channels is refused (torchvision models read RGB)."""
    from safetensors.torch import save_file
    from jointrd_timm.training.distill import load_teacher, plan_distill
    torch.manual_seed(0)
    tv = _moved_off_init(models.resnet18(num_classes=7)).eval()
    save_file(tv.state_dict(), str(tmp_path / 'tv.safetensors'))
    plan = plan_distill('torchvision:resnet18', 'sklearn:digits', str(tmp_path / 'out'), num_classes=10,
                        teacher_weights=str(tmp_path / 'tv.safetensors'), **DISTILL_TOY)
    assert (plan.teacher.num_classes, plan.teacher.in_chans, plan.input_chw) == (7, 3, (3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_teacher(plan.teacher)(x), tv(x))
    tv.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    save_file(tv.state_dict(), str(tmp_path / 'grey.safetensors'))
    with pytest.raises(DistillError, match="its first convolution takes 1 channels, but torchvision:resnet18 is "
                                           "built for 3 .* Give timm's same architecture"):
        plan_distill('torchvision:resnet18', 'sklearn:digits', str(tmp_path / 'out'), num_classes=10,
                     teacher_weights=str(tmp_path / 'grey.safetensors'), **DISTILL_TOY)


def test_a_torchvision_twin_pushed_to_the_hub_loads_from_its_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from jointrd_timm.integrations.hub import card_for_hub, load_model, model_card, save_trained_model
    from jointrd_timm.integrations.torchdistill import timm_model
    torch.manual_seed(0)
    twin = timm_model('plain_torchvision:resnet18', num_classes=3)
    folder = save_trained_model(twin, tmp_path / 'model')
    snapshot = tmp_path / 'cache' / 'models--org--twin' / 'snapshots' / ('a' * 40)
    snapshot.mkdir(parents=True)
    for name in ('config.json', 'model.safetensors'):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    (snapshot.parents[1] / 'refs').mkdir()
    (snapshot.parents[1] / 'refs' / 'main').write_text('a' * 40)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    loaded = load_model('hf-hub:org/twin')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), twin.eval()(x))
    card = card_for_hub(model_card(dict(name='t', architecture='plain_torchvision:resnet18', method='m', metrics={},
                                        dataset='d', training={}, local_dir=str(folder))), 'org/twin')
    assert "model = load_model('hf-hub:org/twin')" in card and 'library_name: pytorch' in card


def test_derive_memory_and_bench_take_torchvision_names(capsys, tmp_path):
    """``jointrd derive / memory / bench`` build a torchvision model and its twin by name (a weights name is read as
    the architecture: these commands measure random weights, nothing is fetched), and say what they say of a timm
    one: the shortcuts counted and removed, the activation memory the shortcuts hold, the latency pair."""
    import json
    from jointrd_timm.cli import main
    from jointrd_timm.deploy.memory import analyze_activation_memory, measure_peak_rss
    from jointrd_timm.models.torchvision_models import create_named_model
    assert main(['derive', 'torchvision:resnet18.IMAGENET1K_V1', '--input-size', '64']) == 0
    out = capsys.readouterr().out
    assert out.startswith('twin of torchvision:resnet18: plain_torchvision:resnet18')
    assert 'shortcut additions: 8 -> 0 (8 removed, 0 projections kept)' in out and 'FLOPs at 64x64' in out
    assert 'layer2.0.downsample' in out
    assert main(['memory', 'plain_torchvision:resnet50', '--input-size', '64', '--batch', '2']) == 0
    out = capsys.readouterr().out
    x = torch.randn(2, 3, 64, 64)
    peaks = [analyze_activation_memory(fold_for_deployment(create_named_model(n))[0], x).peak_bytes
             for n in ('torchvision:resnet50', 'plain_torchvision:resnet50')]
    assert peaks[0] > peaks[1]  # a bottleneck's shortcut keeps its wide input alive beside the branch
    assert f'torchvision:resnet50: peak {peaks[0] / 2**20:.2f} MB' in out and ', 16 shortcut additions' in out
    assert f'plain_torchvision:resnet50: peak {peaks[1] / 2**20:.2f} MB' in out and ', 0 shortcut additions' in out
    assert f'ratio residual / twin: {peaks[0] / peaks[1]:.2f}x' in out
    report = tmp_path / 'bench'
    assert main(['bench', 'torchvision:mobilenet_v3_small', '--batches', '1', '--repeats', '2', '--no-onnx',
                 '--no-measure', '--output', str(report)]) == 0
    row = json.loads(report.with_suffix('.json').read_text())['results'][0]
    assert row['teacher'] == 'torchvision:mobilenet_v3_small' and row['input_size'] == 224
    assert row['params']['residual'] == row['params']['twin'] > 0  # its shortcuts have no projection to remove
    assert {'residual/eager', 'twin/eager', 'speedup/eager'} <= set(row['batches']['1'])
    assert measure_peak_rss('plain_torchvision:resnet18', 1, 32, threads=1) > 0  # built by name in a fresh process
    # without weights, measured at the size its default weights read images at (metadata only: nothing fetched)
    from jointrd_timm.deploy.bench import model_input_size
    assert model_input_size(create_named_model('torchvision:efficientnet_b3')) == 300


@pytest.mark.parametrize('derive', [jointrd_timm.make_plain, make_fading])
def test_a_torchvision_twin_drops_no_sample_at_random_and_starts_tiny_layer_scales_at_one(derive):
    """torchvision's ConvNeXt and EfficientNet drop a block's branch for random samples in training (stochastic depth,
    on by default): beside the shortcut a sample skips the block, in a twin it would lose its whole signal. The twin
    keeps none (two train-mode forwards agree), as timm's twins keep no DropPath. A ConvNeXt layer scale still at
    its residual-friendly init (1e-6) starts at 1; a trained one is kept."""
    builders = {
        'convnext': lambda scale: convnext.ConvNeXt(
            [convnext.CNBlockConfig(16, 32, 2), convnext.CNBlockConfig(32, None, 2)], stochastic_depth_prob=0.5,
            num_classes=5, layer_scale=scale),
        'efficientnet': lambda scale: efficientnet.EfficientNet(
            [efficientnet.FusedMBConvConfig(1, 3, 1, 16, 16, 2), efficientnet.MBConvConfig(4, 3, 2, 16, 24, 2)],
            stochastic_depth_prob=0.5, dropout=0.0, num_classes=5, last_channel=32)}
    x = torch.randn(4, 3, 32, 32)
    for family, build in builders.items():
        torch.manual_seed(0)
        residual = build(1e-6) if family == 'convnext' else build(None)
        assert any(type(m).__name__ == 'StochasticDepth' for m in residual.modules())
        twin = derive(copy.deepcopy(residual))
        if derive is make_fading:
            set_shortcut_scale(twin, 0.0)
        assert not any(type(m).__name__ == 'StochasticDepth' for m in twin.modules()), family
        twin.train()
        torch.manual_seed(1)
        first = twin(x)
        torch.manual_seed(2)
        assert torch.equal(first, twin(x)), family
        if family == 'convnext':
            scales = [m.layer_scale for m in twin.modules() if hasattr(m, 'layer_scale')]
            assert len(scales) == 4 and all(bool((s == 1).all()) for s in scales)
            trained = derive(build(0.5))
            assert all(bool((m.layer_scale == 0.5).all()) for m in trained.modules() if hasattr(m, 'layer_scale'))


def test_a_model_that_reads_its_version_when_loading_takes_teacher_weights_and_saved_weights(tmp_path):
    """torchvision's MNASNet refuses a state dict without module versions, and safetensors keeps none: the teacher's
    weights (as a model, and read back from a file) load into its twin, and the saved twin loads back, exactly."""
    from safetensors.torch import load_file, save_file
    from jointrd_timm.models.torchvision_models import (create_torchvision_model, load_torchvision_folder,
                                                        save_torchvision_model)
    torch.manual_seed(0)
    teacher = _moved_off_init(create_torchvision_model('torchvision:mnasnet0_5', num_classes=5))
    save_file(teacher.state_dict(), str(tmp_path / 'teacher.safetensors'))
    x = torch.randn(2, 3, 64, 64)
    for source in (teacher, load_file(str(tmp_path / 'teacher.safetensors'))):
        twin = create_torchvision_model('plain_torchvision:mnasnet0_5', num_classes=5)
        jointrd_timm.load_teacher_weights(twin, source)
        assert torch.equal(twin.layers[0].weight, teacher.layers[0].weight)
    save_torchvision_model(twin, tmp_path / 'twin', {})
    assert torch.equal(load_torchvision_folder(tmp_path / 'twin')(x), twin.eval()(x))


def test_a_bare_torchvision_teacher_reads_images_at_its_default_weights_size():
    """As a bare timm architecture is read at its default tag's size: a bare torchvision teacher (trained here) and
    a bare model carry their default weights' size and reading, without fetching anything (metadata only)."""
    from jointrd_timm.models.torchvision_models import create_torchvision_model
    from jointrd_timm.training.teachers import resolve_teacher
    sizes = {name: resolve_teacher(f'torchvision:{name}').input_size
             for name in ('efficientnet_b3', 'resnet18', 'efficientnet_v2_s')}
    assert sizes == {'efficientnet_b3': 300, 'resnet18': 224, 'efficientnet_v2_s': 384}
    cfg = create_torchvision_model('torchvision:efficientnet_b3', num_classes=3).pretrained_cfg
    assert (cfg['input_size'], cfg['crop_pct'], cfg['interpolation']) == ((3, 300, 300), 300 / 320, 'bicubic')
