"""Writes the run configs of yamls/ (torchdistill format) from one template, so every setting shares its recipe.

    python yamls/generate.py

Methods: ``ce`` (residual teacher, cross-entropy), ``plain`` (the twin alone, same recipe and ingredients),
``jointrd`` (the twin with JointRD from the ``ce`` run's teacher). Everything about training comes from
:mod:`jointrd_timm.recipes`: the schedule of the dataset (``SCHEDULES``: the JointRD reference's hyperparameters
and eta) and the recommended recipe of the architecture (``recipe_for``: the default, or the per-architecture choice
that was measured better). This file only knows where the data is (``DATASETS``) and how a YAML is laid out.
"""
from pathlib import Path

from jointrd_timm.recipes import SCHEDULES, recipe_for

HERE = Path(__file__).parent

# where each dataset is and how it is read; ``schedule`` names its training hyperparameters in jointrd_timm.recipes
DATASETS = {
    'cifar10': dict(root='../shared/datasets/cifar10', image_column='img', label_column='label', num_classes=10,
                    test_split='test', transform='cifar', input_size=32, workers=2, schedule='cifar'),
    'cifar100': dict(root='uoft-cs/cifar100', image_column='img', label_column='fine_label', num_classes=100,
                     test_split='test', transform='cifar', input_size=32, workers=2, schedule='cifar'),
    'imagenet': dict(root='~/datasets/ilsvrc2012', image_column='image', label_column='label', num_classes=1000,
                     test_split='validation', transform='imagenet', input_size=224, workers=8, schedule='imagenet'),
}


def settings(dataset: str, arch: str = '') -> dict:
    """Everything a YAML of ``dataset`` states: the data, the schedule, and ``arch``'s recipe (the default when
    ``arch`` is not given)."""
    data = DATASETS[dataset]
    schedule = SCHEDULES[data['schedule']]
    twin = recipe_for(arch)
    # the recipe's JointRD fields on this schedule (a 'teacher_first' joint teacher gets its own SGD from it)
    jointrd = twin.run_fields(schedule)
    return dict(data, epochs=schedule.epochs, batch=schedule.batch_size, lr=schedule.lr,
                milestones=list(schedule.milestones), step_size=schedule.step_size if schedule.decay == 'step' else None,
                weight_decay=schedule.weight_decay, eta_min=jointrd['eta_min'],
                eta_horizon_fraction=jointrd['eta_horizon_fraction'],
                feature_loss_weight=jointrd['feature_loss_weight'], dirac=twin.dirac,
                kd_weight=jointrd.get('kd_weight', 0.0), init_from_teacher=twin.init_from_teacher,
                shortcut_fade=twin.shortcut_fade, loss_normalization=jointrd.get('loss_normalization', 'stages'),
                teacher_mode=jointrd.get('teacher_mode', 'frozen'), recipe=twin,
                joint={k: jointrd[k] for k in JOINT_FIELDS if k in jointrd})


# the joint teacher's fields a recipe may set (stated in the YAML only when it does)
JOINT_FIELDS = ('joint_step_order', 'hybrid_teacher_bn', 'margin_refresh', 'teacher_optimizer')


def _yaml_value(v) -> str:
    if isinstance(v, str):
        return f"'{v}'"
    if isinstance(v, dict):
        return '{' + ', '.join(f'{k}: {_yaml_value(x)}' for k, x in v.items()) + '}'
    return str(v)


ARCHS = {'cifar10': ['resnet18_cifar', 'resnet34_cifar', 'resnet50_cifar', 'resnet56_cifar', 'resnet110_cifar'],
         'imagenet': ['resnet18', 'resnet34', 'resnet50']}
ARCHS['cifar100'] = ARCHS['cifar10']
# The distillation zoo on one teacher/twin pair (every row trains the same deployable twin), and Xu et al.'s setting
ZOO = {'cifar10': [('resnet56_cifar', 'plain_resnet56_cifar', 'resnet56')],
       'cifar100': [('resnet56_cifar', 'plain_resnet56_cifar', 'resnet56')]}
XU2017 = {'cifar10': ('wide_resnet40_10_cifar', 'wide_resnet10_4_cifar'),
          'cifar100': ('wide_resnet40_10_cifar', 'wide_resnet10_4_cifar')}
ZOO_DESCRIPTION = {
    'kd': 'Hinton KD (torchdistill KDLoss, T 4, alpha 0.9) from {teacher} into {student}',
    'fitnets': 'FitNets-style hint (MSE on layer2 outputs, weight 1) + CE from {teacher} into {student}',
    'cakd': 'conditional adversarial KD (Xu et al. 2017) from {teacher} into {student}',
    'aps': 'adversarial portable student (Wang et al. 2018, our reading) from {teacher} into {student}',
    'jointrd-adv': 'JointRD plus a conditional adversarial term on the twin logits, from {teacher} into {student}',
    'stepwise': 'step-wise shortcut removal (Tailor, Weng et al. 2023: one shortcut every 3 epochs, input end '
                'first, 0.35 MSE to the frozen teacher logits + 0.65 CE), {student} started from {teacher}',
    'ce': 'the student {student} alone, cross-entropy',
}
DESCRIPTION = {
    'ce': 'the residual teacher {arch}, cross-entropy',
    'plain': 'the shortcut-free twin plain_{arch} trained ALONE (baseline): same recipe and ingredients as the '
             'JointRD run (started from the teacher, shortcuts faded out), no teacher in the loss',
    'jointrd': 'plain_{arch} trained with JointRD from its residual teacher {arch} (Li et al., NeurIPS 2020), '
               'recipe `{recipe}`: {description}',
}


def _short(arch: str) -> str:
    return arch.replace('_cifar', '')


CE_CRITERION = """        ce:
          criterion:
            key: 'CrossEntropyLoss'
            kwargs:
              reduction: 'mean'
          criterion_wrapper:
            key: 'SimpleLossWrapper'
            kwargs:
              input: {is_from_teacher: False, module_path: '.', io: 'output'}
              target: {uses_label: True}
          weight: 1.0"""


def _student_block(arch: str, r: dict, fade_flag: bool) -> str:
    """The twin's ``student:`` kwargs (jointrd_model and fading_model); ``fade_flag``: say whether it fades."""
    block = f"""      student:
        model_name: 'plain_{arch}'
        num_classes: {r['num_classes']}
        dirac: {r['dirac']}"""
    return block + (f"\n        shortcut_fade: {r['shortcut_fade'] is not None}" if fade_flag else '')


def render(dataset: str, arch: str, method: str) -> str:
    r = settings(dataset, arch)
    short = _short(arch)
    out_dir = f'runs/{dataset}/{method}-{short}'
    teacher_ckpt = f'runs/{dataset}/ce-{short}/model'
    if method == 'jointrd':
        model = f"""  model:
    key: 'jointrd_model'
    kwargs:
      teacher:
        model_name: '{arch}'
        num_classes: {r['num_classes']}
        checkpoint: '{teacher_ckpt}'
{_student_block(arch, r, fade_flag=True)}
      jointrd:
        eta_min: {r['eta_min']}
        eta_horizon_fraction: {r['eta_horizon_fraction']}
        eta_per_step: True
        feature_loss_weight: {r['feature_loss_weight']}
        feature_loss: 'margin'
        teacher_mode: '{r['teacher_mode']}'{''.join(f'''
        {k}: {_yaml_value(v)}''' for k, v in r['joint'].items())}
        hybrid_paths:
        kd_weight: {r['kd_weight']}
        loss_normalization: '{r['loss_normalization']}'
        shortcut_fade: {'' if r['shortcut_fade'] is None else r['shortcut_fade']}
      init_student_from_teacher: {r['init_from_teacher']}
    dst_ckpt: '{out_dir}/torchdistill_ckpt.pt'"""
        proc = "  pre_epoch_process: 'jointrd_pre_epoch_process'\n  model:\n    forward_proc: 'forward_batch_target'"
        criterion = """        jointrd:
          criterion:
            key: 'JointRDLoss'
            kwargs:
              module_path: '.'
          weight: 1.0"""
    elif method == 'plain' and r['shortcut_fade'] is not None:
        # the twin alone with the default recipe's ingredients: fading shortcuts, started from the same teacher
        init = f"\n      teacher_checkpoint: '{teacher_ckpt}'" if r['init_from_teacher'] else ''
        model = f"""  model:
    key: 'fading_model'
    kwargs:
{_student_block(arch, r, fade_flag=False)}
      shortcut_fade: {r['shortcut_fade']}{init}
    dst_ckpt: '{out_dir}/torchdistill_ckpt.pt'"""
        proc = "  pre_epoch_process: 'jointrd_pre_epoch_process'\n  model:\n    forward_proc: 'forward_batch_only'"
        criterion = CE_CRITERION
    else:
        name = arch if method == 'ce' else f'plain_{arch}'
        dirac = f"\n      dirac: {r['dirac']}" if method == 'plain' else ''
        model = f"""  model:
    key: 'timm_model'
    kwargs:
      model_name: '{name}'
      num_classes: {r['num_classes']}{dirac}
    dst_ckpt: '{out_dir}/torchdistill_ckpt.pt'"""
        proc = "  model:\n    forward_proc: 'forward_batch_only'"
        criterion = CE_CRITERION
    twin = r['recipe']
    header = f"# {dataset}: {DESCRIPTION[method].format(arch=arch, recipe=twin.id, description=twin.description)}."
    if method != 'ce':
        header += f"\n# The recipe and what it was measured against: {twin.record}"
    return document(dataset, f'{method}-{short}', header, model, proc, criterion, out_dir, r['weight_decay'])


def document(dataset, name, header, model, proc, criterion, out_dir, weight_decay):
    r = settings(dataset)
    scheduler = (f"    key: 'StepLR'\n    kwargs:\n      step_size: {r['step_size']}\n      gamma: 0.1"
                 if r['step_size'] else
                 f"    key: 'MultiStepLR'\n    kwargs:\n      milestones: {r['milestones']}\n      gamma: 0.1")
    dataset_kwargs = lambda split: f"""        source: *root_dir
        split: '{split}'
        transform: '{r['transform']}'
        input_size: {r['input_size']}
        image_column: '{r['image_column']}'
        label_column: '{r['label_column']}'"""  # noqa: E731
    return f"""{header}
# Generated by yamls/generate.py from jointrd_timm/recipes.py (edit them there). Reference recipe: jointrd-method.md.
# A YAML is code: torchdistill runs its !import_call tags when it loads. Run only YAMLs you trust.
# Run: jointrd train --config yamls/{dataset}/{name}.yaml
#  or, unchanged, torchdistill's examples/torchvision/image_classification.py --config <this> --device cpu
# Evaluation is on the test split after every epoch for the record; nothing is selected on it.
dependencies:
  - name: 'jointrd_timm'

datasets:
  &train {dataset}/train: !import_call
    _root: &root_dir '{r['root']}'
    key: 'jointrd_timm.training.data.load_image_dataset'
    init:
      kwargs:
{dataset_kwargs('train')}
  &test {dataset}/test: !import_call
    key: 'jointrd_timm.training.data.load_image_dataset'
    init:
      kwargs:
{dataset_kwargs(r['test_split'])}

models:
{model}

train:
  log_freq: 100
  num_epochs: {r['epochs']}
{proc}
  train_data_loader:
    dataset_id: *train
    requires_supp: True
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.RandomSampler'
      kwargs:
    kwargs:
      batch_size: {r['batch']}
      num_workers: {r['workers']}
      drop_last: False
  val_data_loader:
    dataset_id: *test
    sampler: &val_sampler
      class_or_func: !import_get
        key: 'torch.utils.data.SequentialSampler'
      kwargs:
    kwargs:
      batch_size: 256
      num_workers: {r['workers']}
      drop_last: False
  optimizer:
    key: 'SGD'
    kwargs:
      lr: {r['lr']}
      momentum: 0.9
      nesterov: True
      weight_decay: {weight_decay}
  scheduler:
{scheduler}
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
{criterion}

test:
  test_data_loader:
    dataset_id: *test
    sampler: *val_sampler
    kwargs:
      batch_size: 256
      num_workers: {r['workers']}
      drop_last: False

runner:
  seed: 0
  mixed_precision: 'no'
  output_dir: '{out_dir}'
"""


def _box_sections(method: str, teacher: str, student: str, r: dict, ckpt: str, out_dir: str):
    """models + train model sections (and criterion) for a zoo method."""
    nc = r['num_classes']
    dd = f"    dst_ckpt: '{out_dir}/torchdistill_ckpt.pt'"
    if method in ('kd', 'fitnets'):
        models = f"""  teacher_model:
    key: 'timm_model'
    kwargs:
      model_name: '{teacher}'
      num_classes: {nc}
      checkpoint: '{ckpt}'
  student_model:
    key: 'timm_model'
    kwargs:
      model_name: '{student}'
      num_classes: {nc}
{dd}"""
        hooks = "\n    forward_hook:\n      input: []\n      output: ['layer2']" if method == 'fitnets' else ''
        proc = f"""  teacher:
    forward_proc: 'forward_batch_only'
    requires_grad: False{hooks}
  student:
    forward_proc: 'forward_batch_only'
    requires_grad: True{hooks}"""
        if method == 'kd':
            criterion = """        kd:
          criterion:
            key: 'KDLoss'
            kwargs:
              student_module_path: '.'
              student_module_io: 'output'
              teacher_module_path: '.'
              teacher_module_io: 'output'
              temperature: 4.0
              alpha: 0.9
              reduction: 'batchmean'
          weight: 1.0"""
        else:
            criterion = CE_CRITERION + """
        hint:
          criterion:
            key: 'MSELoss'
            kwargs:
              reduction: 'mean'
          criterion_wrapper:
            key: 'SimpleLossWrapper'
            kwargs:
              input: {is_from_teacher: False, module_path: 'layer2', io: 'output'}
              target: {is_from_teacher: True, module_path: 'layer2', io: 'output'}
          weight: 1.0"""
        return models, proc, criterion
    if method == 'ce':
        models = f"""  model:
    key: 'timm_model'
    kwargs:
      model_name: '{student}'
      num_classes: {nc}
{dd}"""
        return models, "  model:\n    forward_proc: 'forward_batch_only'", CE_CRITERION
    key = {'cakd': 'cakd_model', 'aps': 'aps_model', 'jointrd-adv': 'jointrd_model',
           'stepwise': 'stepwise_model'}[method]
    extra = {
        'cakd': "      discriminator_depth: 3\n      dropout: 0.3\n      non_saturating: False",
        'aps': "      adversarial_weight: 0.1\n      kd_weight: 1.0\n      kd_temperature: 4.0\n      hidden: 256\n"
               "      label_head: False",
        'jointrd-adv': f"      jointrd:\n        eta_min: {r['eta_min']}\n        eta_horizon_fraction: {r['eta_horizon_fraction']}\n"
                       "        adversarial_weight: 1.0\n        adversarial_non_saturating: True\n"
                       f"        discriminator:\n          lr: 0.001\n          momentum: 0.9\n          weight_decay: 0.0\n"
                       f"          milestones: {r['milestones']}",
        'stepwise': "      interval: 3\n      order: 'input_first'\n      first_removal:\n      mse_weight: 0.35\n"
                    "      ce_weight: 0.65",
    }[method]
    disc = '' if method in ('jointrd-adv', 'stepwise') else (
        f"\n      discriminator:\n        lr: 0.001\n        momentum: 0.9\n        weight_decay: 0.0\n"
        f"        milestones: {r['milestones']}")
    models = f"""  model:
    key: '{key}'
    kwargs:
      teacher:
        model_name: '{teacher}'
        num_classes: {nc}
        checkpoint: '{ckpt}'
      student:
        model_name: '{student}'
        num_classes: {nc}
{extra}{disc}
{dd}"""
    proc = "  pre_epoch_process: 'jointrd_pre_epoch_process'\n  model:\n    forward_proc: 'forward_batch_target'"
    criterion = """        method:
          criterion:
            key: 'MethodLoss'
            kwargs:
              module_path: '.'
          weight: 1.0"""
    return models, proc, criterion


def render_zoo(dataset: str, method: str, teacher: str, student: str, label: str, teacher_run: str,
               weight_decay: float, xu: bool = False) -> str:
    r = settings(dataset)
    name = f'{"xu2017-" if xu else ""}{method}-{label}'
    out_dir = f'runs/{dataset}/{name}'
    models, proc, criterion = _box_sections(method, teacher, student, r, f'runs/{dataset}/{teacher_run}/model', out_dir)
    header = f"# {dataset}: {ZOO_DESCRIPTION[method].format(teacher=teacher, student=student)}."
    if xu:
        header += "\n# Xu et al. 2017's CIFAR setting: student SGD lr 0.1, momentum 0.9, wd 1e-4; D lr 1e-3 on the same schedule."
    return document(dataset, name, header, models, proc, criterion, out_dir, weight_decay)


def documents():
    """Yields (path relative to yamls/, text) for every run config."""
    for dataset, archs in ARCHS.items():
        for arch in archs:
            for method in ('ce', 'plain', 'jointrd'):
                yield f'{dataset}/{method}-{_short(arch)}.yaml', render(dataset, arch, method)
    for dataset, pairs in ZOO.items():
        for teacher, student, label in pairs:
            for method in ('kd', 'fitnets', 'cakd', 'aps', 'jointrd-adv', 'stepwise'):
                yield f'{dataset}/{method}-{label}.yaml', render_zoo(dataset, method, teacher, student, label,
                                                                    f'ce-{label}', settings(dataset)['weight_decay'])
    for dataset, (teacher, student) in XU2017.items():
        wrn = {arch: _short(arch).replace('wide_resnet', 'wrn') for arch in (teacher, student)}
        for arch in (teacher, student):
            yield f'{dataset}/xu2017-ce-{wrn[arch]}.yaml', render_zoo(dataset, 'ce', arch, arch, wrn[arch], '', 1e-4,
                                                                      xu=True)
        label = f'{wrn[teacher]}-to-{wrn[student]}'
        for method in ('kd', 'cakd', 'aps'):
            yield f'{dataset}/xu2017-{method}-{label}.yaml', render_zoo(dataset, method, teacher, student, label,
                                                                        f'xu2017-ce-{wrn[teacher]}', 1e-4, xu=True)


def main(out_dir: Path = HERE):
    for name, text in documents():
        (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(text)


if __name__ == '__main__':
    main()
