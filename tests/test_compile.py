"""runner.compile / compile_modules: torch.compile of the models' modules gives the losses and gradients of the eager
run, for the fading twin with JointRD (hybrid paths, lean memory), the adversarial methods and a plain model."""
import copy
import json

import pytest
import timm
import torch

import jointrd_timm
from jointrd_timm.methods import JointRD, JointRDConfig
from jointrd_timm.methods.adversarial import ConditionalAdversarialKD
from jointrd_timm.training.runner import ConfigError, compile_modules, load_config, train
from conftest import tiny_yaml


def _fading_pair():
    torch.manual_seed(0)
    teacher = timm.create_model('resnet20_cifar', num_classes=10)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10, shortcut_fade=True)
    jointrd_timm.load_teacher_weights(twin, teacher)
    return teacher, twin


def _steps(method, batches):
    """Losses and the last step's gradients of a few training steps at lr 0 (so both runs see the same weights)."""
    losses = []
    for x, y in batches:
        method.zero_grad(set_to_none=True)
        out = method(x, y)
        out['loss'].backward()
        losses.append(out['loss'].item())
    return losses, {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('backend', ['aot_eager', pytest.param('inductor', marks=pytest.mark.slow)])
def test_compiled_jointrd_with_fade_and_lean_memory_matches_eager(backend):
    teacher, twin = _fading_pair()
    eager = JointRD(twin, teacher, JointRDConfig(shortcut_fade=0.5, lean_memory=True), num_epochs=1,
                    steps_per_epoch=4).train()
    compiled = copy.deepcopy(eager)
    names = compile_modules(compiled, backend)
    assert 'student.layer1' in names and 'teacher.layer3' in names
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(3)]
    (eager_losses, eager_grads), (losses, grads) = _steps(eager, batches), _steps(compiled, batches)
    # the fade moved s at every step, and the compiled modules read it
    assert jointrd_timm.twins.fade.shortcut_scale(compiled.student) < 1.0
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert set(grads) == set(eager_grads)
    for name, g in grads.items():
        assert torch.allclose(g, eager_grads[name], rtol=1e-4, atol=1e-6 * eager_grads[name].abs().max().item()), name
    # parameter names unchanged: the compiled method's state loads into the eager one
    eager.load_state_dict(compiled.state_dict())


def test_compiled_jointrd_on_a_torchvision_twin_matches_eager():
    """torchvision models have no forward_features: JointRD cuts them at their children and compile_modules compiles
    those children; the compiled fading twin trains as the eager one does."""
    from jointrd_timm.models.torchvision_models import create_named_model
    torch.manual_seed(0)
    teacher = create_named_model('torchvision:resnet18', num_classes=10)
    twin = create_named_model('plain_torchvision:resnet18', num_classes=10, shortcut_fade=True)
    jointrd_timm.load_teacher_weights(twin, teacher)
    eager = JointRD(twin, teacher, JointRDConfig(shortcut_fade=0.5), num_epochs=1, steps_per_epoch=4).train()
    compiled = copy.deepcopy(eager)
    names = compile_modules(compiled, 'aot_eager')
    assert {'student.layer1', 'student.fc', 'teacher.layer4'} <= set(names)
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    (eager_losses, eager_grads), (losses, grads) = _steps(eager, batches), _steps(compiled, batches)
    assert jointrd_timm.twins.fade.shortcut_scale(compiled.student) < 1.0
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    assert set(grads) == set(eager_grads) and len(grads) > 0
    for name, g in grads.items():
        assert torch.allclose(g, eager_grads[name], rtol=1e-4, atol=1e-6 * eager_grads[name].abs().max().item()), name


def test_compiled_adversarial_method_matches_eager():
    torch.manual_seed(0)
    teacher = timm.create_model('resnet20_cifar', num_classes=10)
    twin = timm.create_model('plain_resnet20_cifar', num_classes=10)
    eager = ConditionalAdversarialKD(twin, teacher, num_classes=10, discriminator=dict(lr=0.0)).train()
    compiled = copy.deepcopy(eager)
    compile_modules(compiled, 'aot_eager')
    torch.manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    torch.manual_seed(2)
    eager_losses, _ = _steps(eager, batches)
    torch.manual_seed(2)
    losses, _ = _steps(compiled, batches)
    assert losses == pytest.approx(eager_losses, rel=1e-5)


def test_runner_compile_option_trains_the_same_and_saves_plain_names(tmp_path):
    runs = {}
    for name, overrides in (('eager', []), ('compiled', ['runner.compile=aot_eager'])):
        train(load_config(tiny_yaml(tmp_path / name, epochs=1), overrides + ['train.optimizer.kwargs.lr=0.0']),
              output_dir=str(tmp_path / name / 'run'), device='cpu')
        runs[name] = json.loads((tmp_path / name / 'run' / 'metrics.jsonl').read_text().splitlines()[0])
    assert runs['compiled']['train_loss'] == pytest.approx(runs['eager']['train_loss'], rel=1e-5)
    from jointrd_timm.io import load_weights
    load_weights(timm.create_model('plain_resnet20_cifar', num_classes=10, in_chans=1), tmp_path / 'compiled' / 'run' / 'model')


def test_plain_model_is_compiled_whole():
    model = timm.create_model('resnet20_cifar', num_classes=10)
    assert compile_modules(model, 'aot_eager') == ['model']
    x = torch.randn(2, 3, 16, 16)
    reference = copy.deepcopy(model)
    assert torch.allclose(model.eval()(x), reference.eval()(x), atol=1e-5)


def test_compile_option_must_be_a_backend(tmp_path):
    with pytest.raises(ConfigError, match=r"runner.compile='nope' is not a torch.compile backend"):
        load_config(tiny_yaml(tmp_path, method='ce'), ['runner.compile=nope'])
    with pytest.raises(ConfigError, match=r'runner.compile .*true, false or a torch.compile backend'):
        load_config(tiny_yaml(tmp_path / 'b', method='ce'), ['runner.compile=3'])


def test_cli_compile_flags_reach_the_runner(tmp_path, monkeypatch):
    from jointrd_timm import cli
    parser = cli.build_parser()
    assert parser.parse_args(['train', '--config', 'x.yaml', '--compile']).compile == 'inductor'
    assert parser.parse_args(['train', '--config', 'x.yaml', '--compile', 'aot_eager']).compile == 'aot_eager'
    assert parser.parse_args(['train', '--config', 'x.yaml']).compile is None
    assert parser.parse_args(['distill', 'resnet20_cifar', '--data', 'sklearn:digits', '--compile']).compile == 'inductor'
    seen = {}
    monkeypatch.setattr('jointrd_timm.training.runner.train', lambda config, **kw: seen.update(config['runner']))
    cli.main(['train', '--config', str(tiny_yaml(tmp_path, method='ce')), '--compile', 'aot_eager'])
    assert seen['compile'] == 'aot_eager'
