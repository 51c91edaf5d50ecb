"""Each hand-written plain forward (a swap rule's class) is its teacher block's forward without the identity
addition: with the activation after the sum taken out, plain(x) == teacher(x) - x; with a kept projection, the
plain block gives the teacher's output exactly. Checked on block instances of small timm models (their inputs
from a real forward), weights moved off their init."""
import copy

import pytest
import timm
import torch
from timm.models import convnext, cspnet, dla, nfnet, res2net, resnest, resnet, resnetv2, senet, sknet
from torch import nn

from jointrd_timm.twins.rules import _PLAIN_CLASSES, dropped_scales, get_rule


def _timm(name, **kwargs):
    return lambda: timm.create_model(name, **kwargs)


ONE_BLOCK_PER_STAGE = dict(layers=(1, 1, 1, 1))
TWO_BLOCKS_FIRST = dict(layers=(2, 1, 1, 1))  # bottleneck nets: the first block of each stage projects
# sample -> (a model or block stack, the swap-rule classes it holds, with and without projection where timm has one)
SAMPLES = {
    'resnet20_cifar': (_timm('resnet20_cifar'), {resnet.BasicBlock}),
    'seresnet50': (_timm('seresnet50', **TWO_BLOCKS_FIRST), {resnet.Bottleneck}),
    'resnetv2_18': (_timm('resnetv2_18', **ONE_BLOCK_PER_STAGE), {resnetv2.PreActBasic}),
    'resnetv2_50': (_timm('resnetv2_50', **TWO_BLOCKS_FIRST), {resnetv2.PreActBottleneck}),
    'resnetv2_50_not_preact': (_timm('resnetv2_50', preact=False, **TWO_BLOCKS_FIRST), {resnetv2.Bottleneck}),
    'convnext_atto': (_timm('convnext_atto'), {convnext.ConvNeXtBlock}),
    'csp_blocks': (lambda: nn.Sequential(cspnet.BottleneckBlock(32, 32), cspnet.DarkBlock(32, 32),
                                         cspnet.EdgeBlock(32, 32)),
                   {cspnet.BottleneckBlock, cspnet.DarkBlock, cspnet.EdgeBlock}),
    'dla34': (_timm('dla34'), {dla.DlaBasic, dla.DlaTree}),
    'dla60': (_timm('dla60'), {dla.DlaBottleneck, dla.DlaTree}),
    'dla60_res2net': (_timm('dla60_res2net'), {dla.DlaBottle2neck, dla.DlaTree}),
    'nf_resnet26': (_timm('nf_resnet26'), {nfnet.NormFreeBlock}),
    'res2net50_26w_4s': (_timm('res2net50_26w_4s', **TWO_BLOCKS_FIRST), {res2net.Bottle2neck}),
    'resnest14d': (_timm('resnest14d', **TWO_BLOCKS_FIRST), {resnest.ResNestBottleneck}),
    'legacy_seresnet18': (_timm('legacy_seresnet18', **ONE_BLOCK_PER_STAGE), {senet.SEResNetBlock}),
    'legacy_seresnet50': (_timm('legacy_seresnet50', **TWO_BLOCKS_FIRST), {senet.SEResNetBottleneck}),
    'legacy_seresnext26_32x4d': (_timm('legacy_seresnext26_32x4d', **TWO_BLOCKS_FIRST), {senet.SEResNeXtBottleneck}),
    'se_bottlenecks': (lambda: nn.Sequential(  # SENet-154's block, without building SENet-154
        senet.SEBottleneck(32, 16, groups=4, reduction=4,
                           downsample=nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64))),
        senet.SEBottleneck(64, 16, groups=4, reduction=4)), {senet.SEBottleneck}),
    'skresnet18': (_timm('skresnet18', **ONE_BLOCK_PER_STAGE), {sknet.SelectiveKernelBasic}),
    'skresnet50': (_timm('skresnet50', **TWO_BLOCKS_FIRST), {sknet.SelectiveKernelBottleneck}),
}
# the activation applied after the shortcut sum (none if absent), taken out of both blocks for the comparison
ACTIVATION_AFTER_SUM = {
    resnet.BasicBlock: 'act2', resnet.Bottleneck: 'act3', resnetv2.Bottleneck: 'act3', cspnet.BottleneckBlock: 'act3',
    dla.DlaBasic: 'relu', dla.DlaBottleneck: 'relu', dla.DlaBottle2neck: 'relu', res2net.Bottle2neck: 'relu',
    resnest.ResNestBottleneck: 'act3', senet.SEBottleneck: 'relu', senet.SEResNetBottleneck: 'relu',
    senet.SEResNeXtBottleneck: 'relu', senet.SEResNetBlock: 'relu', sknet.SelectiveKernelBasic: 'act',
    sknet.SelectiveKernelBottleneck: 'act',
}
# the tree hands its shortcut to its first child, so only its kept projection compares tree to tree
NO_LOCAL_IDENTITY = {dla.DlaTree}
# blocks that take their shortcut as an argument (from the DLA tree), added as it comes
LEAVES = {dla.DlaBasic, dla.DlaBottleneck, dla.DlaBottle2neck}


def _swap_rule_classes():
    return {rule.block_class for rule in _PLAIN_CLASSES.values()}


def _block_inputs(sample):
    """{block class: [(block, positional args), ...]} for the swap-rule blocks of the sample, from a forward."""
    torch.manual_seed(0)
    model = SAMPLES[sample][0]().eval()
    swap_classes, found, hooks = _swap_rule_classes(), {}, []
    for module in model.modules():
        if type(module) in swap_classes:
            hooks.append(module.register_forward_pre_hook(
                lambda m, args: found.setdefault(type(m), []).append((m, args))))
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        model(torch.randn(2, first.in_channels, 32, 32))
    for hook in hooks:
        hook.remove()
    return found


def _pair(block):
    """(teacher, plain, kept): copies of ``block`` with every weight and statistic moved off its init (zero-init
    BN gammas and tiny layer scales would make any branch compare equal); the plain one keeps a projection."""
    teacher = copy.deepcopy(block)
    with torch.no_grad():
        for name, tensor in teacher.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.5 if name.endswith('running_var')
                            else torch.randn_like(tensor) * 0.1)
    for attr in dropped_scales(block):  # e.g. the NF block's alpha and beta (families/nfnet.py): set to 1
        setattr(teacher, attr, 1.0)
    plain = copy.deepcopy(teacher)
    kept = get_rule(plain).apply(plain, True)
    return teacher.eval(), plain.eval(), kept


def _check_identity_removed(cls, teacher, plain, x):
    """plain(x) == teacher(x) - x, the activation after the sum taken out of both."""
    attr = ACTIVATION_AFTER_SUM.get(cls)
    for block in (teacher, plain):
        if attr:
            setattr(block, attr, nn.Identity())
    branch, residual = plain(x), teacher(x)
    assert branch.abs().max() > 1e-2, f'{cls.__name__}: the branch vanishes, the comparison would prove nothing'
    tolerance = 1e-5 * (x.abs().max() + branch.abs().max())
    assert torch.allclose(residual - x, branch, rtol=0, atol=tolerance), cls.__name__


@pytest.mark.parametrize('sample', sorted(SAMPLES))
def test_plain_forward_is_teacher_forward_without_the_identity(sample):
    found = _block_inputs(sample)
    assert set(found) == SAMPLES[sample][1]
    for cls, calls in found.items():
        identity_done, projection_done, leaf_done = cls in NO_LOCAL_IDENTITY, False, cls not in LEAVES
        for block, args in calls:
            if identity_done and leaf_done and projection_done:
                break
            teacher, plain, kept = _pair(block)
            with torch.no_grad():
                if kept and not projection_done:  # a kept projection: the teacher's forward, to the bit
                    assert torch.equal(plain(*args), teacher(*args)), f'{sample}: {cls.__name__} with projection'
                    projection_done = True
                elif cls in LEAVES and not leaf_done and len(args) > 1 and isinstance(args[1], torch.Tensor):
                    assert torch.equal(plain(*args[:2]), teacher(*args[:2])), f'{sample}: {cls.__name__}'
                    leaf_done = True
                elif not kept and not identity_done:
                    _check_identity_removed(cls, teacher, plain, args[0])
                    identity_done = True
        assert identity_done, f'{sample}: no {cls.__name__} with an identity shortcut was compared'
        assert leaf_done, f'{sample}: no {cls.__name__} was handed a shortcut by its tree'
        if cls is dla.DlaTree:
            assert projection_done, f'{sample}: no DlaTree with a projection was compared'


def test_the_samples_hold_every_swap_rule_class():
    listed = set().union(*(classes for _, classes in SAMPLES.values()))
    missing = {f'{c.__module__}.{c.__name__}' for c in _swap_rule_classes() - listed}
    assert not missing, f'add a sample model for {sorted(missing)}'
