"""Step-wise shortcut removal (Tailor, Weng et al. 2023; jointrd_timm.methods.stepwise): the removal schedule per
step and epoch in both orders, the loss by hand, the frozen teacher, resume, the run-length rule, the torchdistill
factory and its YAMLs, and a tiny run through the runner that deploys the plain twin."""
import copy
import inspect
import json

import pytest
import timm
import torch

import jointrd_timm  # noqa: F401
import jointrd_timm.integrations.torchdistill  # noqa: F401  (registers stepwise_model with torchdistill)
from conftest import ROOT, tiny_yaml
from jointrd_timm.methods import RunLengthError, StepwiseRemoval
from jointrd_timm.methods.stepwise import removal_points, removal_scales
from jointrd_timm.twins import count_shortcut_additions
from jointrd_timm.twins.fade import SCALE, FadingGraphBlock, deployable
from jointrd_timm.twins.transfer import load_teacher_weights

BLOCKS = 9  # resnet20_cifar: 3 stages of 3 basic blocks


def _pair(num_classes: int = 10, student_classes: int = 10):
    torch.manual_seed(0)
    teacher = timm.create_model('resnet20_cifar', num_classes=num_classes)
    student = timm.create_model('plain_resnet20_cifar', num_classes=student_classes, shortcut_fade=True)
    if num_classes == student_classes:
        load_teacher_weights(student, teacher)
    return teacher, student


def _method(**kwargs):
    teacher, student = _pair()
    return StepwiseRemoval(student, teacher, **kwargs)


def _block_scales(model):
    return [float(getattr(m, SCALE)) for m in model.modules() if isinstance(m, FadingGraphBlock)]


def _batch(n: int = 4, size: int = 16):
    return torch.randn(n, 3, size, size), torch.randint(0, 10, (n,))


def _expected(removed: int, order: str):
    scales = [0.0] * removed + [1.0] * (BLOCKS - removed)
    return scales if order == 'input_first' else scales[::-1]


def test_removal_points_and_scales():
    assert removal_points(3, 3) == [3, 6, 9]  # the first after `interval` epochs with every shortcut
    assert removal_points(3, 2, first_removal=0) == [0, 2, 4]
    assert removal_scales(0, 3, 3) == [1.0, 1.0, 1.0]
    assert removal_scales(2.99, 3, 3) == [1.0, 1.0, 1.0]
    assert removal_scales(3, 3, 3) == [0.0, 1.0, 1.0]  # input end first: Tailor's skip 0 is layers[0][0]
    assert removal_scales(3, 3, 3, order='output_first') == [1.0, 1.0, 0.0]
    assert removal_scales(6.5, 3, 3, order='output_first') == [1.0, 0.0, 0.0]
    assert removal_scales(100, 3, 3) == [0.0, 0.0, 0.0]
    assert removal_scales(0, 3, 2, first_removal=0) == [0.0, 1.0, 1.0]
    # fractional points reached by a fractional progress, whatever the float rounding of k * interval
    assert removal_scales(0.3, 3, 0.1) == [0.0, 0.0, 0.0] and 3 * 0.1 > 0.3
    with pytest.raises(ValueError, match="order must be one of \\('input_first', 'output_first'\\)"):
        removal_scales(0, 3, 3, order='head_first')


@pytest.mark.parametrize('order', ['input_first', 'output_first'])
def test_schedule_per_step_and_epoch(order):
    """interval 0.5 epoch, 4 steps per epoch: a shortcut goes every 2 steps from progress 0.5 on; the scales are
    exactly 0 or 1, set at the start of every step (fractional progress) and at every epoch start."""
    model = _method(interval=0.5, order=order, num_epochs=5, steps_per_epoch=4).train()
    assert _block_scales(model.student) == [1.0] * BLOCKS
    per_epoch = []
    with torch.no_grad():
        for epoch in range(5):
            model.set_epoch(epoch, 4, 5)
            assert _block_scales(model.student) == _expected(min(2 * epoch, BLOCKS), order)
            for step in range(4):
                x, y = _batch()
                out = model(x, y)
                assert torch.isfinite(out['loss'])
                step_progress = epoch + step / 4  # what the step trained at (the counters have moved on)
                assert model.progress == pytest.approx(step_progress + 0.25)
                assert _block_scales(model.student) == _expected(min(int(step_progress / 0.5), BLOCKS), order)
            per_epoch.append(model.epoch_metrics()['shortcuts_removed'])  # the twin as its last step trained it
    assert per_epoch == [1.0, 3.0, 5.0, 7.0, 9.0]
    deployable(model.student)  # every scale is 0: the shortcuts can be removed


def test_integer_interval_removes_at_epoch_starts():
    """Tailor's setting: interval 3 epochs, the first removal after 3 epochs; in between nothing changes."""
    model = _method(interval=3, num_epochs=30, steps_per_epoch=2).train()
    for epoch, removed in [(0, 0), (2, 0), (3, 1), (5, 1), (6, 2), (26, 8), (27, 9), (29, 9)]:
        model.set_epoch(epoch, 2, 30)
        assert _block_scales(model.student) == _expected(removed, 'input_first'), epoch
        assert model.shortcuts_removed == removed


def test_loss_by_hand_against_the_teacher():
    model = _method(interval=1, num_epochs=10, steps_per_epoch=4).train()
    model.set_epoch(2, 4, 10)  # two shortcuts gone: the loss is the modified twin's
    x, y = _batch()
    student = copy.deepcopy(model.student).train()
    with torch.no_grad():
        teacher_logits = model.teacher(x)
        logits = student(x)
    mse = sum(float(logits[i, j] - teacher_logits[i, j]) ** 2 for i in range(4) for j in range(10)) / 40
    ce = -sum(float(torch.log_softmax(logits[i], 0)[y[i]]) for i in range(4)) / 4
    out = model(x, y)
    assert float(out['mse']) == pytest.approx(mse, rel=1e-5)
    assert float(out['ce']) == pytest.approx(ce, rel=1e-5)
    assert float(out['loss']) == pytest.approx(0.35 * mse + 0.65 * ce, rel=1e-5)
    assert torch.allclose(out['teacher_logits'], teacher_logits) and torch.allclose(out['logits'], logits)
    weighted = _method(interval=1, num_epochs=10, steps_per_epoch=4, mse_weight=1.0, ce_weight=0.0).train()
    weighted.set_epoch(2, 4, 10)
    assert float(weighted(x, y)['loss']) == pytest.approx(mse, rel=1e-5)
    assert torch.equal(model.eval()(x), model.student(x))  # eval mode: the twin's logits


def test_teacher_is_frozen_and_gets_no_gradient():
    model = _method(interval=1, num_epochs=10, steps_per_epoch=2)
    teacher_state = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.train()
    assert not model.teacher.training and model.student.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert len(optimizer.param_groups[0]['params']) == len(list(model.student.parameters()))
    for _ in range(2):
        x, y = _batch()
        optimizer.zero_grad()
        model(x, y)['loss'].backward()
        optimizer.step()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    assert all(torch.equal(v, teacher_state[k]) for k, v in model.teacher.state_dict().items())  # BN stats too


def test_resume_mid_run_gives_the_same_scales_and_loss():
    """The method's state dict saved mid-epoch, its counters just past a removal point, loaded into a fresh method:
    the loaded twin has the scales of that progress, and the next step of both has the same scales and loss."""
    trained = _method(interval=0.25, num_epochs=3, steps_per_epoch=4).train()
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.05)
    torch.manual_seed(1)
    for _ in range(5):
        x, y = _batch()
        optimizer.zero_grad()
        trained(x, y)['loss'].backward()
        optimizer.step()
    assert trained.progress == pytest.approx(1.25) and trained.shortcuts_removed == 4  # trained at progress 1.0
    state = trained.state_dict()
    assert {'epoch', 'step_in_epoch', 'steps_per_epoch', 'num_epochs'} <= set(state)
    fresh = StepwiseRemoval(*reversed(_pair()), interval=0.25).train()
    assert _block_scales(fresh.student) == [1.0] * BLOCKS
    fresh.load_state_dict(state)
    assert fresh.progress == trained.progress
    assert _block_scales(fresh.student) == _expected(5, 'input_first')  # recomputed from the saved counters
    x, y = _batch()
    assert torch.equal(fresh(x, y)['loss'], trained(x, y)['loss'])
    assert _block_scales(fresh.student) == _block_scales(trained.student) == _expected(5, 'input_first')
    assert fresh.state_dict().keys() == state.keys() and fresh.progress == trained.progress == pytest.approx(1.5)


def test_too_short_a_run_is_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r'plain_resnet20_cifar has 9 shortcut blocks; removing one every 3 '
                                         r'epoch\(s\) from epoch 3 on.*needs 30 epochs, and the run has 10\. Give '
                                         r'train\.num_epochs >= 30, or an interval <= 1'):
        _method(interval=3, num_epochs=10, steps_per_epoch=5)
    model = _method(interval=3)  # run length unknown: built, refused at the first training step
    with pytest.raises(RunLengthError, match='run length must be known.*30 epochs needed'):
        model.train()(*_batch())
    with pytest.raises(ValueError, match='needs 30 epochs, and the run has 29'):
        model.set_epoch(0, 5, 29)
    model.set_epoch(0, 5, 30)  # exactly enough: the last removal at 27, then 3 epochs of training
    with pytest.raises(ValueError, match=r'from epoch 1 on.*needs 28 epochs.*or an interval <= 1 '):
        _method(interval=3, first_removal=1, num_epochs=10, steps_per_epoch=5)
    with pytest.raises(ValueError, match=r'needs 37 epochs.*or a first_removal below 10 '):
        _method(interval=3, first_removal=10, num_epochs=10, steps_per_epoch=5)
    with pytest.raises(ValueError, match=r'interval 0.1 epochs is shorter than one training step \(1/5 epoch\)'):
        _method(interval=0.1, num_epochs=10, steps_per_epoch=5)
    # 9 removals and the training after them in 4 steps: no interval fits, and none is suggested
    with pytest.raises(ValueError, match=r'needs 5 epochs, and the run has 2\. Give train\.num_epochs >= 5; no '
                                         r'shorter interval fits.*the run has 4 steps for 9 removals') as refused:
        _method(interval=0.5, num_epochs=2, steps_per_epoch=2)
    assert 'an interval <=' not in str(refused.value)
    unknown = _method(interval=3).eval()
    x = _batch()[0]
    assert torch.equal(unknown(x), unknown.student(x))  # evaluation needs no run length


def test_every_twin_ends_deployable_when_the_run_is_accepted():
    """The rule's promise: whatever interval / first_removal a run accepts, its last steps train a twin without any
    shortcut (so the runner can deploy it)."""
    for interval, first, epochs, steps in [(1, None, 10, 3), (0.5, 0, 5, 2), (1.25, 2, 14, 4), (0.34, None, 4, 3)]:
        model = _method(interval=interval, first_removal=first, num_epochs=epochs, steps_per_epoch=steps)
        model.set_epoch(epochs - 1, steps, epochs)
        model.step_in_epoch.fill_(steps - 1)  # the last training step
        model.apply_progress()
        assert model.shortcuts_removed == BLOCKS, (interval, first, epochs, steps)


def test_bad_settings_and_class_mismatch_are_refused():
    teacher, _ = _pair()
    with pytest.raises(ValueError, match='StepwiseRemoval: the teacher resnet20_cifar predicts 10 classes but the '
                                         'student plain_resnet20_cifar predicts 100'):
        StepwiseRemoval(_pair(10, 100)[1], teacher)
    with pytest.raises(ValueError, match='no fading shortcuts to remove'):
        StepwiseRemoval(timm.create_model('plain_resnet20_cifar', num_classes=10), teacher)
    for kwargs, message in [(dict(interval=0), 'interval must be a finite number > 0'),
                            (dict(interval=True), 'interval must be'),
                            (dict(first_removal=-1), 'first_removal must be a finite number >= 0'),
                            (dict(mse_weight=float('nan')), 'mse_weight must be'),
                            (dict(order='head_first'), 'order must be one of')]:
        with pytest.raises(ValueError, match=message):
            _method(**kwargs)


def test_factory_builds_the_method_from_yaml_kwargs():
    import yaml
    from torchdistill.models.registry import get_model
    kwargs = yaml.safe_load("""
        teacher: {model_name: 'resnet20_cifar', num_classes: 10}
        interval: 2
        order: 'output_first'
        first_removal:
        mse_weight: 0.35
        ce_weight: 0.65
    """)
    model = get_model('stepwise_model', None, **kwargs)
    assert isinstance(model, StepwiseRemoval)
    assert (model.interval, model.order, model.first_removal, model.blocks) == (2.0, 'output_first', None, BLOCKS)
    assert model.student.default_cfg['architecture'] == 'plain_resnet20_cifar'
    teacher_state = model.teacher.state_dict()
    assert all(torch.equal(v, teacher_state[k]) for k, v in model.student.state_dict().items())  # started as T
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), model.teacher(x))  # every shortcut there: the teacher exactly
    with pytest.raises(ValueError, match='teacher / student kwargs'):
        get_model('stepwise_model', None, teacher=kwargs['teacher'],
                  student={'model_name': 'plain_resnet20_cifar', 'num_classes': 100})


def _generator():
    import importlib.util
    spec = importlib.util.spec_from_file_location('yaml_generate', ROOT / 'yamls' / 'generate.py')
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return generate


@pytest.mark.parametrize('dataset,classes', [('cifar10', 10), ('cifar100', 100)])
def test_generated_yaml_builds_the_zoo_pair(dataset, classes):
    import yaml
    from torchdistill.models.registry import get_model

    class Loader(yaml.SafeLoader):  # torchdistill's !import_call tags would load the dataset: read them as None
        pass
    Loader.add_multi_constructor('!', lambda loader, suffix, node: None)
    name = f'{dataset}/stepwise-resnet56.yaml'
    written = dict(_generator().documents())[name]
    assert (ROOT / 'yamls' / name).read_text() == written, 'run python yamls/generate.py'
    config = yaml.load(written, Loader)
    section = config['models']['model']
    assert section['key'] == 'stepwise_model' and config['train']['model']['forward_proc'] == 'forward_batch_target'
    assert config['train']['pre_epoch_process'] == 'jointrd_pre_epoch_process'
    assert config['train']['criterion']['kwargs']['sub_terms']['method']['criterion']['key'] == 'MethodLoss'
    kwargs = copy.deepcopy(section['kwargs'])
    del kwargs['teacher']['checkpoint']  # a run's output; the structure is what is checked here
    model = get_model('stepwise_model', None, **kwargs)
    assert (model.interval, model.order, model.mse_weight, model.ce_weight) == (3.0, 'input_first', 0.35, 0.65)
    assert model.blocks == 27 and model.student.num_classes == classes
    model.set_epoch(0, 391, config['train']['num_epochs'])  # the schedule fits the YAML's run
    assert model.epochs_needed == 84


def test_runner_removes_every_shortcut_then_deploys_the_plain_twin(tmp_path):
    """Through the project's runner on tiny data (4 steps per epoch, a removal every step from progress 0.25):
    the removals are logged per epoch (the twin as the epoch's last step, at progress e + 0.75, trained it), and
    the saved model is the plain twin (loads strictly into plain_<arch>)."""
    from jointrd_timm.io import load_weights
    from jointrd_timm.training.runner import load_config, train
    args = "model_name: resnet20_cifar, num_classes: 10, in_chans: 1"
    overrides = ['models.model.key=stepwise_model',
                 f'models.model.kwargs={{teacher: {{{args}}}, student: {{{args.replace("resnet", "plain_resnet")}}}, '
                 'interval: 0.25}']
    config = load_config(tiny_yaml(tmp_path, method='cakd', epochs=3, limit=64, batch_size=16), overrides)
    final = train(config, output_dir=str(tmp_path / 'run'), device='cpu')
    records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['shortcuts_removed'] for r in records] == [3.0, 7.0, 9.0]
    assert all(r['train_loss'] > 0 for r in records) and 'test_acc_folded' in final
    saved = json.loads((tmp_path / 'run' / 'model' / 'config.json').read_text())
    assert saved['architecture'] == 'plain_resnet20_cifar' and saved['model_args']['shortcut_fade'] is False
    twin = load_weights(timm.create_model('plain_resnet20_cifar', num_classes=10, in_chans=1),
                        tmp_path / 'run' / 'model')
    assert count_shortcut_additions(twin) == 0


def test_every_field_is_documented():
    from jointrd_timm.integrations.torchdistill import stepwise_model
    fields = set(inspect.signature(StepwiseRemoval).parameters) - {'student', 'num_epochs', 'steps_per_epoch'}
    fields |= set(inspect.signature(stepwise_model).parameters)
    page = (ROOT / 'docs' / 'jointrd.md').read_text()
    assert '`stepwise_model`' in page and '`shortcuts_removed`' in page
    missing = sorted(name for name in fields if f'`{name}`' not in page)
    assert not missing, f'docs/jointrd.md does not describe StepwiseRemoval field(s) {missing}'
