"""Shortcut fading (jointrd_timm.twins.fade): s = 1 is the teacher, s = 0 the twin, finish_fade removes exactly
the shortcuts; schedules, JointRD / FadingStudent / runner wiring, deployment and errors."""
import copy
import io
import json
import pickle

import pytest
import timm
import torch
from safetensors.torch import load_file

import jointrd_timm  # noqa: F401
from conftest import tiny_yaml
from jointrd_timm.methods import JointRD, JointRDConfig
from jointrd_timm.training.runner import load_config, train
from jointrd_timm.twins import NotResidualError, count_shortcut_additions, make_plain
from jointrd_timm.methods.fading import FadingStudent
from jointrd_timm.methods.schedules import block_scales, fade_scale
from jointrd_timm.twins.fade import (SCALE, FadingGraphBlock, deployable, finish_fade, is_fading, make_fading,
                                     set_shortcut_scale, shortcut_scale)
from jointrd_timm.twins.transfer import load_teacher_weights

# one architecture per kind of rule: swap (CIFAR + timm ResNet), timm's own switch, graph rule; DLA hands its blocks
# their shortcut as an argument
ARCHS = [('resnet20_cifar', 32), ('resnet18', 64), ('mobilenetv3_small_050', 64), ('ghostnet_050', 64),
         ('dla46_c', 64)]


def _pair(arch, **kwargs):
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=10, **kwargs).eval()
    fading = timm.create_model(f'plain_{arch}', num_classes=10, shortcut_fade=True, **kwargs).eval()
    return teacher, fading


@pytest.mark.parametrize('arch,size', ARCHS)
def test_scale_one_is_the_teacher_and_scale_zero_is_the_twin(arch, size):
    teacher, fading = _pair(arch)
    fading.load_state_dict(teacher.state_dict())  # same keys: the scale buffer is not persistent
    x = torch.randn(2, 3, size, size)
    assert torch.equal(fading(x), teacher(x))
    assert fading.plain_report.shortcuts_removed == count_shortcut_additions(teacher) > 0  # all of them scaled
    set_shortcut_scale(fading, 0.0)
    at_zero = fading(x)
    finish_fade(fading)
    twin = timm.create_model(f'plain_{arch}', num_classes=10).eval()
    twin.load_state_dict(fading.state_dict())  # strict: exactly the twin's parameters, projections gone
    assert torch.equal(twin(x), at_zero) and torch.equal(fading(x), at_zero)
    assert count_shortcut_additions(fading) == 0 and not is_fading(fading)
    assert sorted(fading.plain_report.removed_modules) == sorted(twin.plain_report.removed_modules)


def test_fading_a_model_without_shortcuts_is_refused_at_once():
    # LCNet's blocks are rule-known but all run with timm's skip off: nothing to fade, so no fading twin (and no
    # plain_lcnet_035 is registered)
    from jointrd_timm.twins.fade import make_fading
    with pytest.raises(NotResidualError, match='no shortcut addition to fade .* without shortcut_fade'):
        make_fading(timm.create_model('lcnet_035'))
    assert 'plain_lcnet_035' not in timm.list_models('plain_*')


def test_intermediate_scale_matches_a_hand_computed_block():
    _, fading = _pair('resnet20_cifar')
    block = fading.layer1[0]
    set_shortcut_scale(fading, 0.3)
    x = torch.randn(2, 16, 8, 8)
    h = block.act1(block.bn1(block.conv1(x)))
    expected = torch.relu(block.bn2(block.conv2(h)) + 0.3 * x)
    torch.testing.assert_close(block(x), expected)
    projection = fading.layer2[0]  # stride-2 block: its projection shortcut is scaled as well
    x2 = torch.randn(2, 16, 8, 8)
    h2 = projection.act1(projection.bn1(projection.conv1(x2)))
    expected2 = torch.relu(projection.bn2(projection.conv2(h2)) + 0.3 * projection.downsample(x2))
    torch.testing.assert_close(projection(x2), expected2)
    assert shortcut_scale(fading) == pytest.approx(0.3)


def test_gradients_reach_every_parameter_while_fading():
    _, fading = _pair('resnet20_cifar')
    fading.train()
    set_shortcut_scale(fading, 0.5)
    fading(torch.randn(4, 3, 32, 32)).logsumexp(1).sum().backward()
    dead = [n for n, p in fading.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert dead == []


def test_fused_scale_keeps_the_teacher_gradients_at_one_and_the_unfused_ones_in_between():
    """The fading blocks compute branch + s * shortcut in one op (issue 23); at s = 1 the loss and every gradient
    are the teacher's bit for bit (train mode), at 0 < s < 1 those of the unfused expression within float noise."""
    teacher, fading = _pair('resnet20_cifar')
    fading.load_state_dict(teacher.state_dict())
    teacher.train(), fading.train()
    x = torch.randn(4, 3, 32, 32)

    def grads(model):
        model.zero_grad()
        loss = model(x).logsumexp(1).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_t, grad_t = grads(teacher)
    loss_f, grad_f = grads(fading)
    assert torch.equal(loss_t, loss_f) and all(torch.equal(grad_t[n], grad_f[n]) for n in grad_t)

    set_shortcut_scale(fading, 0.3)
    block = fading.layer2[0]  # with its projection shortcut
    h = torch.randn(2, 16, 16, 16, requires_grad=True)
    fused = block(h)
    fused_grads = torch.autograd.grad(fused.square().sum(), [h, *block.parameters()])
    mid = block.act1(block.bn1(block.conv1(h)))
    unfused = torch.relu(block.bn2(block.conv2(mid)) + block.downsample(h) * 0.3)
    unfused_grads = torch.autograd.grad(unfused.square().sum(), [h, *block.parameters()])
    torch.testing.assert_close(fused, unfused)
    for a, b in zip(fused_grads, unfused_grads):
        torch.testing.assert_close(a, b)


def test_paper_variant_keeps_the_projection_shortcuts():
    torch.manual_seed(0)
    fading = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True,
                               keep_projection_shortcuts=True)
    assert fading.plain_report.kept_projections == ['layer2.0', 'layer3.0']
    set_shortcut_scale(fading, 0.0)
    finish_fade(fading)
    assert count_shortcut_additions(fading) == 2  # only the two projections remain
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10, keep_projection_shortcuts=True).eval()
    twin.load_state_dict(fading.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(twin(x), fading.eval()(x))



@pytest.mark.parametrize('arch', ['dla46_c', 'dla34'])
def test_kept_projections_handed_to_a_child_stay_through_the_fade(arch):
    """DLA's tree computes the projection and hands it to its first leaf: with keep_projection_shortcuts the leaf
    keeps adding it (unscaled) while its identity shortcuts fade, and the deployed twin is the keep-projection twin."""
    torch.manual_seed(0)
    teacher = timm.create_model(arch, num_classes=3).eval()
    fading = timm.create_model(f'plain_{arch}', num_classes=3, shortcut_fade=True, keep_projection_shortcuts=True)
    twin = timm.create_model(f'plain_{arch}', num_classes=3, keep_projection_shortcuts=True).eval()
    assert fading.plain_report.kept_projections == twin.plain_report.kept_projections != []
    # each kept projection is still added (by the leaf it is handed to); the rest are removed, and counted so
    kept = count_shortcut_additions(twin)
    assert kept == len(twin.plain_report.kept_projections)
    assert fading.plain_report.shortcuts_removed == twin.plain_report.shortcuts_removed \
        == count_shortcut_additions(teacher) - kept
    load_teacher_weights(fading, teacher.state_dict())
    x = torch.randn(2, 3, 64, 64)
    fading.eval()
    assert torch.equal(fading(x), teacher(x))
    set_shortcut_scale(fading, 0.0)
    load_teacher_weights(twin, teacher.state_dict())
    assert torch.equal(fading(x), twin(x))
    deployed = deployable(fading).eval()
    twin.load_state_dict(deployed.state_dict())  # strict: the same modules, the projections included
    assert torch.equal(deployed(x), twin(x)) and count_shortcut_additions(deployed) == kept
    plain_all = timm.create_model(f'plain_{arch}', num_classes=3).eval()
    load_teacher_weights(plain_all, teacher.state_dict())
    assert not torch.allclose(deployed(x), plain_all(x))  # the kept projections do change the output

def test_finish_refuses_before_the_fade_ends_and_deployable_leaves_the_original():
    _, fading = _pair('resnet20_cifar')
    set_shortcut_scale(fading, 0.25)
    with pytest.raises(ValueError, match=r'scale s = 0.25.*force=True'):
        finish_fade(fading)
    with pytest.raises(ValueError, match='already plain or fading'):
        make_fading(fading)
    set_shortcut_scale(fading, 0.0)
    deployed = deployable(fading)
    assert is_fading(fading) and not is_fading(deployed)
    assert deployed.pretrained_model_args['shortcut_fade'] is False
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(deployed(x), fading(x))


def test_teacher_init_through_dirac_and_fade_is_the_teacher():
    teacher, _ = _pair('resnet20_cifar')
    fading = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True, dirac=True).eval()
    dropped = load_teacher_weights(fading, teacher)
    assert dropped == []  # nothing removed yet: every teacher tensor has its place
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fading(x), teacher(x), rtol=1e-4, atol=1e-4)
    set_shortcut_scale(fading, 0.0)
    deployed = deployable(fading)  # fade finished and Dirac folded
    assert not any('parametrizations' in k for k in deployed.state_dict())
    torch.testing.assert_close(deployed(x), fading(x), rtol=1e-5, atol=1e-5)


def test_dirac_started_as_its_plain_weight_is_the_teacher_exactly_and_learns_an_identity_scale():
    """dirac_init=(0, 1): the stored weight is the teacher's conv itself (no 10x rescaling as with DiracNets' (1, 0.1)),
    the fading twin is the teacher bit for bit, and the identity scales start at 0 with a gradient."""
    teacher, _ = _pair('resnet20_cifar')
    with torch.no_grad():  # a trained teacher's BN: no zero-initialised last gamma cutting the branch's gradient
        for module in teacher.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    fading = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True, dirac=True,
                               dirac_init=(0.0, 1.0))
    assert fading.pretrained_model_args['dirac_init'] == (0.0, 1.0)
    load_teacher_weights(fading, teacher)
    conv = fading.layer2[1].conv1
    assert torch.equal(conv.parametrizations.weight.original, teacher.layer2[1].conv1.weight)
    assert torch.equal(conv.weight, teacher.layer2[1].conv1.weight)
    x = torch.randn(4, 3, 32, 32)
    fading.eval()
    assert torch.equal(fading(x), teacher(x))
    fading.train()
    fading(x).logsumexp(1).sum().backward()
    alpha = conv.parametrizations.weight[0].alpha
    assert torch.all(alpha == 0) and alpha.grad.abs().sum() > 0
    with torch.no_grad():  # the identity scale learned something: the fold keeps it
        alpha.fill_(0.3)
    set_shortcut_scale(fading, 0.0)
    fading.eval()
    deployed = deployable(fading)
    torch.testing.assert_close(deployed(x), fading(x), rtol=1e-5, atol=1e-5)
    centre = deployed.layer2[1].conv1.weight[:, :, 1, 1]
    torch.testing.assert_close(centre.diagonal(), teacher.layer2[1].conv1.weight[:, :, 1, 1].diagonal() + 0.3)
    with pytest.raises(ValueError, match=r'dirac_init=\(0.0, 1.0\) sets the Dirac .* give dirac=True'):
        timm.create_model('plain_resnet20_cifar', dirac_init=(0.0, 1.0))
    with pytest.raises(ValueError, match='Dirac beta_init must not be 0'):
        timm.create_model('plain_resnet20_cifar', dirac=True, dirac_init=(1.0, 0.0))


def test_fade_schedule():
    assert fade_scale(0, 10) == 1.0
    assert fade_scale(5, 10) == pytest.approx(0.5)
    assert fade_scale(2.5, 10) == pytest.approx((1 + 2 ** -0.5) / 2)
    assert fade_scale(10, 10) == 0.0 and fade_scale(12, 10) == 0.0
    values = [fade_scale(e / 10, 10) for e in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize('fraction, steps, epochs', [(1.0, 4, 1), (0.8, 4, 1), (0.8, 63, 5), (0.5, 1, 2)])
def test_fade_always_ends_by_the_last_step(fraction, steps, epochs):
    """The last training step runs at s = 0 (the twin can be deployed), and s never rises."""
    fading = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True)
    student = FadingStudent(fading, fraction)
    scales = []
    for epoch in range(epochs):
        student.set_epoch(epoch, steps, epochs)
        for step in range(steps):
            student.step_in_epoch.fill_(step)
            scales.append(student.shortcut_scale)
    assert scales[0] == 1.0 and scales[-1] == 0.0
    assert all(a >= b for a, b in zip(scales, scales[1:]))
    if steps * epochs > 10:  # long runs: the fade ends where the fraction says, not earlier
        assert scales[int(fraction * steps * epochs) - 1] > 0.0


def test_jointrd_drives_the_scale_and_checks_its_student():
    teacher, fading = _pair('resnet20_cifar')
    with pytest.raises(ValueError, match='shortcut_fade is not set'):
        JointRD(fading, teacher)
    plain = timm.create_model('plain_resnet20_cifar', num_classes=10)
    with pytest.raises(ValueError, match='needs a fading student'):
        JointRD(plain, teacher, JointRDConfig(shortcut_fade=0.5))
    with pytest.raises(ValueError, match=r'shortcut_fade must be in \(0, 1\]'):
        JointRDConfig(shortcut_fade=1.5)
    model = JointRD(fading, teacher, JointRDConfig(shortcut_fade=0.5)).train()
    with pytest.raises(RuntimeError, match='run length'):
        model(torch.randn(2, 3, 32, 32))
    model.set_epoch(0, steps_per_epoch=4, num_epochs=2)  # fade over the first epoch
    scales = []
    for _ in range(4):
        model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))['loss'].backward()
        scales.append(shortcut_scale(fading))
    assert scales == pytest.approx([1.0, fade_scale(0.25, 1), fade_scale(0.5, 1), fade_scale(0.75, 1)])
    model.set_epoch(1, steps_per_epoch=4, num_epochs=2)
    assert shortcut_scale(fading) == 0.0 and model.shortcut_scale == 0.0


@pytest.mark.parametrize('method', ['jointrd', 'alone'])
def test_loading_a_checkpoint_restores_the_fade(method):
    """The shortcut scale is recomputed from the saved progress on load_state_dict (torchdistill's own -test_only
    reload does exactly that): a checkpoint saved after the fade evaluates as the twin, not as the residual net."""
    def build():
        teacher, fading = _pair('resnet20_cifar')
        if method == 'jointrd':
            return JointRD(fading, teacher, JointRDConfig(shortcut_fade=0.5)), fading
        return FadingStudent(fading, 0.5), fading
    trained, fading = build()
    trained.set_epoch(1, steps_per_epoch=4, num_epochs=2)  # past the fade: s = 0
    assert shortcut_scale(fading) == 0.0
    x = torch.randn(2, 3, 32, 32)
    expected = trained.eval()(x)
    fresh, fresh_fading = build()
    assert shortcut_scale(fresh_fading) == 1.0
    fresh.load_state_dict(trained.state_dict())
    assert shortcut_scale(fresh_fading) == 0.0
    assert torch.equal(fresh.eval()(x), expected)
    deployable(fresh_fading)  # s = 0: the shortcuts can be removed


def test_fading_student_drives_the_scale():
    _, fading = _pair('resnet20_cifar')
    with pytest.raises(ValueError, match='no fading shortcuts'):
        FadingStudent(timm.create_model('plain_resnet20_cifar'), 0.5)
    model = FadingStudent(fading, 1.0).train()
    model.set_epoch(1, steps_per_epoch=2, num_epochs=4)
    # fraction 1.0 of 4 epochs, capped so that the last step (progress 3.5) runs at s = 0
    assert shortcut_scale(fading) == pytest.approx(fade_scale(1, 3.5))
    model(torch.randn(2, 3, 32, 32))
    model(torch.randn(2, 3, 32, 32))
    assert shortcut_scale(fading) == pytest.approx(fade_scale(1.5, 3.5))


@pytest.mark.parametrize('method', ['jointrd', 'ce'])
def test_runner_fades_then_deploys_the_plain_twin(tmp_path, method):
    """Through the runner: the scale is logged per epoch and reaches 0, the deployed (fade finished) accuracy equals
    the last-epoch one, and the saved model is the plain twin's (loads strictly into plain_resnet20_cifar)."""
    from jointrd_timm.training.checkpoint import load_weights
    if method == 'jointrd':
        overrides = ['models.model.kwargs.student.shortcut_fade=true', 'models.model.kwargs.jointrd.shortcut_fade=0.5',
                     'models.model.kwargs.init_student_from_teacher=true']
    else:
        overrides = ['models.model.key=fading_model', 'models.model.kwargs={student: {model_name: '
                     'plain_resnet20_cifar, num_classes: 10, in_chans: 1}, shortcut_fade: 0.5}',
                     'train.pre_epoch_process=jointrd_pre_epoch_process']
    if method == 'ce':
        overrides.append('runner.recalibrate_bn=0')
    config = load_config(tiny_yaml(tmp_path, method=method, epochs=2, limit=64), overrides)
    final = train(config, output_dir=str(tmp_path / 'run'), device='cpu')
    records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['shortcut_scale'] for r in records] == [0.0, 0.0]  # faded within the first of 2 epochs
    saved = json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())
    assert saved['architecture'] == 'plain_resnet20_cifar' and saved['model_args']['shortcut_fade'] is False
    twin = load_weights(timm.create_model('plain_resnet20_cifar', num_classes=10, in_chans=1),
                        tmp_path / 'run' / 'model')
    assert count_shortcut_additions(twin) == 0
    if method == 'ce':  # recalibration off: the deployed twin is the model as trained
        assert final['test_acc_folded'] == final['test_acc'] and 'bn_recalibrated_batches' not in final
        return
    # the deployed twin's BN statistics were recomputed on the training data (64 images, 4 batches of 16): the
    # stem's running mean is the channel mean of the stem conv's outputs over all of them, not a moving average
    assert final['bn_recalibrated_batches'] == 4
    images = torch.stack([x for x, _ in config['datasets']['digits/train']])
    with torch.no_grad():
        stem = twin.conv1(images)
    assert torch.allclose(twin.bn1.running_mean, stem.mean((0, 2, 3)), atol=1e-5)
    checkpoint = load_file(str(tmp_path / 'run' / 'last.safetensors'))
    trained_mean = next(v for k, v in checkpoint.items() if k.endswith('student.bn1.running_mean'))
    assert not torch.allclose(trained_mean, twin.bn1.running_mean, atol=1e-5)  # the moving average was replaced


def _block_scales(model):
    return [float(getattr(m, SCALE)) for m in model.modules() if isinstance(m, FadingGraphBlock)]


def test_staggered_fade_block_scales():
    # window 1: every block follows the run's scale
    assert block_scales(0.3, 4) == [0.3] * 4
    # window 0.5 over 3 blocks: block i fades while t = 1 - s runs over [0.25 i, 0.25 i + 0.5]
    assert block_scales(1.0, 3, 0.5) == [1.0, 1.0, 1.0]
    assert block_scales(0.75, 3, 0.5) == pytest.approx([0.5, 1.0, 1.0])
    assert block_scales(0.5, 3, 0.5) == pytest.approx([0.0, 0.5, 1.0])
    assert block_scales(0.0, 3, 0.5) == [0.0, 0.0, 0.0]
    for value in (0.1, 0.4, 0.9):  # first block first
        scales = block_scales(value, 9, 0.3)
        assert scales == sorted(scales) and scales[0] < value < scales[-1]
    with pytest.raises(ValueError, match=r'fade window must be in \(0, 1\]'):
        block_scales(0.5, 3, 0.0)
    with pytest.raises(ValueError, match='shortcut_fade_window must be in'):
        JointRDConfig(shortcut_fade=0.5, shortcut_fade_window=1.5)


def test_deep_first_fade_is_the_shallow_first_fade_reversed():
    # window 0.5 over 3 blocks, deep first: the last block fades while t runs over [0, 0.5], the first over [0.5, 1]
    assert block_scales(0.75, 3, 0.5, 'deep_first') == pytest.approx([1.0, 1.0, 0.5])
    assert block_scales(0.5, 3, 0.5, 'deep_first') == pytest.approx([1.0, 0.5, 0.0])
    assert block_scales(0.0, 3, 0.5, 'deep_first') == [0.0, 0.0, 0.0]
    assert block_scales(1.0, 3, 0.5, 'deep_first') == [1.0, 1.0, 1.0]
    for value in (0.1, 0.4, 0.9):
        shallow, deep = block_scales(value, 9, 0.3), block_scales(value, 9, 0.3, 'deep_first')
        assert deep == shallow[::-1] and deep == sorted(deep, reverse=True)
    assert block_scales(0.3, 4, 1.0, 'deep_first') == [0.3] * 4  # one shared fade has no order
    for bad in ('deep', None, 'DEEP_FIRST'):
        with pytest.raises(ValueError, match="shortcut_fade_order must be one of .*'deep_first'"):
            block_scales(0.5, 3, 0.5, bad)
        with pytest.raises(ValueError, match='shortcut_fade_order must be one of'):
            JointRDConfig(shortcut_fade_order=bad)  # checked even without a fade


def test_deep_first_fade_reaches_the_blocks_from_every_entry_point():
    """JointRD, fading_model and a recipe all fade the head's blocks first when asked, and end at s = 0."""
    from jointrd_timm.integrations.torchdistill import fading_model
    from jointrd_timm.recipes import DEFAULT_RECIPE
    teacher, fading = _pair('resnet20_cifar')
    model = JointRD(fading, teacher, JointRDConfig(shortcut_fade=1.0, shortcut_fade_window=0.3,
                                                    shortcut_fade_order='deep_first')).train()
    model.set_epoch(0, steps_per_epoch=4, num_epochs=2)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for _ in range(2):
        model(x, y)
    early = _block_scales(fading)
    assert early[-1] < 1.0 and early[0] == 1.0 and early == sorted(early, reverse=True)
    model.set_epoch(1, steps_per_epoch=4, num_epochs=2)
    for _ in range(4):
        model(x, y)
    assert _block_scales(fading) == [0.0] * 9
    alone = fading_model(dict(model_name='plain_resnet20_cifar', num_classes=10), 0.5, shortcut_fade_window=0.25,
                         shortcut_fade_order='deep_first')
    alone.set_epoch(0, steps_per_epoch=10, num_epochs=2)
    for _ in range(5):
        alone.train()(torch.randn(2, 3, 32, 32))
    scales = _block_scales(alone.student)
    assert scales[-1] < scales[0] == 1.0
    recipe = DEFAULT_RECIPE.replace(shortcut_fade_window=0.5, shortcut_fade_order='deep_first')
    assert recipe.id.endswith('shortcut_fade_order=deep_first,shortcut_fade_window=0.5')
    assert recipe.jointrd_config().fade.order == 'deep_first'
    assert recipe.fade_fields()['shortcut_fade_order'] == 'deep_first'
    assert 'shortcut_fade_order' not in DEFAULT_RECIPE.fade_fields()  # the default is not written out
    with pytest.raises(ValueError, match='shortcut_fade_order must be one of'):
        DEFAULT_RECIPE.replace(shortcut_fade_order='backwards')


def test_staggered_fade_sets_each_block_and_deploys_only_at_the_end():
    teacher, fading = _pair('resnet20_cifar')
    set_shortcut_scale(fading, block_scales(0.5, 9, 0.2))
    scales = _block_scales(fading)
    assert len(scales) == 9 and scales[0] == 0.0 and scales[-1] == 1.0 and scales == sorted(scales)
    assert shortcut_scale(fading) == pytest.approx(sum(scales) / 9)
    # one block still has its shortcut: finishing the fade would change the outputs
    set_shortcut_scale(fading, block_scales(0.01, 9, 0.2))
    assert max(_block_scales(fading)) > 0
    with pytest.raises(ValueError, match='have not faded out'):
        finish_fade(fading)
    # staggered through JointRD: the first blocks fade before the last ones, and the run still ends at s = 0
    model = JointRD(fading, teacher, JointRDConfig(shortcut_fade=1.0, shortcut_fade_window=0.3)).train()
    model.set_epoch(0, steps_per_epoch=4, num_epochs=2)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    model(x, y)
    model(x, y)
    early = _block_scales(fading)
    assert early[0] < 1.0 and early[-1] == 1.0
    model.set_epoch(1, steps_per_epoch=4, num_epochs=2)
    for _ in range(4):
        model(x, y)
    assert _block_scales(fading) == [0.0] * 9
    deployed = deployable(fading).eval()
    assert torch.equal(deployed(x), fading.eval()(x))


def test_fading_model_passes_the_window(tmp_path):
    from jointrd_timm.integrations.torchdistill import fading_model
    model = fading_model(dict(model_name='plain_resnet20_cifar', num_classes=10), 0.5, shortcut_fade_window=0.25)
    assert model.window == 0.25
    model.set_epoch(0, steps_per_epoch=10, num_epochs=2)
    model.train()(torch.randn(2, 3, 32, 32))
    for _ in range(4):
        model(torch.randn(2, 3, 32, 32))
    scales = _block_scales(model.student)
    assert scales[0] < scales[-1] == 1.0
    with pytest.raises(ValueError, match='fade window'):
        fading_model(dict(model_name='plain_resnet20_cifar', num_classes=10), 0.5, shortcut_fade_window=2)


def test_fade_power_matches_shortcut_path_weights_across_depth():
    # power 0.5: s is the square root of the cosine fade, still 1 at the start and 0 from the horizon on
    assert fade_scale(0, 10, 0.5) == 1.0 and fade_scale(10, 10, 0.5) == 0.0
    assert fade_scale(5, 10, 0.5) == pytest.approx(0.5 ** 0.5)
    for progress in (1.0, 2.5, 7.5, 9.9):
        # 18 blocks per stage at power 0.5 carry a stage's shortcut path with the weight 9 blocks have at power 1
        assert fade_scale(progress, 10, 0.5) ** 18 == pytest.approx(fade_scale(progress, 10) ** 9)
        assert fade_scale(progress, 10, 0.5) > fade_scale(progress, 10) > fade_scale(progress, 10, 2.0)
    for bad in (0, -1.0, float('nan'), float('inf'), '0.5', True):
        with pytest.raises(ValueError, match='shortcut_fade_power must be a finite number > 0'):
            fade_scale(1, 10, bad)
    with pytest.raises(ValueError, match='shortcut_fade_power must be'):
        JointRDConfig(shortcut_fade=0.5, shortcut_fade_power=0.0)


def test_fade_power_drives_jointrd_and_the_fading_model():
    from jointrd_timm.integrations.torchdistill import fading_model
    teacher, fading = _pair('resnet20_cifar')
    model = JointRD(fading, teacher, JointRDConfig(shortcut_fade=1.0, shortcut_fade_power=0.5)).train()
    model.set_epoch(0, steps_per_epoch=4, num_epochs=2)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    seen = []
    for _ in range(8):
        model(x, y)
        seen.append(shortcut_scale(fading))
        if len(seen) == 4:
            model.set_epoch(1, steps_per_epoch=4, num_epochs=2)
    # horizon capped at the last step (1.75 epochs): after step k (progress k / 4) s = cosine(k / 7) ** 0.5
    expected = [fade_scale(k / 4, 1.75) ** 0.5 for k in range(8)]
    assert seen == pytest.approx(expected) and seen[-1] == 0.0
    assert 0.5 ** 0.5 < seen[3] < 1.0
    alone = fading_model(dict(model_name='plain_resnet20_cifar', num_classes=10), 1.0, shortcut_fade_power=0.5)
    alone.set_epoch(0, steps_per_epoch=4, num_epochs=2)
    alone.train()(x)
    alone(x)
    assert alone.power == 0.5 and shortcut_scale(alone.student) == pytest.approx(fade_scale(0.25, 1.75) ** 0.5)
    with pytest.raises(ValueError, match='shortcut_fade_power'):
        fading_model(dict(model_name='plain_resnet20_cifar', num_classes=10), 0.5, shortcut_fade_power=-2)


def test_shortcut_fade_carries_its_fields_checked_in_one_place():
    """ShortcutFade is the one object for the flat shortcut_fade* fields: JointRDConfig.fade, FadingStudent and
    fading_model build the same one, and a mistyped field fails from each entry point with the same message."""
    from dataclasses import FrozenInstanceError
    from jointrd_timm.integrations.torchdistill import fading_model
    from jointrd_timm.methods.fading import ShortcutFade
    fade = ShortcutFade(0.5, 0.25, 0.5, 'share', 'deep_first')
    config = JointRDConfig(shortcut_fade=0.5, shortcut_fade_window=0.25, shortcut_fade_power=0.5,
                           shortcut_fade_mode='share', shortcut_fade_order='deep_first')
    assert config.fade == fade and JointRDConfig().fade is None
    assert ShortcutFade(1) == ShortcutFade(1.0) and isinstance(ShortcutFade(1).fraction, float)
    with pytest.raises(FrozenInstanceError):
        fade.window = 1.0
    # the other fields are checked even without a fade
    with pytest.raises(ValueError, match='shortcut_fade_window must be in'):
        JointRDConfig(shortcut_fade_window=0)
    for bad in (0, 1.5, True, '0.5'):
        with pytest.raises(ValueError, match=r'shortcut_fade must be in \(0, 1\]'):
            ShortcutFade(bad)
    _, fading = _pair('resnet20_cifar')
    alone = FadingStudent(fading, ShortcutFade(0.5, 0.25))
    assert (alone.fraction, alone.window, alone.power) == (0.5, 0.25, 1.0)
    assert (alone.fade.mode, alone.fade.order) == ('scale', 'shallow_first')
    with pytest.raises(ValueError, match='inside the ShortcutFade'):
        FadingStudent(fading, ShortcutFade(0.5), order='deep_first')
    with pytest.raises(ValueError, match='inside the ShortcutFade'):
        FadingStudent(fading, ShortcutFade(0.5), window=0.25)
    built = fading_model(dict(model_name='plain_resnet20_cifar', num_classes=10), 0.5, shortcut_fade_window=0.25,
                         shortcut_fade_power=0.5, shortcut_fade_mode='share', shortcut_fade_order='deep_first')
    assert built.fade == fade


def test_an_addition_whose_operand_is_an_earlier_shortcut_addition_fades_and_finishes():
    """NASNet's stem cell adds ``x_comb_iter_1`` (itself a shortcut addition) into ``x_comb_iter_3``: rewriting the
    first must not leave the second pointing at the erased node."""
    from timm.models.nasnet import CellStem0
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(CellStem0(stem_size=8, num_channels=4)).eval()
    x = torch.randn(2, 8, 16, 16)
    expected = teacher(x)
    fading = make_fading(copy.deepcopy(teacher)).eval()
    assert fading.plain_report.shortcuts_removed == count_shortcut_additions(teacher) >= 5
    assert torch.equal(fading(x), expected)
    set_shortcut_scale(fading, 0.0)
    plain = make_plain(copy.deepcopy(teacher)).eval()
    torch.testing.assert_close(fading(x), plain(x), rtol=0, atol=0)
    finish_fade(fading)
    assert count_shortcut_additions(fading) == 0
    assert torch.equal(fading(x), plain(x))


def _nf_teacher(skipinit: bool):
    """A small NF-Net (timm's test_nfnet cfg; alpha 0.2, beta < 1 after the first block), with biases, gains and,
    with ``skipinit``, the in-place ``out.mul_(self.skipinit_gain)`` all away from their start values, so that a
    twin that dropped or kept the wrong factor gives different outputs."""
    from dataclasses import replace
    from timm.models.nfnet import NormFreeNet, model_cfgs
    torch.manual_seed(0)
    teacher = NormFreeNet(replace(model_cfgs['test_nfnet'], skipinit=skipinit), num_classes=10)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith('bias') or name.endswith('skipinit_gain'):
                p.normal_(0.3, 0.2)
    return teacher.eval()


@pytest.mark.parametrize('skipinit', [False, True])
def test_a_norm_free_twin_fades_its_blocks_scales_with_the_shortcuts(skipinit):
    """The NF block's plain twin drops alpha and beta (families/nfnet.py): the fading twin is the teacher at s = 1,
    the plain twin at s = 0 (so what trained is what deploys and reloads), and the skip-init gain applied in place
    stays in both."""
    teacher = _nf_teacher(skipinit)
    assert any(b.alpha != 1 for b in teacher.modules() if hasattr(b, 'alpha'))
    x = torch.randn(2, 3, 32, 32)
    fading = make_fading(copy.deepcopy(teacher)).eval()
    fading.load_state_dict(teacher.state_dict())
    assert torch.equal(fading(x), teacher(x))
    plain = make_plain(copy.deepcopy(teacher)).eval()
    plain.load_state_dict(teacher.state_dict(), strict=False)  # the projections are gone
    set_shortcut_scale(fading, 0.5)
    halfway = fading(x)
    assert not torch.allclose(halfway, plain(x)) and not torch.allclose(halfway, teacher(x))
    set_shortcut_scale(fading, 0.0)
    assert torch.equal(fading(x), plain(x))
    deployed = deployable(fading)
    assert torch.equal(deployed(x), plain(x))
    assert deployed.state_dict().keys() == plain.state_dict().keys()
    if skipinit:
        gains = [k for k in deployed.state_dict() if k.endswith('skipinit_gain')]
        assert gains and all(float(deployed.get_parameter(k)) != 1.0 for k in gains)


def test_an_in_place_factor_whose_result_is_unused_survives_the_block_rewrite():
    """torch.fx records ``out.mul_(g)`` as a call nothing depends on; the traced block keeps it (as ``out.mul(g)``
    read by the later uses of ``out``) through dead-code elimination."""
    from jointrd_timm.twins.verify import trace_block

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.gain = torch.nn.Parameter(torch.tensor(0.25))

        def forward(self, x):
            out = self.conv(x)
            out.mul_(self.gain)
            out.clamp_(min=-0.1)
            return out + x

    block = Block().eval()
    graph, _ = trace_block(block)
    module = torch.fx.GraphModule(block, graph)
    module.graph.eliminate_dead_code()
    module.recompile()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(module(x), block(x))
    assert not torch.equal(module(x), block.conv(x) + x)


def _block_classes(model):
    return [type(m).__mro__[1].__name__ for m in model.modules() if isinstance(m, torch.fx.GraphModule)]


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize('arch', ['dla46_c', 'mobilenetv3_small_050'])
def test_a_twin_saved_whole_keeps_its_block_classes_and_still_fades(arch):
    """torch.fx unpickles a GraphModule as a bare one traced again from its code: its class lost (so the fade and
    deployable no longer found the blocks) and a Python branch on an argument fixed one way (DLA's blocks, which
    fall back to their own input when no shortcut is handed to them, then failed). A twin saved whole (torch.save,
    pickle, a spawned process) keeps its classes, fades and deploys as before."""
    teacher, fading = _pair(arch)
    load_teacher_weights(fading, teacher.state_dict())
    set_shortcut_scale(fading, 0.25)
    loaded = _saved_and_loaded(fading).eval()
    x = torch.randn(2, 3, 64, 64)
    assert _block_classes(loaded) == _block_classes(fading) and any('FadingGraph' in c for c in _block_classes(fading))
    assert is_fading(loaded) and shortcut_scale(loaded) == 0.25
    assert torch.equal(loaded(x), fading(x))
    for model in (loaded, fading):
        set_shortcut_scale(model, 0.0)
    assert torch.equal(loaded(x), fading(x))
    deployed, expected = deployable(loaded), deployable(fading)
    assert deployed.state_dict().keys() == expected.state_dict().keys() and torch.equal(deployed(x), expected(x))
    plain = pickle.loads(pickle.dumps(expected))
    assert _block_classes(plain) == _block_classes(expected) and torch.equal(plain(x), expected(x))
    assert count_shortcut_additions(plain) == 0


def test_a_saved_norm_free_twin_keeps_fading_its_blocks_scales():
    """The NF block's dropped alpha / beta fade through ``faded_scale``; a twin saved whole keeps that one call
    (traced again, it would have been spelled out in arithmetic that nothing recognises) and its outputs."""
    from jointrd_timm.twins.fade import faded_scale
    fading = make_fading(copy.deepcopy(_nf_teacher(False))).eval()
    set_shortcut_scale(fading, 0.5)
    loaded = _saved_and_loaded(fading).eval()
    calls = [n for m in loaded.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
             if n.op == 'call_function' and n.target is faded_scale]
    assert calls and len(calls) == sum(1 for m in fading.modules() if isinstance(m, torch.fx.GraphModule)
                                       for n in m.graph.nodes if n.target is faded_scale)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), fading(x))
    set_shortcut_scale(loaded, 0.0)
    set_shortcut_scale(fading, 0.0)
    assert torch.equal(deployable(loaded)(x), deployable(fading)(x))


def _count_call(module, args, output):
    module.jointrd_test_calls = getattr(module, 'jointrd_test_calls', 0) + 1


@pytest.mark.parametrize('fade', [False, True])
def test_a_saved_twin_keeps_its_block_hooks_mode_and_hooked_features(fade):
    """timm's hook-based feature net: deriving its twin used to trace the FeatureHookNet's own forward, which left a
    Proxy in the hooks' outputs (the model would not pickle). A block's own hooks and eval mode stay through
    pickling (torch.fx would rebuild it in train mode, without hooks)."""
    torch.manual_seed(0)
    features = timm.create_model('plain_dla46_c', features_only=True, feature_cls='hook', out_indices=(1, 3),
                                 shortcut_fade=fade).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = features(x)
    loaded = pickle.loads(pickle.dumps(features))
    assert len(loaded(x)) == 2 and all(torch.equal(a, b) for a, b in zip(loaded(x), expected))
    blocks = [m for m in features.modules() if isinstance(m, torch.fx.GraphModule)]
    assert len(blocks) == (12 if fade else 0)
    if fade:
        blocks[0].register_forward_hook(_count_call)
        loaded = _saved_and_loaded(features)
        block = next(m for m in loaded.modules() if isinstance(m, torch.fx.GraphModule))
        assert not any(m.training for m in loaded.modules())
        loaded(x)
        assert block.jointrd_test_calls == 1


@pytest.mark.parametrize('arch', ['resnet20_cifar', 'regnetx_002'])
def test_a_fading_twin_counts_its_scaled_shortcuts_until_the_fade_is_finished(arch):
    import timm
    from jointrd_timm import count_shortcut_additions
    from jointrd_timm.twins.fade import deployable, set_shortcut_scale
    residual = count_shortcut_additions(timm.create_model(arch))
    twin = timm.create_model(f'plain_{arch}', shortcut_fade=True)
    assert residual > 0 and count_shortcut_additions(twin) == residual  # s = 1: the teacher's additions
    set_shortcut_scale(twin, 0.0)
    assert count_shortcut_additions(twin) == residual  # still computed (times 0) until finish_fade
    assert count_shortcut_additions(deployable(twin)) == 0
    assert count_shortcut_additions(timm.create_model(f'plain_{arch}')) == 0
    # keeping the projection shortcuts: the fading blocks count them too, the deployed twin keeps only them
    from jointrd_timm.twins.fade import make_fading
    kept = make_fading(timm.create_model(arch), keep_projection_shortcuts=True)
    set_shortcut_scale(kept, 0.0)
    left = count_shortcut_additions(deployable(kept))
    assert 0 < left < residual and count_shortcut_additions(kept) == residual
