"""Twins of torchvision models: make_plain derives them through the graph rules of torchvision's residual blocks
(jointrd_timm/twins/families/torchvision.py). Small instances of each family, one per block class; the number of
shortcuts cut is counted from torchvision's own attributes, and the folded twin's whole graph is checked by the
second detector (the activation-memory analysis)."""
import copy

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
from jointrd_timm.methods.stages import StageLayoutError  # noqa: E402
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


def test_torchvision_teacher_weights_load_into_its_twin_and_jointrd_says_what_it_needs():
    torch.manual_seed(0)
    teacher = _moved_off_init(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5))
    twin = jointrd_timm.make_plain(resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5))
    jointrd_timm.load_teacher_weights(twin, teacher.state_dict())  # strict but for the removed projections
    assert torch.equal(twin.conv1.weight, teacher.conv1.weight)
    assert not any('downsample' in k for k in twin.state_dict())
    with pytest.raises(StageLayoutError, match="forward_features, forward_head.*timm's model interface"):
        JointRD(make_fading(copy.deepcopy(teacher)), teacher)


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
