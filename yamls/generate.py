"""Writes the run configs of yamls/ (torchdistill format): each is a config built by
``jointrd_timm.training.configs.build_config`` and dumped, so every setting shares its recipe and schedule.

    python yamls/generate.py            # rewrite yamls/
    python yamls/generate.py --check    # exit 1 when a committed YAML differs from what would be written
    python yamls/generate.py --out DIR  # write them under DIR instead

Methods: ``ce`` (residual teacher, cross-entropy), ``plain`` (the twin alone, same recipe and ingredients),
``jointrd`` (the twin with JointRD from the ``ce`` run's teacher), and the distillation zoo on one pair. Everything
about training comes from :mod:`jointrd_timm.recipes`: the schedule of the dataset (``SCHEDULES``: the JointRD
reference's hyperparameters and eta) and the recommended recipe of the architecture (``recipe_for``). This file
only knows the datasets (``DATASETS``: Hub ids, as users get them), the zoo's method settings, and the comments.
"""
import argparse
import dataclasses
import sys
from pathlib import Path

import torch.utils.data as tud

from jointrd_timm.methods import JointRDConfig
from jointrd_timm.recipes import DISCRIMINATOR_SGD, SCHEDULES, ZOO_SETTINGS, recipe_for
from jointrd_timm.training.configs import build_config, dataset_entry, to_yaml

HERE = Path(__file__).parent

# each dataset as users get it (a Hub id, or where ImageNet usually lies) and how it is read; ``schedule`` names its
# training hyperparameters in jointrd_timm.recipes
DATASETS = {
    'cifar10': dict(source='uoft-cs/cifar10', image_column='img', label_column='label', num_classes=10,
                    test_split='test', transform='cifar', input_size=32, workers=2, schedule='cifar'),
    'cifar100': dict(source='uoft-cs/cifar100', image_column='img', label_column='fine_label', num_classes=100,
                     test_split='test', transform='cifar', input_size=32, workers=2, schedule='cifar'),
    'imagenet': dict(source='~/datasets/ilsvrc2012', image_column='image', label_column='label', num_classes=1000,
                     test_split='validation', transform='imagenet', input_size=224, workers=8, schedule='imagenet'),
}
ARCHS = {'cifar10': ['resnet18_cifar', 'resnet34_cifar', 'resnet50_cifar', 'resnet56_cifar', 'resnet110_cifar'],
         'imagenet': ['resnet18', 'resnet34', 'resnet50']}
ARCHS['cifar100'] = ARCHS['cifar10']
# The distillation zoo on one teacher/twin pair (every row trains the same deployable twin), and Xu et al.'s setting
ZOO = {'cifar10': [('resnet56_cifar', 'plain_resnet56_cifar', 'resnet56')],
       'cifar100': [('resnet56_cifar', 'plain_resnet56_cifar', 'resnet56')]}
XU2017 = {'cifar10': ('wide_resnet40_10_cifar', 'wide_resnet10_4_cifar'),
          'cifar100': ('wide_resnet40_10_cifar', 'wide_resnet10_4_cifar')}
XU2017_WEIGHT_DECAY = 1e-4
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
# the zoo's method settings (recipes.ZOO_SETTINGS, shared with the benchmarks); a discriminator gets its own SGD
# (recipes.DISCRIMINATOR_SGD) decaying as the run does
ZOO_MODELS = {
    'cakd': ('cakd_model', dict(ZOO_SETTINGS['cakd'])),
    'aps': ('aps_model', dict(ZOO_SETTINGS['aps'])),
    'jointrd-adv': ('jointrd_model', {}),
    'stepwise': ('stepwise_model', dict(interval=3, order='input_first', first_removal=None, mse_weight=0.35,
                                        ce_weight=0.65)),
}
# JointRD fields the YAMLs state even at their defaults, so that a reader sees them; and the twin's dirac flag
STATED_JOINTRD = ('eta_per_step', 'feature_loss', 'teacher_mode', 'hybrid_paths', 'kd_weight', 'loss_normalization',
                  'shortcut_fade')
# the samplers by torch's public names, as torchdistill's own configs write them
CLASS_NAMES = {tud.RandomSampler: 'torch.utils.data.RandomSampler',
               tud.SequentialSampler: 'torch.utils.data.SequentialSampler'}


def dataset_schedule(dataset: str):
    """The training hyperparameters of ``dataset``'s setting (``recipes.SCHEDULES``)."""
    return SCHEDULES[DATASETS[dataset]['schedule']]


def _short(arch: str) -> str:
    return arch.replace('_cifar', '')


def _stated(model: dict) -> dict:
    """A recipe's model config with the defaults a YAML states: the twin's ``dirac``, the JointRD fields of
    ``STATED_JOINTRD`` and ``init_student_from_teacher``."""
    kwargs = dict(model['kwargs'])
    if 'student' in kwargs:  # jointrd_model, fading_model
        kwargs['student'] = dict(kwargs['student'], dirac=kwargs['student'].get('dirac', False))
    else:  # the twin alone without a fade: a timm_model
        kwargs.setdefault('dirac', False)
    if 'jointrd' in kwargs:
        defaults = {f.name: f.default for f in dataclasses.fields(JointRDConfig) if f.name in STATED_JOINTRD}
        kwargs['jointrd'] = {**kwargs['jointrd'], **{k: v for k, v in defaults.items() if k not in kwargs['jointrd']}}
        kwargs.setdefault('init_student_from_teacher', False)
    return dict(model, kwargs=kwargs)


def run_schedule(dataset: str, arch: str, method: str):
    """The schedule of a run: the setting's; a twin's (``plain``, ``jointrd``) at its recipe's peak learning rate
    (``Recipe.conversion_lr``)."""
    schedule = dataset_schedule(dataset)
    return schedule if method == 'ce' else recipe_for(arch).twin_schedule(schedule)


def recipe_model(dataset: str, arch: str, method: str) -> dict:
    """The model config of a ``ce``, ``plain`` or ``jointrd`` run of ``arch`` with its recommended recipe."""
    num_classes = DATASETS[dataset]['num_classes']
    if method == 'ce':
        return dict(key='timm_model', kwargs=dict(model_name=arch, num_classes=num_classes))
    recipe, checkpoint = recipe_for(arch), f'runs/{dataset}/ce-{_short(arch)}/model'
    if method == 'plain':
        return _stated(recipe.twin_alone_model(arch, checkpoint, num_classes=num_classes))
    return _stated(recipe.jointrd_model(arch, checkpoint, run_schedule(dataset, arch, method), num_classes=num_classes))


def zoo_model(dataset: str, method: str, teacher: str, student: str, checkpoint: str, schedule) -> tuple:
    """(box method, model config, teacher config) of a zoo run."""
    num_classes = DATASETS[dataset]['num_classes']
    teacher_kwargs = dict(model_name=teacher, num_classes=num_classes, checkpoint=checkpoint)
    student_kwargs = dict(model_name=student, num_classes=num_classes)
    if method == 'ce':
        return 'ce', dict(key='timm_model', kwargs=student_kwargs), None
    if method in ('kd', 'fitnets'):
        return method, dict(key='timm_model', kwargs=student_kwargs), dict(key='timm_model', kwargs=teacher_kwargs)
    key, settings = ZOO_MODELS[method]
    discriminator = schedule.side_optimizer(**DISCRIMINATOR_SGD)
    if method == 'jointrd-adv':
        eta = {k: schedule.jointrd[k] for k in ('eta_min', 'eta_horizon_fraction')}  # the setting's reference eta
        settings = dict(jointrd=dict(eta, adversarial_weight=1.0, adversarial_non_saturating=True,
                                     discriminator=discriminator))
    elif method in ('cakd', 'aps'):
        settings = dict(settings, discriminator=discriminator)
    return 'method', dict(key=key, kwargs=dict(teacher=teacher_kwargs, student=student_kwargs, **settings)), None


def render(dataset: str, name: str, header: str, method: str, model: dict, schedule, teacher=None) -> str:
    """One YAML: the comment header, then the config."""
    data = DATASETS[dataset]
    splits = dict(train='train', test=data['test_split'])
    datasets = {role: dataset_entry(source=data['source'], split=split, transform=data['transform'],
                                    input_size=data['input_size'], image_column=data['image_column'],
                                    label_column=data['label_column']) for role, split in splits.items()}
    out_dir = f'runs/{dataset}/{name}'
    config = build_config(datasets, model, schedule, method, teacher=teacher, output_dir=out_dir,
                          num_workers=data['workers'], log_freq=100, dataset_name=dataset,
                          dst_ckpt=f'{out_dir}/torchdistill_ckpt.pt', runner=dict(mixed_precision='no'), terse=True)
    return f"""{header}
# Generated by yamls/generate.py from jointrd_timm/recipes.py (edit them there). Reference recipe: jointrd-method.md.
# A YAML is code: torchdistill runs its !import_call tags when it loads. Run only YAMLs you trust.
# Run: jointrd train --config yamls/{dataset}/{name}.yaml
#  or, unchanged, torchdistill's examples/torchvision/image_classification.py --config <this> --device cpu
# Data: {data['source']} (a Hub id or a local folder; edit datasets.*.init.kwargs.source for a local copy).
# Evaluation is on the test split after every epoch for the record; nothing is selected on it.
""" + to_yaml(config, class_names=CLASS_NAMES)


def recipe_documents(dataset: str, arch: str):
    """(name, text) of the ce, plain and jointrd runs of ``arch``."""
    recipe = recipe_for(arch)
    for method in ('ce', 'plain', 'jointrd'):
        what = DESCRIPTION[method].format(arch=arch, recipe=recipe.id, description=recipe.description)
        header = f"# {dataset}: {what}."
        if method != 'ce':
            header += f"\n# The recipe and what it was measured against: {recipe.record}"
        name = f'{method}-{_short(arch)}'
        box = 'jointrd' if method == 'jointrd' else 'ce'
        yield name, render(dataset, name, header, box, recipe_model(dataset, arch, method),
                           run_schedule(dataset, arch, method))


def zoo_document(dataset: str, method: str, teacher: str, student: str, label: str, teacher_run: str,
                 xu: bool = False):
    """(name, text) of a zoo run (``xu``: Xu et al. 2017's setting)."""
    schedule = dataset_schedule(dataset).replace(weight_decay=XU2017_WEIGHT_DECAY) if xu else dataset_schedule(dataset)
    name = f'{"xu2017-" if xu else ""}{method}-{label}'
    box, model, teacher_model = zoo_model(dataset, method, teacher, student, f'runs/{dataset}/{teacher_run}/model',
                                          schedule)
    header = f"# {dataset}: {ZOO_DESCRIPTION[method].format(teacher=teacher, student=student)}."
    if xu:
        header += ("\n# Xu et al. 2017's CIFAR setting: student SGD lr 0.1, momentum 0.9, wd 1e-4; D lr 1e-3 on the "
                   'same schedule.')
    return name, render(dataset, name, header, box, model, schedule, teacher_model)


def documents():
    """Yields (path relative to yamls/, text) for every run config."""
    for dataset, archs in ARCHS.items():
        for arch in archs:
            for name, text in recipe_documents(dataset, arch):
                yield f'{dataset}/{name}.yaml', text
    for dataset, pairs in ZOO.items():
        for teacher, student, label in pairs:
            for method in ('kd', 'fitnets', 'cakd', 'aps', 'jointrd-adv', 'stepwise'):
                name, text = zoo_document(dataset, method, teacher, student, label, f'ce-{label}')
                yield f'{dataset}/{name}.yaml', text
    for dataset, (teacher, student) in XU2017.items():
        wrn = {arch: _short(arch).replace('wide_resnet', 'wrn') for arch in (teacher, student)}
        for arch in (teacher, student):
            name, text = zoo_document(dataset, 'ce', arch, arch, wrn[arch], '', xu=True)
            yield f'{dataset}/{name}.yaml', text
        label = f'{wrn[teacher]}-to-{wrn[student]}'
        for method in ('kd', 'cakd', 'aps'):
            name, text = zoo_document(dataset, method, teacher, student, label, f'xu2017-ce-{wrn[teacher]}', xu=True)
            yield f'{dataset}/{name}.yaml', text


def main(out_dir: Path = HERE, check: bool = False) -> int:
    """Write every YAML under ``out_dir``; with ``check``, write nothing and return 1 when one differs."""
    stale = []
    for name, text in documents():
        path = Path(out_dir) / name
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        print(f'{len(stale)} YAML(s) differ from what yamls/generate.py writes: {", ".join(stale)}')
    return 1 if stale else 0


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=HERE, help='folder to write into (default: yamls/)')
    parser.add_argument('--check', action='store_true', help='compare with the YAMLs there instead of writing')
    args = parser.parse_args()
    sys.exit(main(args.out, args.check))
