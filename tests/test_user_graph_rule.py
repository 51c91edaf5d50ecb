"""Twins of models built from a user's own residual block classes: register_graph_rule / check_graph_rule."""
import copy
import importlib

import pytest
import torch
from torch import nn

import jointrd_timm
from jointrd_timm import check_graph_rule, count_shortcut_additions, deployable, make_plain, register_graph_rule
from jointrd_timm.twins.fade import make_fading, set_shortcut_scale
from jointrd_timm.twins import UnfaithfulTraceError, UnsupportedBlockError


@pytest.fixture(autouse=True)
def _rules_as_they_were():
    """Each test registers the classes it needs; the global rule registry is restored after it."""
    rules = importlib.import_module('jointrd_timm.twins.rules')  # the module (jointrd_timm.twins.rules is a function)
    verify = importlib.import_module('jointrd_timm.twins.verify')
    saved, names = dict(rules._RULES), dict(verify._CLASS_SHORTCUT_NAMES)
    yield
    rules._RULES.clear()
    rules._RULES.update(saved)
    verify._CLASS_SHORTCUT_NAMES.clear()
    verify._CLASS_SHORTCUT_NAMES.update(names)


def _net(block_class, width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), block_class(width, width), block_class(width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 5))


class _Block(nn.Module):
    """x + branch(x), a 1x1 projection where the width changes (no trailing activation, so the plain block's
    output is exactly the residual block's output less its shortcut)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return shortcut + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_own_block_is_refused_until_registered_then_its_twin_is_the_branch():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(UnsupportedBlockError, match=r'register_graph_rule\(TheClass\)'):
        make_plain(_net(_Block))
    assert register_graph_rule(_Block) is _Block  # usable as a class decorator
    teacher = _net(_Block).eval()
    assert check_graph_rule(teacher, x) == {f'{__name__}._Block': 2}
    with pytest.raises(ValueError, match='no block whose class has a graph rule'):  # derived blocks are not checked
        check_graph_rule(make_fading(copy.deepcopy(teacher)), x)
    twin = make_plain(copy.deepcopy(teacher)).eval()
    assert count_shortcut_additions(twin) == 0
    names = {n for n, _ in twin.named_parameters()}
    assert names == {n for n, _ in teacher.named_parameters() if '.proj.' not in n}  # same names, projection gone
    with torch.no_grad():
        h = teacher[0](x)
        for i in (1, 2):  # each plain block computes its teacher block's branch exactly
            expected = teacher[i](h) - (h if teacher[i].proj is None else teacher[i].proj(h))
            torch.testing.assert_close(twin[i](h), expected)
            h = teacher[i](h)
    trained = copy.deepcopy(twin).train()
    trained(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())
    fading = make_fading(copy.deepcopy(teacher)).eval()  # the recipe's fade works on the user's blocks too
    with torch.no_grad():
        set_shortcut_scale(fading, 1.0)
        torch.testing.assert_close(fading(x), teacher(x))
        set_shortcut_scale(fading, 0.0)
        torch.testing.assert_close(fading(x), twin(x))
        deployed = deployable(fading)
        assert count_shortcut_additions(deployed) == 0
        torch.testing.assert_close(deployed(x), twin(x))
    with pytest.raises(ValueError, match='already registered'):
        register_graph_rule(_Block)


class _DataDependent(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        if x.mean() > 0:  # torch.fx cannot follow a branch on the input's values
            return self.proj(x) + self.conv(x)
        return self.proj(x) - self.conv(x)


class _TracesDifferently(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        scale = 2.0 if torch.fx._symbolic_trace.is_fx_tracing() else 1.0  # the trace bakes in one branch
        return self.proj(x) + scale * self.conv(x)


class _InPlace(nn.Module):
    """Changes its input in place before adding it (the check must run block and trace on copies of the input)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        x = x.mul_(2.0)
        return self.proj(x) + self.conv2(torch.relu(self.conv1(x)))


def test_check_graph_rule_passes_a_block_that_changes_its_input_in_place():
    register_graph_rule(_InPlace)
    assert check_graph_rule(_net(_InPlace), torch.randn(2, 3, 8, 8)) == {f'{__name__}._InPlace': 2}


class _EqualDepth(nn.Module):
    """proj(x) + body(x): two submodule calls, as deep as each other; only the name says which is the shortcut."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.proj(x) + self.body(x)


class _Conditional(_Block):
    """A shortcut only where the width stays (MobileNetV2's inverted residuals): the other blocks add nothing."""

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return out if self.proj is not None else x + out


def test_a_class_whose_blocks_have_a_shortcut_only_sometimes_is_checked_and_derived():
    register_graph_rule(_Conditional)
    teacher = _net(_Conditional).eval()  # one block that adds its input, one that changes width and adds nothing
    assert check_graph_rule(teacher, torch.randn(2, 3, 8, 8)) == {f'{__name__}._Conditional': 2}
    twin = make_plain(copy.deepcopy(teacher))
    assert twin.plain_report.shortcuts_removed == 1 and count_shortcut_additions(twin) == 0


def test_a_shortcut_named_at_registration_is_cut_where_both_operands_are_equally_deep():
    register_graph_rule(_EqualDepth, shortcut_names=('proj',))
    teacher = _net(_EqualDepth).eval()
    assert check_graph_rule(teacher, torch.randn(2, 3, 8, 8)) == {f'{__name__}._EqualDepth': 2}
    twin = make_plain(copy.deepcopy(teacher)).eval()
    assert count_shortcut_additions(teacher) == 2 and count_shortcut_additions(twin) == 0
    assert not any('.proj.' in n for n, _ in twin.named_parameters())
    x = torch.randn(2, 8, 8, 8)  # the second block alone: its twin is its body
    assert torch.allclose(twin[2](x), teacher[2].body(x))
    # a refused registration changes nothing: neither the names of a registered class nor the registry
    with pytest.raises(ValueError, match='already registered'):
        register_graph_rule(_EqualDepth, shortcut_names=('body',))
    assert count_shortcut_additions(make_plain(copy.deepcopy(teacher))) == 0
    assert not any('.proj.' in n for n, _ in make_plain(copy.deepcopy(teacher)).named_parameters())
    with pytest.raises(ValueError, match='attribute names of submodules'):
        register_graph_rule(_Block, shortcut_names=('not a name',))
    assert register_graph_rule(_Block) is _Block  # _Block was not registered by the refused call


class _NoShortcut(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + 1.0


@pytest.mark.parametrize('block_class, message', [
    (_DataDependent, r'`1` \(.*_DataDependent\): .*cannot be traced'),
    (_TracesDifferently, r'`1` \(.*_TracesDifferently\): .*computes something else'),
    (_NoShortcut, r'_NoShortcut: the graph rule finds no shortcut addition in the forward of any of its 2 block'),
    (_EqualDepth, r"`1` \(.*_EqualDepth\): .*finds no shortcut among them.*shortcut_names=\('proj',\)\)\. If "
                  r'neither is .*the graph rule does not fit the class'),
])
def test_check_graph_rule_names_the_block_whose_class_cannot_take_the_rule(block_class, message):
    register_graph_rule(block_class)
    model = _net(block_class)
    with pytest.raises(UnfaithfulTraceError, match=message):
        check_graph_rule(model, torch.randn(2, 3, 8, 8))
    assert model.training  # left in the mode it was given in


class _Regularised(_Block):
    """With dropout in its branch: checked in eval mode, whatever mode the model is in."""

    def __init__(self, cin, cout):
        super().__init__(cin, cout)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return shortcut + self.drop(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def test_check_graph_rule_runs_in_eval_mode_and_leaves_the_model_as_it_was():
    register_graph_rule(_Regularised)
    model = _net(_Regularised).train()
    before = copy.deepcopy(model.state_dict())
    assert check_graph_rule(model, torch.randn(2, 3, 8, 8)) == {f'{__name__}._Regularised': 2}
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_check_graph_rule_refuses_an_input_that_reaches_no_registered_block():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block = nn.Conv2d(3, 8, 1), _Block(8, 8)

        def forward(self, x, use_block: bool = False):
            x = self.stem(x)
            return self.block(x) if use_block else x

    register_graph_rule(_Block)
    with pytest.raises(ValueError, match='None of the 1 block'):
        check_graph_rule(Gated(), torch.randn(1, 3, 4, 4))
    assert check_graph_rule(Gated(), torch.randn(1, 3, 4, 4), use_block=True) == {f'{__name__}._Block': 1}


def test_register_and_check_refuse_what_they_cannot_use():
    with pytest.raises(TypeError, match='nn.Module subclass'):
        register_graph_rule(_Block(3, 3))
    with pytest.raises(ValueError, match='no block whose class has a graph rule'):
        check_graph_rule(nn.Sequential(nn.Conv2d(3, 3, 1)), torch.randn(1, 3, 4, 4))
    assert jointrd_timm.register_graph_rule is register_graph_rule


class _UserNet(nn.Module):
    """A user's own residual network following timm's model interface (what JointRD's stage split reads)."""

    def __init__(self, interface=True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(_Block(8, 8), _Block(8, 8))
        self.stage2 = nn.Sequential(_Block(8, 16), _Block(16, 16))
        self.pool, self.fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(16, 5)
        if interface:
            self.feature_info = [dict(module='stage1', num_chs=8, reduction=1),
                                 dict(module='stage2', num_chs=16, reduction=1)]

    def forward_features(self, x):
        return self.stage2(self.stage1(self.stem(x)))

    def forward_head(self, x, pre_logits: bool = False):
        x = self.pool(x)
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize('interface', [True, False], ids=['feature_info', 'bare'])
def test_jointrd_trains_the_twin_of_a_users_own_model(interface):
    """With timm's interface the stages are feature_info's; without it, this net's feature maps keep one size (no
    reduction to cut at), so the split cuts where its containers of blocks end: the same two stages."""
    from jointrd_timm.methods import JointRD
    from jointrd_timm.recipes import DEFAULT_RECIPE
    register_graph_rule(_Block)
    torch.manual_seed(0)
    teacher = _UserNet(interface)
    pair = JointRD(make_fading(copy.deepcopy(teacher)), teacher, DEFAULT_RECIPE.jointrd_config(), num_epochs=1,
                   steps_per_epoch=2)
    assert pair.num_stages == 2 and pair.teacher_stages.stage_channels == [8, 16]
    assert pair.student_stages.boundaries == pair.teacher_stages.boundaries == (
        ['stage1', 'stage2'] if interface else ['stage1.1', 'stage2.1'])
    optimizer = torch.optim.SGD([p for p in pair.parameters() if p.requires_grad], lr=0.01)
    before = copy.deepcopy(pair.student.state_dict())
    pair.train()
    for _ in range(2):
        loss = pair(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))['loss']
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before['stage2.1.conv2.weight'], pair.student.state_dict()['stage2.1.conv2.weight'])
    assert not torch.equal(before['stage1.0.conv1.weight'], pair.student.state_dict()['stage1.0.conv1.weight'])
    deployed = deployable(pair.student).eval()
    x = torch.randn(2, 3, 8, 8)
    assert count_shortcut_additions(deployed) == 0
    set_shortcut_scale(pair.student, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), pair.student.eval()(x))


class _TwoBranches(nn.Module):
    """x + b1(x) + b2(x): one shortcut and two branches (the sum of the first addition is not the next
    sub-block's input, since b2 does not read it)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.b1 = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))
        self.b2 = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.b1(x) + self.b2(x)


class _Chained(nn.Module):
    """Two residual sub-blocks in one forward (MetaFormer's mixer, then its MLP): two shortcuts."""

    def __init__(self, cin, cout):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout))
        self.g = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout))

    def forward(self, x):
        x = x + self.f(x)
        return x + self.g(x)


def test_parallel_branches_stay_and_chained_sub_blocks_lose_both_shortcuts():
    register_graph_rule(_TwoBranches)
    register_graph_rule(_Chained)
    torch.manual_seed(0)
    parallel, chained = _TwoBranches(4, 4).eval(), _Chained(4, 4).eval()
    x = torch.randn(2, 4, 6, 6)
    assert count_shortcut_additions(parallel) == 1 and count_shortcut_additions(chained) == 2
    plain_parallel = make_plain(nn.Sequential(copy.deepcopy(parallel))).eval()[0]
    plain_chained = make_plain(nn.Sequential(copy.deepcopy(chained))).eval()[0]
    with torch.no_grad():
        torch.testing.assert_close(plain_parallel(x), parallel.b1(x) + parallel.b2(x))  # b1 kept (it was cut)
        torch.testing.assert_close(plain_chained(x), chained.g(chained.f(x)))


class DropPath(nn.Module):
    """A user's own stochastic depth (timm's name, not timm's class): drops the branch of random samples in
    training."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1) > self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class _DeepRegularised(nn.Module):
    """x + branch(x), the stochastic depth at the end of the branch's nn.Sequential, not a child of the block."""

    def __init__(self, cin, cout):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), DropPath(0.5))
        self.proj = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        return (x if self.proj is None else self.proj(x)) + self.branch(x)


@pytest.mark.parametrize('derive', [make_plain, make_fading])
def test_a_twin_keeps_no_stochastic_depth_nested_in_a_users_block(derive):
    """In a twin a dropped branch is the sample's whole signal: stochastic depth is removed wherever it sits in the
    block, so the twin trains on every sample (two train-mode forwards agree)."""
    register_graph_rule(_DeepRegularised)
    teacher = _net(_DeepRegularised)
    twin = derive(copy.deepcopy(teacher))
    if derive is make_fading:
        set_shortcut_scale(twin, 0.0)
    assert not any(isinstance(m, DropPath) for m in twin.modules())
    assert sum(isinstance(m, DropPath) for m in teacher.modules()) == 2
    x = torch.randn(4, 3, 8, 8)
    twin.train()
    torch.manual_seed(1)
    first = twin(x)
    torch.manual_seed(2)
    assert torch.equal(first, twin(x))
