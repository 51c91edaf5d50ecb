"""Graph rules (jointrd_timm/twins/families/graph.py): every registered block class, on real inputs.

For each class, a small model of its family runs a forward pass; the inputs its blocks receive are captured and
1. the block's traced forward (still residual) must reproduce the block exactly: tracing took the same code
   path as eager execution, so the graph the rule edits is the block's real computation;
2. the rule must cut the shortcut, not the branch: the plain block keeps more convolutions / linear layers than
   it removed, runs on the captured input, and has no shortcut addition left.
"""
import copy

import pytest
import timm
import torch
from torch import nn

import jointrd_timm  # noqa: F401  (registers the rules)
from jointrd_timm.twins.families.graph import GRAPH_RULE_CLASSES
from jointrd_timm.twins.graph_rule import PlainGraphBlock, faithful_trace, plain_graph_module
from jointrd_timm.twins.verify import shortcut_additions

# model -> input size; together they instantiate every class of GRAPH_RULE_CLASSES
MODELS = {
    'bat_resnext26ts': 256, 'convmixer_768_32': 64, 'cpubone_nano': 64, 'cspnext_tiny': 64, 'dpn48b': 64,
    'fasternet_t0': 64, 'fastvit_t8': 64, 'ghostnet_050': 64, 'ghostnetv3_050': 64, 'hgnetv2_b0': 64,
    'inception_next_atto': 64, 'lcnetv2_small': 64, 'lowformer_e1': 64, 'mambaout_femto': 64, 'poolformerv2_s12': 64,
    'repghostnet_050': 64, 'repvit_m0_9': 64, 'rexnet_100': 64, 'starnet_s050': 64, 'tresnet_m': 64,
    'eca_vovnet39b': 64, 'legacy_xception': 71, 'xception41': 64, 'xception41p': 64,
}
SLOW_MODELS = {'inception_resnet_v2': 96, 'nasnetalarge': 96, 'pnasnet5large': 96}
ALL_CLASSES = {f'{module}.{name}' for module, names in GRAPH_RULE_CLASSES.items() for name in names}


def _convs(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules())


def _captured_blocks(model_name: str, size: int, per_class: int = 2):
    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    blocks = [(name, m) for name, m in model.named_modules()
              if f'{type(m).__module__}.{type(m).__name__}' in ALL_CLASSES]
    seen, captured, hooks = {}, {}, []
    for name, block in blocks:
        key = type(block)
        if seen.get(key, 0) >= per_class:
            continue
        seen[key] = seen.get(key, 0) + 1

        def hook(module, args, kwargs, name=name):
            captured.setdefault(name, (module, args, kwargs))
        hooks.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        model(torch.randn(1, model.pretrained_cfg['input_size'][0], size, size))
    for h in hooks:
        h.remove()
    return captured


def _check(model_name: str, size: int):
    captured = _captured_blocks(model_name, size)
    assert captured, f'{model_name} has no block of a graph-rule class'
    for name, (block, args, kwargs) in captured.items():
        with torch.no_grad():
            expected = block(*args, **kwargs)
            traced = faithful_trace(block)(*args, **kwargs)
        torch.testing.assert_close(traced, expected, msg=f'{model_name}.{name}: trace differs from the block')
        if not shortcut_additions(block):  # an instance built without its shortcut (e.g. CPUBone's first blocks)
            continue
        plain, kept = plain_graph_module(copy.deepcopy(block))
        assert not kept and shortcut_additions(plain) == 0, name
        removed = _convs(block) - _convs(plain)
        assert _convs(plain) > removed, f'{model_name}.{name}: the rule cut the branch, not the shortcut'
        with torch.no_grad():
            out = plain(*args, **kwargs)
        assert out.shape == expected.shape and torch.isfinite(out).all()
    return {type(b) for b, _, _ in captured.values()}


def test_every_graph_rule_class_has_a_sample_model():
    with torch.device('meta'):
        found = {f'{type(m).__module__}.{type(m).__name__}' for n in [*MODELS, *SLOW_MODELS]
                 for m in timm.create_model(n).modules()}
    assert ALL_CLASSES <= found, f'no sample model for {sorted(ALL_CLASSES - found)}'


@pytest.mark.parametrize('model_name', list(MODELS))
def test_graph_rule_traces_faithfully_and_cuts_the_shortcut(model_name):
    _check(model_name, MODELS[model_name])


@pytest.mark.slow
@pytest.mark.parametrize('model_name', list(SLOW_MODELS))
def test_graph_rule_traces_faithfully_and_cuts_the_shortcut_large_models(model_name):
    _check(model_name, SLOW_MODELS[model_name])


def test_graph_rule_twin_keeps_the_original_child_modules_and_parameter_names():
    teacher = timm.create_model('ghostnet_050')
    twin = timm.create_model('plain_ghostnet_050')
    names = set(twin.state_dict())
    assert names < set(teacher.state_dict())
    dropped = set(teacher.state_dict()) - names
    assert dropped and all('.shortcut.' in k for k in dropped)  # only the projection shortcuts went
    plain_blocks = [m for m in twin.modules() if isinstance(m, PlainGraphBlock)]
    assert len(plain_blocks) == 16 and type(plain_blocks[0]).__name__ == 'PlainGraphGhostBottleneck'
    clone = copy.deepcopy(twin)  # deep copies stay plain twins (rule still recognised)
    assert jointrd_timm.count_shortcut_additions(clone) == 0
    x = torch.randn(2, 3, 64, 64)
    twin.eval(), clone.eval()
    torch.testing.assert_close(twin(x), clone(x))


def test_paper_variant_keeps_graph_rule_projections():
    twin = timm.create_model('plain_ghostnet_050', keep_projection_shortcuts=True)
    teacher = timm.create_model('ghostnet_050')
    projections = [n for n, m in teacher.named_modules() if type(m).__name__ == 'GhostBottleneck'
                   and len(m.shortcut) > 0]
    assert projections and sorted(twin.plain_report.kept_projections) == sorted(projections)
    assert jointrd_timm.count_shortcut_additions(twin) == len(projections)


def test_graph_block_keeps_non_persistent_buffers_out_of_the_state_dict():
    """torch.fx before 2.12 copied a buffer the graph reads as persistent: keep_non_persistent undoes that."""
    import torch
    from torch import fx, nn
    from jointrd_timm.twins.graph_rule import keep_non_persistent

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Module()
            self.inner.register_buffer('scale', torch.full((), 2.0), persistent=False)
            self.register_buffer('kept', torch.ones(()))
            self.register_buffer('gain', torch.full((), 3.0), persistent=False)

        def forward(self, x):
            return x * self.inner.scale * self.kept * self.gain

    block = Block()
    module = fx.GraphModule(block, fx.symbolic_trace(block).graph)
    for target, name in ((module.inner, 'scale'), (module, 'gain')):  # what older torch.fx did
        target._non_persistent_buffers_set.discard(name)
    assert {'inner.scale', 'gain'} <= set(module.state_dict())
    keep_non_persistent(module, block)
    assert set(module.state_dict()) == {'kept'}
    assert torch.equal(module(torch.ones(2)), torch.full((2,), 6.0))  # the buffers are still read
