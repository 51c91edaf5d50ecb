"""training.configs: one builder of a run's config (make_config is its keyword form), written as YAML and read back
with its torchdistill tags."""
import pytest
import torch.utils.data as tud

from jointrd_timm.recipes import SCHEDULES
from jointrd_timm.training.configs import build_config, dataset_entry, make_config, read_yaml, to_yaml, Tagged

MODEL = dict(key='timm_model', kwargs=dict(model_name='resnet20_cifar', num_classes=10))
TEACHER = dict(key='timm_model', kwargs=dict(model_name='resnet20_cifar', num_classes=10, checkpoint='t'))


def test_make_config_kd_is_the_torchdistill_config_it_always_was():
    config = make_config('TRAIN', 'TEST', MODEL, 'kd', TEACHER, epochs=8, batch_size=32, lr=0.05, schedule='multistep',
                         seed=3, output_dir='out', num_workers=1)
    loader = lambda name, batch, sampler, supp: dict(  # noqa: E731
        dataset_id=name, requires_supp=supp, sampler=dict(class_or_func=sampler, kwargs=None),
        kwargs=dict(batch_size=batch, num_workers=1, drop_last=False))
    forward = dict(forward_proc='forward_batch_only', sequential=[])
    assert config == dict(
        datasets=dict(train='TRAIN', test='TEST', val='TEST'),
        models=dict(teacher_model=TEACHER, student_model=MODEL),
        train=dict(log_freq=1000, num_epochs=8,
                   train_data_loader=loader('train', 32, tud.RandomSampler, True),
                   val_data_loader=loader('val', 256, tud.SequentialSampler, False),
                   optimizer=dict(key='SGD', kwargs=dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)),
                   scheduler=dict(key='MultiStepLR', kwargs=dict(milestones=[4, 6], gamma=0.1)),
                   teacher=dict(forward, requires_grad=False), student=dict(forward, requires_grad=True),
                   criterion=dict(key='WeightedSumLoss', kwargs=dict(sub_terms=dict(kd=dict(criterion=dict(
                       key='KDLoss', kwargs=dict(student_module_path='.', student_module_io='output',
                                                 teacher_module_path='.', teacher_module_io='output', temperature=4.0,
                                                 alpha=0.9, reduction='batchmean')), weight=1.0))))),
        test=dict(test_data_loader=loader('test', 256, tud.SequentialSampler, False)),
        runner=dict(seed=3, output_dir='out'))


@pytest.mark.parametrize('method', ['ce', 'jointrd', 'cakd', 'stepwise', 'fitnets'])
def test_make_config_is_build_config_on_a_schedule_of_its_keywords(method):
    teacher = TEACHER if method == 'fitnets' else None
    schedule = SCHEDULES['cpu-budget'].replace(epochs=6, batch_size=16, lr=0.02)
    box = 'jointrd' if method in ('cakd', 'stepwise') else method  # make_config's name of a module's loss
    built = build_config(dict(train='A', test='B', val='C'), MODEL, schedule, box, teacher=teacher, seed=1)
    assert make_config('A', 'B', MODEL, method, teacher, epochs=6, batch_size=16, lr=0.02, seed=1, val_set='C') == built
    assert built['train']['scheduler'] == dict(key='CosineAnnealingLR', kwargs=dict(T_max=6))


def test_make_config_takes_a_schedule_whole_and_refuses_it_with_keywords():
    from jointrd_timm.recipes import get_recipe
    teacher_run = SCHEDULES['cpu-budget'].replace(epochs=4, batch_size=32, lr=0.1)
    twin_run = get_recipe('kd-low-lr').twin_schedule(teacher_run)  # a twin's: its recipe's peak
    config = make_config('A', 'B', MODEL, 'jointrd', schedule=twin_run, seed=2)
    assert config == build_config(dict(train='A', test='B', val='B'), MODEL, twin_run, 'jointrd', seed=2)
    assert config['train']['optimizer']['kwargs']['lr'] == 0.02 and config['train']['num_epochs'] == 4
    assert config['train']['train_data_loader']['kwargs']['batch_size'] == 32
    # the schedule with the same values as keywords is the same config
    assert make_config('A', 'B', MODEL, 'jointrd', epochs=4, batch_size=32, lr=0.02, seed=2) == config
    with pytest.raises(ValueError, match=r"give the schedule \('cpu-budget'\) or \['lr'\], not both"):
        make_config('A', 'B', MODEL, 'ce', schedule=teacher_run, lr=0.5)
    with pytest.raises(ValueError, match="schedule must be a Schedule, 'cosine' or 'multistep', got 'linear'"):
        make_config('A', 'B', MODEL, 'ce', schedule='linear')


def test_terse_config_leaves_out_torchdistill_defaults_and_names_datasets():
    datasets = dict(train=dataset_entry(source='uoft-cs/cifar10', split='train'),
                    test=dataset_entry(source='uoft-cs/cifar10', split='test'))
    config = build_config(datasets, MODEL, SCHEDULES['cifar'], 'ce', dataset_name='cifar10', terse=True,
                          dst_ckpt='runs/x.pt', runner=dict(mixed_precision='no'))
    train = config['train']
    assert sorted(config['datasets']) == ['cifar10/test', 'cifar10/train']
    assert train['val_data_loader']['dataset_id'] == 'cifar10/test' and 'requires_supp' not in train['val_data_loader']
    assert train['model'] == dict(forward_proc='forward_batch_only') and 'pre_epoch_process' not in train
    assert config['models']['model']['dst_ckpt'] == 'runs/x.pt' and 'dst_ckpt' not in MODEL
    assert config['runner'] == dict(seed=0, output_dir=None, mixed_precision='no')
    with pytest.raises(ValueError, match="method 'kd' needs a teacher model config"):
        build_config(datasets, MODEL, SCHEDULES['cifar'], 'kd')
    with pytest.raises(ValueError, match="method must be one of 'ce', 'jointrd', 'method', 'kd', 'fitnets'"):
        build_config(datasets, MODEL, SCHEDULES['cifar'], 'cakd')


def test_yaml_round_trip_keeps_the_tags_and_runs_nothing():
    config = make_config('A', 'B', MODEL, 'ce', epochs=2)
    text = to_yaml(config, datasets=dict(train=dict(source='uoft-cs/cifar10', split='train')),
                   class_names={tud.RandomSampler: 'torch.utils.data.RandomSampler'})
    tree = read_yaml(text)
    assert tree['dependencies'] == [dict(name='jointrd_timm')]
    assert tree['datasets']['train'] == Tagged('!import_call', dict(
        key='jointrd_timm.training.data.load_image_dataset', init=dict(kwargs=dict(source='uoft-cs/cifar10',
                                                                                    split='train'))))
    samplers = [tree['train']['train_data_loader']['sampler']['class_or_func'],
                tree['train']['val_data_loader']['sampler']['class_or_func']]
    assert samplers == [Tagged('!import_get', dict(key='torch.utils.data.RandomSampler')),
                        Tagged('!import_get', dict(key='torch.utils.data.sampler.SequentialSampler'))]
    assert tree['runner'] == dict(seed=0, output_dir=None) and tree['models'] == dict(model=MODEL)
    assert to_yaml(tree) == text  # what it reads, it writes back unchanged
    assert '&id' not in text and '*id' not in text
