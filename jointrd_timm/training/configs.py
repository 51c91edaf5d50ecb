"""A run's config in torchdistill's format, built in one place and written as YAML.

:func:`build_config` turns a schedule (``recipes.Schedule``: batch, SGD, decay, epochs), the datasets, the model
configs and a training method into the config :func:`jointrd_timm.training.runner.train` runs and the YAMLs in
yamls/ hold. ``method`` picks the box and the loss:

* ``ce``: TrainingBox, cross-entropy (teacher pre-training, twin trained alone, a ``fading_model``);
* ``jointrd``: TrainingBox with a ``jointrd_model`` and MethodLoss (the loss the module computes);
* ``method``: TrainingBox with a module that computes its own loss (``cakd_model``, ``aps_model``,
  ``stepwise_model``, a ``jointrd_model`` with an adversarial term) and MethodLoss;
* ``kd``: DistillationBox, torchdistill's KDLoss (Hinton et al. 2015) with a frozen teacher;
* ``fitnets``: DistillationBox, cross-entropy + a FitNets-style hint (MSE between the ``hint_layer`` outputs of
  student and teacher, weight ``hint_weight``; the layers must have equal shapes, as for a twin).

:func:`make_config` is the keyword form the demo and the benchmarks call. :func:`to_yaml` writes a config as a
torchdistill YAML (datasets as ``!import_call`` of ``load_image_dataset``, classes as ``!import_get``);
:func:`read_yaml` reads one back as data, its tags kept and not run.
"""
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Union

from ..settings import Schedule

__all__ = ['build_config', 'make_config', 'METHODS', 'Tagged', 'dataset_entry', 'to_yaml', 'read_yaml',
           'DATASET_LOADER', 'EVAL_BATCH_SIZE']

METHODS = ('ce', 'jointrd', 'kd', 'fitnets', 'cakd', 'aps', 'stepwise')  # make_config's
EVAL_BATCH_SIZE = 256  # the val and test loaders' batch
KD_TEMPERATURE, KD_ALPHA = 4.0, 0.9  # torchdistill's KDLoss (Hinton et al. 2015) in the kd runs
DATASET_LOADER = 'jointrd_timm.training.data.load_image_dataset'
_BOX_METHODS = ('ce', 'jointrd', 'method', 'kd', 'fitnets')
# the loss term of a module that computes its own loss: (sub-term name, registered loss)
_MODULE_LOSS = {'jointrd': ('jointrd', 'MethodLoss'), 'method': ('method', 'MethodLoss')}


def _loader(dataset_id: str, batch_size: int, shuffle: bool, num_workers: int, supp: Optional[bool],
            drop_last: bool = False) -> Dict:
    import torch.utils.data as tud
    loader = dict(dataset_id=dataset_id, requires_supp=supp,
                  sampler=dict(class_or_func=tud.RandomSampler if shuffle else tud.SequentialSampler, kwargs=None),
                  kwargs=dict(batch_size=batch_size, num_workers=num_workers, drop_last=drop_last))
    if supp is None:  # torchdistill's default (False) left unstated
        del loader['requires_supp']
    return loader


def _lone_last_batch(dataset, batch_size: int) -> bool:
    """Whether the last training batch would hold a single image: BatchNorm in training cannot normalise one value
    per channel (a 1x1 map at the end of a stride-32 net on small images, a BatchNorm1d head), so that batch is
    dropped (``drop_last``); any other size is kept (every image trains each epoch)."""
    try:
        return len(dataset) % batch_size == 1 and len(dataset) > 1
    except TypeError:  # no length known (a dataset spec, not a dataset): keep every batch
        return False


def _forward(forward_proc: str, requires_grad: Optional[bool], terse: bool, hook: Optional[Dict] = None) -> Dict:
    """A train.model / teacher / student section (``requires_grad`` None: torchdistill's default, True)."""
    section = dict(forward_proc=forward_proc) if terse else dict(forward_proc=forward_proc, sequential=[])
    if requires_grad is not None:
        section['requires_grad'] = requires_grad
    return dict(section, forward_hook=hook) if hook else section


def _ce_term() -> Dict:
    return dict(criterion=dict(key='CrossEntropyLoss', kwargs=dict(reduction='mean')),
                criterion_wrapper=dict(key='SimpleLossWrapper', kwargs=dict(
                    input=dict(is_from_teacher=False, module_path='.', io='output'),
                    target=dict(uses_label=True))), weight=1.0)


def _criterion(method: str, kd_temperature: float, kd_alpha: float, hint_layer: str, hint_weight: float) -> Dict:
    """The train.criterion section (a WeightedSumLoss) of ``method``."""
    if method == 'ce':
        terms = dict(ce=_ce_term())
    elif method in _MODULE_LOSS:
        name, key = _MODULE_LOSS[method]
        terms = {name: dict(criterion=dict(key=key, kwargs=dict(module_path='.')), weight=1.0)}
    elif method == 'fitnets':
        hint = dict(criterion=dict(key='MSELoss', kwargs=dict(reduction='mean')),
                    criterion_wrapper=dict(key='SimpleLossWrapper', kwargs=dict(
                        input=dict(is_from_teacher=False, module_path=hint_layer, io='output'),
                        target=dict(is_from_teacher=True, module_path=hint_layer, io='output'))),
                    weight=hint_weight)
        terms = dict(ce=_ce_term(), hint=hint)
    else:
        terms = dict(kd=dict(criterion=dict(key='KDLoss', kwargs=dict(
            student_module_path='.', student_module_io='output', teacher_module_path='.', teacher_module_io='output',
            temperature=kd_temperature, alpha=kd_alpha, reduction='batchmean')), weight=1.0))
    return dict(key='WeightedSumLoss', kwargs=dict(sub_terms=terms))


def _models(method: str, model: Dict, teacher: Optional[Dict], terse: bool, hint_layer: str) -> tuple:
    """The models section and the train sections that say how each model runs (and the pre-epoch process)."""
    if method in ('kd', 'fitnets'):
        hook = dict(input=[], output=[hint_layer]) if method == 'fitnets' else None
        return dict(teacher_model=teacher, student_model=model), dict(
            teacher=_forward('forward_batch_only', False, terse, hook),
            student=_forward('forward_batch_only', True, terse, hook))
    # the pre-epoch process hands the epoch to a module with progress (eta, the fade, a discriminator's schedule)
    progress = {} if terse and method == 'ce' and model['key'] == 'timm_model' else \
        dict(pre_epoch_process='jointrd_pre_epoch_process')
    forward_proc = 'forward_batch_only' if method == 'ce' else 'forward_batch_target'
    return dict(model=model), dict(progress, model=_forward(forward_proc, None if terse else True, terse))


def _schedule_runner(schedule: Schedule) -> Dict:
    """The ``runner`` options a schedule sets: its weight average (only when it has one)."""
    return dict(ema_decay=schedule.ema_decay) if schedule.ema_decay else {}


def build_config(datasets: Mapping[str, Any], model: Dict, schedule: Schedule, method: str = 'ce', *,
                 teacher: Optional[Dict] = None, seed: int = 0, output_dir: Optional[str] = None,
                 num_workers: int = 0, log_freq: int = 1000, kd_temperature: float = KD_TEMPERATURE,
                 kd_alpha: float = KD_ALPHA, hint_layer: str = 'layer2', hint_weight: float = 1.0,
                 dataset_name: Optional[str] = None,
                 dst_ckpt: Optional[str] = None, runner: Optional[Mapping] = None, terse: bool = False) -> Dict:
    """A run's config: ``schedule`` gives the batch, the optimizer, the lr scheduler and the epochs.

    Args:
        datasets: ``train`` and ``test`` (and ``val``: the per-epoch record reads it, else the test set): dataset
            objects, or :func:`dataset_entry` for a YAML. Their ids are ``<dataset_name>/<role>`` when a name is given.
        model, teacher: torchdistill model configs (``dict(key='timm_model', kwargs=...)``); ``teacher`` for kd and
            fitnets only.
        dst_ckpt: where torchdistill's example script saves the trained model (stated in the YAMLs only).
        runner: more ``runner`` options (mixed_precision, channels_last, ...).
        terse: leave out what torchdistill assumes anyway (``sequential: []``, the trained model's
            ``requires_grad: true``, an eval loader's ``requires_supp: false``) and the pre-epoch process of a plain
            timm model, as the YAMLs in yamls/ do.
    """
    if method not in _BOX_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, _BOX_METHODS))}, got {method!r}.")
    if method in ('kd', 'fitnets') and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher model config.")
    ids = {role: f'{dataset_name}/{role}' if dataset_name else role for role in datasets}
    trained = dict(model, dst_ckpt=dst_ckpt) if dst_ckpt else model
    models, sections = _models(method, trained, teacher, terse, hint_layer)
    if schedule.decay == 'hold-cosine' and method not in ('kd', 'fitnets'):
        # HoldCosineLR learns the run length there (under torchdistill's own script too)
        sections.setdefault('pre_epoch_process', 'jointrd_pre_epoch_process')
    eval_supp = None if terse else False
    train = dict(log_freq=log_freq, num_epochs=schedule.epochs,
                 train_data_loader=_loader(ids['train'], schedule.batch_size, True, num_workers, supp=True,
                                           drop_last=_lone_last_batch(datasets['train'], schedule.batch_size)),
                 val_data_loader=_loader(ids.get('val', ids['test']), EVAL_BATCH_SIZE, False, num_workers, eval_supp),
                 optimizer=schedule.optimizer(), scheduler=schedule.scheduler(), **sections,
                 criterion=_criterion(method, kd_temperature, kd_alpha, hint_layer, hint_weight))
    test = dict(test_data_loader=_loader(ids['test'], EVAL_BATCH_SIZE, False, num_workers, eval_supp))
    return dict(datasets={ids[role]: data for role, data in datasets.items()}, models=models, train=train,
                test=test,
                runner={'seed': seed, 'output_dir': output_dir, **_schedule_runner(schedule), **(runner or {})})


def make_config(train_set, test_set, model: Dict, method: str = 'ce', teacher: Optional[Dict] = None,
                epochs: Optional[int] = None, batch_size: Optional[int] = None, lr: Optional[float] = None,
                weight_decay: Optional[float] = None, schedule: Union[str, Schedule] = 'cosine', seed: int = 0,
                output_dir: Optional[str] = None, num_workers: int = 0, val_set=None,
                kd_temperature: float = KD_TEMPERATURE, kd_alpha: float = KD_ALPHA, hint_layer: str = 'layer2',
                hint_weight: float = 1.0) -> Dict:
    """:func:`build_config` in keywords. ``schedule``: a :class:`~jointrd_timm.recipes.Schedule` (its epochs,
    batch, lr, weight decay and decay; e.g. ``Recipe.twin_schedule(...)`` for a twin), or, with the keywords
    ``epochs`` (default 10), ``batch_size`` (64), ``lr`` (0.1) and ``weight_decay`` (5e-4), the decay: 'cosine'
    or x 0.1 at half and three quarters of the run ('multistep'). ``val_set`` (default: the test set) is
    evaluated after each epoch, for the record only."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}.")
    keywords = dict(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay)
    if isinstance(schedule, Schedule):
        given = [k for k, v in keywords.items() if v is not None]
        if given:
            raise ValueError(f'make_config: give the schedule ({schedule.name!r}) or {given}, not both: '
                             f'schedule.replace({given[0]}=...) changes a schedule.')
        run = schedule
    elif schedule in ('cosine', 'multistep'):
        defaults = dict(epochs=10, batch_size=64, lr=0.1, weight_decay=5e-4)
        keywords = {k: defaults[k] if v is None else v for k, v in keywords.items()}
        epochs = keywords['epochs']
        decay = dict(decay='multistep', milestones=(epochs // 2, 3 * epochs // 4)) if schedule == 'multistep' else {}
        run = Schedule('make_config', **keywords, **decay)
    else:
        raise ValueError(f"schedule must be a Schedule, 'cosine' or 'multistep', got {schedule!r}.")
    datasets = dict(train=train_set, test=test_set, val=val_set if val_set is not None else test_set)
    return build_config(datasets, model, run, 'jointrd' if method in ('cakd', 'aps', 'stepwise') else method,
                        teacher=teacher, seed=seed, output_dir=output_dir, num_workers=num_workers,
                        kd_temperature=kd_temperature, kd_alpha=kd_alpha, hint_layer=hint_layer,
                        hint_weight=hint_weight)


# -- YAML ---------------------------------------------------------------------------------------------------------
@dataclass
class Tagged:
    """A YAML node with a torchdistill tag (``!import_call``, ``!import_get``): written as such, read back as such."""
    tag: str
    value: Any


def dataset_entry(**kwargs) -> Tagged:
    """A datasets entry of a YAML: ``load_image_dataset(**kwargs)``, called by torchdistill when the YAML loads."""
    return Tagged('!import_call', dict(key=DATASET_LOADER, init=dict(kwargs=kwargs)))


def _plain(node, class_names: Mapping[type, str]):
    """YAML-ready data: classes as ``!import_get`` of their import path."""
    if isinstance(node, type):
        return Tagged('!import_get', dict(key=class_names.get(node, f'{node.__module__}.{node.__qualname__}')))
    if isinstance(node, dict):
        return {k: _plain(v, class_names) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v, class_names) for v in node]
    return node


def to_yaml(config: Dict, datasets: Optional[Mapping[str, Dict]] = None,
            class_names: Optional[Mapping[type, str]] = None) -> str:
    """``config`` as a torchdistill YAML (without comments). ``datasets``: ``load_image_dataset`` kwargs per id,
    written in place of the config's dataset objects; ``class_names``: the import path to write for a class (default:
    its defining module's)."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # every node written out, no &id001 anchors
            return True

    def tagged(dumper, node):
        if isinstance(node.value, dict):
            return dumper.represent_mapping(node.tag, node.value)
        if isinstance(node.value, list):
            return dumper.represent_sequence(node.tag, node.value)
        return dumper.represent_scalar(node.tag, '' if node.value is None else str(node.value))

    Dumper.add_representer(Tagged, tagged)
    sections = {k: v for k, v in config.items() if k not in ('dependencies', 'datasets')}
    entries = config['datasets'] if datasets is None else \
        {name: dataset_entry(**kwargs) for name, kwargs in datasets.items()}
    document = dict(dependencies=config.get('dependencies', [dict(name='jointrd_timm')]), datasets=entries,
                    **_plain(sections, class_names or {}))
    return yaml.dump(document, Dumper=Dumper, sort_keys=False, width=120)


def read_yaml(text: str) -> Dict:
    """A torchdistill YAML as data: its tags kept as :class:`Tagged` (nothing is imported or run)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def tagged(loader, suffix, node):
        construct = {yaml.MappingNode: loader.construct_mapping, yaml.SequenceNode: loader.construct_sequence}
        value = construct[type(node)](node, deep=True) if type(node) in construct else loader.construct_scalar(node)
        return Tagged('!' + suffix, value)

    Loader.add_multi_constructor('!', tagged)
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass
