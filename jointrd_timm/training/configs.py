"""torchdistill-format configs built in Python, for the demo and the benchmarks (the YAMLs in yamls/ are the
same structure written out). ``method`` picks the box and the loss:

* ``ce``: TrainingBox, cross-entropy (teacher pre-training, twin trained alone, a ``fading_model``);
* ``jointrd``: TrainingBox with a ``jointrd_model`` and JointRDLoss;
* ``kd``: DistillationBox, torchdistill's KDLoss (Hinton et al. 2015) with a frozen teacher;
* ``fitnets``: DistillationBox, cross-entropy + a FitNets-style hint (MSE between the ``hint_layer`` outputs of
  student and teacher, weight ``hint_weight``; the layers must have equal shapes, as for a twin);
* ``cakd`` / ``aps``: TrainingBox with a ``cakd_model`` / ``aps_model`` and MethodLoss (the module computes its
  loss and steps its own discriminator), like ``jointrd``.
"""
from typing import Dict, Optional

__all__ = ['make_config', 'METHODS']

METHODS = ('ce', 'jointrd', 'kd', 'fitnets', 'cakd', 'aps', 'stepwise')


def _loader(dataset_id: str, batch_size: int, shuffle: bool, num_workers: int, supp: bool = False) -> Dict:
    import torch.utils.data as tud
    return dict(dataset_id=dataset_id, requires_supp=supp,
                sampler=dict(class_or_func=tud.RandomSampler if shuffle else tud.SequentialSampler, kwargs=None),
                kwargs=dict(batch_size=batch_size, num_workers=num_workers, drop_last=False))


def make_config(train_set, test_set, model: Dict, method: str = 'ce', teacher: Optional[Dict] = None,
                epochs: int = 10, batch_size: int = 64, lr: float = 0.1, weight_decay: float = 5e-4,
                schedule: str = 'cosine', seed: int = 0, output_dir: Optional[str] = None, num_workers: int = 0,
                val_set=None, kd_temperature: float = 4.0, kd_alpha: float = 0.9, hint_layer: str = 'layer2',
                hint_weight: float = 1.0) -> Dict:
    """A config dict for :func:`jointrd_timm.training.runner.train`.

    ``model``/``teacher`` are torchdistill model configs (``dict(key='timm_model', kwargs=...)``). ``val_set``
    (default: the test set) is evaluated after each epoch, for the record only.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    if method in ('kd', 'fitnets') and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher model config.")
    datasets = {'train': train_set, 'test': test_set, 'val': val_set if val_set is not None else test_set}
    scheduler = dict(key='CosineAnnealingLR', kwargs=dict(T_max=epochs)) if schedule == 'cosine' else \
        dict(key='MultiStepLR', kwargs=dict(milestones=[epochs // 2, 3 * epochs // 4], gamma=0.1))
    train = dict(
        log_freq=1000, num_epochs=epochs,
        train_data_loader=_loader('train', batch_size, True, num_workers, supp=True),
        val_data_loader=_loader('val', 256, False, num_workers),
        optimizer=dict(key='SGD', kwargs=dict(lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)),
        scheduler=scheduler)
    ce = dict(criterion=dict(key='CrossEntropyLoss', kwargs=dict(reduction='mean')),
              criterion_wrapper=dict(key='SimpleLossWrapper', kwargs=dict(
                  input=dict(is_from_teacher=False, module_path='.', io='output'),
                  target=dict(uses_label=True))), weight=1.0)
    models = {}
    if method == 'ce':
        models['model'] = model
        train['pre_epoch_process'] = 'jointrd_pre_epoch_process'  # progress for a fading_model's shortcut scale
        train['model'] = dict(forward_proc='forward_batch_only', sequential=[], requires_grad=True)
        train['criterion'] = dict(key='WeightedSumLoss', kwargs=dict(sub_terms=dict(ce=ce)))
    elif method in ('jointrd', 'cakd', 'aps', 'stepwise'):
        models['model'] = model
        train['pre_epoch_process'] = 'jointrd_pre_epoch_process'
        train['model'] = dict(forward_proc='forward_batch_target', sequential=[], requires_grad=True)
        train['criterion'] = dict(key='WeightedSumLoss', kwargs=dict(sub_terms=dict(
            jointrd=dict(criterion=dict(key='JointRDLoss', kwargs=dict(module_path='.')), weight=1.0))))
    elif method == 'fitnets':
        models['teacher_model'] = teacher
        models['student_model'] = model
        hook = dict(input=[], output=[hint_layer])
        train['teacher'] = dict(forward_proc='forward_batch_only', sequential=[], requires_grad=False, forward_hook=hook)
        train['student'] = dict(forward_proc='forward_batch_only', sequential=[], requires_grad=True, forward_hook=hook)
        hint = dict(criterion=dict(key='MSELoss', kwargs=dict(reduction='mean')),
                    criterion_wrapper=dict(key='SimpleLossWrapper', kwargs=dict(
                        input=dict(is_from_teacher=False, module_path=hint_layer, io='output'),
                        target=dict(is_from_teacher=True, module_path=hint_layer, io='output'))),
                    weight=hint_weight)
        train['criterion'] = dict(key='WeightedSumLoss', kwargs=dict(sub_terms=dict(ce=ce, hint=hint)))
    else:
        models['teacher_model'] = teacher
        models['student_model'] = model
        train['teacher'] = dict(forward_proc='forward_batch_only', sequential=[], requires_grad=False)
        train['student'] = dict(forward_proc='forward_batch_only', sequential=[], requires_grad=True)
        train['criterion'] = dict(key='WeightedSumLoss', kwargs=dict(sub_terms=dict(kd=dict(
            criterion=dict(key='KDLoss', kwargs=dict(
                student_module_path='.', student_module_io='output', teacher_module_path='.',
                teacher_module_io='output', temperature=kd_temperature, alpha=kd_alpha, reduction='batchmean')),
            weight=1.0))))
    test = dict(test_data_loader=_loader('test', 256, False, num_workers))
    return dict(datasets=datasets, models=models, train=train, test=test,
                runner=dict(seed=seed, output_dir=output_dir))
