"""A run's YAML: loaded (keys checked with a safe loader before torchdistill's tags run), overridden from the
command line, and its numbers checked before anything is built. The ``runner`` section and its defaults are
described in the runner's module docstring and docs/cli.md."""
import copy
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml

from ..errors import InputError, JointRDError
from ..settings import check_ema_decay

__all__ = ['load_config', 'validate', 'apply_overrides', 'num_epochs', 'ConfigError', 'RUNNER_DEFAULTS',
           'MIXED_PRECISION', 'TOP_LEVEL_KEYS', 'TRAIN_KEYS']

MIXED_PRECISION = ('no', 'fp16', 'bf16')
RUNNER_DEFAULTS = dict(seed=0, mixed_precision='no', sync_batchnorm=False, output_dir=None, eval_every=1,
                       find_unused_parameters=False, recalibrate_bn=200, channels_last=False, compile=False,
                       ema_decay=0.0, ema_warmup=True)
TOP_LEVEL_KEYS = {'dependencies', 'datasets', 'models', 'train', 'test', 'runner'}
TRAIN_KEYS = {'log_freq', 'num_epochs', 'train_data_loader', 'val_data_loader', 'teacher', 'student', 'model',
              'optimizer', 'scheduler', 'criterion', 'pre_epoch_process', 'pre_forward_process',
              'post_forward_process', 'post_epoch_process', 'stage1', 'stage2', 'stage3'}


class ConfigError(InputError):
    """The YAML is missing something the runner needs, or has a key or value it does not accept (a ValueError)."""


def _check_keys(section: Dict, allowed, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f'Unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}.')


def apply_overrides(config: Dict, overrides: List[str]) -> Dict:
    """``a.b.c=value`` (value parsed as YAML) into plain config sections (train, test, runner, models). Dataset
    overrides (``datasets.ID.path=value``) are applied by :func:`load_config` before the datasets are built."""
    for path, value in _parse_overrides(overrides):
        keys = path.split('.')
        if keys[0] == 'datasets':
            raise ConfigError(f'{path}: datasets are built while the YAML loads; pass the override to load_config '
                              '(`jointrd train --config YAML datasets.ID.init.kwargs.source=PATH`).')
        node = config
        for key in keys[:-1]:
            if not isinstance(node.get(key, {}), dict):
                raise ConfigError(f'Override {path}: {key} is not a mapping.')
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return config


def _parse_overrides(overrides: List[str]):
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'Override {item!r} is not of the form key.path=value.')
        path, raw = item.split('=', 1)
        if not path.strip() or any(not key for key in path.split('.')):
            raise ConfigError(f'Override {item!r} is not of the form key.path=value (its key path {path!r} has an '
                              'empty part).')
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f'Override {item!r}: its value is not YAML ({" ".join(str(e).split())}); quote a text '
                              "value, write a list as [1, 2], a mapping as {a: 1}.") from e
        yield path, _number(value) if isinstance(value, str) and raw.strip() == value else value


_EXPONENT = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+')


def _number(text: str):
    """``text`` as a float when it is one in exponent notation (``1e-4``: YAML 1.1, PyYAML's, reads it as text unless
    it has a dot), else ``text``."""
    return float(text) if _EXPONENT.fullmatch(text) else text


def _override_datasets(text: str, overrides: List[str], where: str) -> str:
    """The YAML ``text`` with ``datasets.ID.path=value`` overrides applied to its datasets section before any tag
    runs (ID ``*``: every dataset), e.g. ``datasets.*.init.kwargs.source=/data/cifar10`` for a local copy of the
    dataset the YAML names by its Hub id."""
    from .configs import Tagged, read_yaml, to_yaml
    tree = read_yaml(text)
    datasets = tree.get('datasets') or {}
    for path, value in _parse_overrides(overrides):
        _, dataset_id, *keys = path.split('.')
        if not keys:
            raise ConfigError(f'{where}: override {path} needs datasets.ID.key.path=value.')
        ids = list(datasets) if dataset_id == '*' else [dataset_id]
        for name in ids:
            if name not in datasets:
                raise ConfigError(f'{where}: override {path}: no dataset {name!r}; the YAML has {list(datasets)}.')
            node = datasets[name]
            top = node.value if isinstance(node, Tagged) else node
            if isinstance(top, dict) and keys[0] not in top:  # torchdistill would pass it on or drop it unread
                raise ConfigError(f'{where}: override {path}: dataset {name!r} has no key {keys[0]!r}; its keys: '
                                  f'{list(top)} (a local copy of the data: datasets.{dataset_id}.init.kwargs.source='
                                  'PATH).')
            for key in keys[:-1]:
                node = node.value if isinstance(node, Tagged) else node
                if not isinstance(node, dict) or not isinstance(node.get(key, {}), (dict, Tagged)):
                    raise ConfigError(f'{where}: override {path}: {key} is not a mapping.')
                node = node.setdefault(key, {})
            node = node.value if isinstance(node, Tagged) else node
            node[keys[-1]] = value
    return to_yaml(tree)


class _TagsAsPlaceholders(yaml.SafeLoader):
    """A safe loader that reads torchdistill's tags (``!import_call`` ...) as plain data without running them."""


_TagsAsPlaceholders.add_multi_constructor('!', lambda loader, suffix, node: None)


def _peek(path: Path) -> Dict:
    """The YAML's structure, read safely: its keys are checked BEFORE torchdistill's loader runs the tags
    (``!import_call`` imports and calls code while the file loads, e.g. to build the datasets)."""
    try:
        config = yaml.load(path.read_text(), Loader=_TagsAsPlaceholders)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(f'{path} is not valid YAML: {e}') from e
    if not isinstance(config, dict):
        raise ConfigError(f'{path} does not hold a mapping at top level.')
    return check_structure(config, str(path))


_MAPPINGS = ('optimizer', 'scheduler', 'criterion', 'train_data_loader', 'val_data_loader', 'teacher', 'student',
             'model')


def _mapping(value, key: str, where: str) -> Dict:
    """``value`` (a section of the YAML) if it is a mapping or empty, else a ConfigError naming it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f'{where}: {key} must be a mapping (indented key: value lines), got {value!r}.')
    return value


def check_structure(config: Dict, where: str) -> Dict:
    """The sections and keys of a run's config (as read, and again once overrides are applied): the four
    torchdistill sections present, each section a mapping, no unknown key in ``train`` (and its stages) or
    ``runner``, a student model named. Returns ``config``."""
    _check_keys(config, TOP_LEVEL_KEYS, f'{where} (top level)')
    for section in ('datasets', 'models', 'train', 'test'):
        if section not in config:
            raise ConfigError(f'{where} has no `{section}` section; a torchdistill YAML needs datasets, models, '
                              'train and test.')
    for section in ('datasets', 'models', 'train', 'test', 'runner'):
        _mapping(config.get(section), section, where)
    train = config['train'] or {}
    _check_keys(train, TRAIN_KEYS, f'{where}: train')
    sections = [('train', train)]
    for stage in [k for k in train if k.startswith('stage')]:
        section = _mapping(train[stage], f'train.{stage}', where)
        _check_keys(section, TRAIN_KEYS - {'stage1', 'stage2', 'stage3'}, f'{where}: train.{stage}')
        sections.append((f'train.{stage}', section))
    for name, section in sections:
        for key in _MAPPINGS:
            _mapping(section.get(key), f'{name}.{key}', where)
    test = config['test'] or {}
    _mapping(test.get('test_data_loader'), 'test.test_data_loader', where)
    # torchdistill reads an unknown dataset_id as no dataset: a loader of None fails mid-run, a val loader vanishes
    ids = list(config['datasets'] or {})
    loaders = [(f'{name}.{key}', section.get(key)) for name, section in sections
               for key in ('train_data_loader', 'val_data_loader')] + [('test.test_data_loader',
                                                                         test.get('test_data_loader'))]
    for key, loader in loaders:
        dataset_id = (loader or {}).get('dataset_id')
        if dataset_id is not None and dataset_id not in ids:
            raise ConfigError(f'{where}: {key}.dataset_id {dataset_id!r} is not a dataset of the YAML; its datasets: '
                              f'{ids}.')
    _check_keys(config.get('runner') or {}, RUNNER_DEFAULTS, f'{where}: runner')
    models = config['models'] or {}
    if 'student_model' not in models and 'model' not in models:
        raise ConfigError(f'{where}: models needs `student_model` (or `model`).')
    return config


def _where_it_fails(peeked: Dict, overrides: List[str], path: Path) -> str:
    """How the checks' messages name the config: the file, and where the file passes them but the overridden
    config does not, the override(s) that fail alone (all of them where none does alone)."""
    def fails(applied: List[str]) -> bool:
        try:
            validate(check_structure(apply_overrides(copy.deepcopy(peeked), applied), str(path)), where=str(path))
        except ConfigError:
            return True
        return False
    if not overrides or fails([]) or not fails(overrides):
        return str(path)
    culprits = [o for o in overrides if fails([o])] or overrides
    return f'{path} with the override {culprits[0]}' if len(culprits) == 1 else \
        f'{path} with the overrides {" ".join(culprits)}'


def load_config(path, overrides: Optional[List[str]] = None) -> Dict:
    """Load a torchdistill YAML: its keys checked with a safe loader first, then loaded by torchdistill (whose tags
    import and run code: run only YAMLs you trust), its dependencies imported, overrides applied, numbers checked."""
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import import_dependencies
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f'{path} is a folder, not a config file: give the YAML file itself (e.g. '
                          f'{path}/distill.yaml for a run of jointrd distill).')
    if not path.is_file():
        raise ConfigError(f'No config file at {path}.')
    overrides = list(overrides or [])
    data_overrides = [o for o in overrides if o.split('.', 1)[0] == 'datasets']
    overrides = [o for o in overrides if o not in data_overrides]
    peeked = _peek(path)
    # keys and numbers, overrides included, before any tag runs; a failure an override brings names that override
    where = _where_it_fails(peeked, overrides, path)
    validate(check_structure(apply_overrides(peeked, overrides), where), where=where)
    try:
        if data_overrides:
            with tempfile.TemporaryDirectory() as tmp:  # torchdistill loads files: the overridden YAML, briefly
                changed = Path(tmp) / path.name
                changed.write_text(_override_datasets(path.read_text(), data_overrides, str(path)))
                config = yaml_util.load_yaml_file(str(changed))
        else:
            config = yaml_util.load_yaml_file(str(path))
    except (TypeError, ValueError) as e:
        if isinstance(e, JointRDError):
            raise
        # TypeError: an argument its function does not take (a misspelt kwargs key); ValueError: a value it refuses
        # (e.g. an input_size written as text)
        what = 'keys' if isinstance(e, TypeError) else 'values'
        raise ConfigError(f'{path}: a tag of the YAML failed while it loaded ({e}); check the {what} of its `kwargs` '
                          f'(e.g. under datasets.ID.init.kwargs) against the function it calls.') from e
    import_dependencies(config.get('dependencies', None))
    return validate(apply_overrides(config, overrides), where=str(path))


# the number-valued arguments of torch's LR schedulers (and this package's HoldCosineLR)
_SCHEDULER_NUMBERS = frozenset({'T_max', 'T_0', 'T_mult', 'eta_min', 'step_size', 'gamma', 'total_iters', 'factor',
                                'start_factor', 'end_factor', 'max_lr', 'total_steps', 'epochs', 'steps_per_epoch',
                                'pct_start', 'div_factor', 'final_div_factor', 'patience', 'threshold', 'cooldown',
                                'min_lr', 'power', 'base_lr', 'step_size_up', 'step_size_down', 'last_epoch'})

_PER_GROUP = frozenset({'max_lr', 'base_lr', 'min_lr'})  # a number, or one per parameter group


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, key: str, what: str, value, where: str) -> None:
    if not ok:
        hint = (f' (YAML reads {value} as text: write it with a dot, e.g. {float(value)!r})'
                if isinstance(value, str) and _EXPONENT.fullmatch(value) else '')
        raise ConfigError(f'{where}: {key} must be {what} (got {value!r}{hint}); fix the YAML or override it, e.g. '
                          f'{key}=<value>.')


def validate(config: Dict, where: str = 'config') -> Dict:
    """The numbers a run depends on, checked before anything is built (a run of 0 epochs would save an untrained
    model; a string where a number belongs would fail deep inside torch). Returns ``config``."""
    train_config = config.get('train') or {}
    stages = [k for k in train_config if k.startswith('stage')]  # torchdistill's multi-stage training
    sections = [('train', train_config)] + [(f'train.{k}', train_config[k] or {}) for k in stages]
    for name, section in sections:
        # the run length is needed at the top (single stage) or in every stage
        if 'num_epochs' in section or (name == 'train') != bool(stages):
            value = section.get('num_epochs')
            _require(_is_int(value) and value >= 1, f'{name}.num_epochs', 'a whole number >= 1', value, where)
        if 'log_freq' in section:
            _require(_is_int(section['log_freq']) and section['log_freq'] >= 1, f'{name}.log_freq',
                     'a whole number >= 1', section['log_freq'], where)
        loaders = [(f'{name}.{k}', section.get(k)) for k in ('train_data_loader', 'val_data_loader')]
        if name == 'train':
            loaders.append(('test.test_data_loader', (config.get('test') or {}).get('test_data_loader')))
        for key, loader in loaders:
            kwargs = _mapping(_mapping(loader, key, where).get('kwargs'), f'{key}.kwargs', where)
            if 'batch_size' in kwargs:
                _require(_is_int(kwargs['batch_size']) and kwargs['batch_size'] >= 1, f'{key}.kwargs.batch_size',
                         'a whole number >= 1', kwargs['batch_size'], where)
            if 'num_workers' in kwargs:
                _require(_is_int(kwargs['num_workers']) and kwargs['num_workers'] >= 0, f'{key}.kwargs.num_workers',
                         'a whole number >= 0', kwargs['num_workers'], where)
        optimizer = _mapping(section.get('optimizer'), f'{name}.optimizer', where)
        optimizer_kwargs = _mapping(optimizer.get('kwargs'), f'{name}.optimizer.kwargs', where)
        for option in ('lr', 'weight_decay', 'momentum'):
            value = optimizer_kwargs.get(option)
            if value is not None:
                _require(_is_number(value) and value >= 0, f'{name}.optimizer.kwargs.{option}', 'a number >= 0',
                         value, where)
        if 'grad_accum_step' in optimizer:
            _require(_is_int(optimizer['grad_accum_step']) and optimizer['grad_accum_step'] >= 1,
                     f'{name}.optimizer.grad_accum_step', 'a whole number >= 1', optimizer['grad_accum_step'], where)
        if optimizer.get('max_grad_norm') is not None:
            _require(_is_number(optimizer['max_grad_norm']) and optimizer['max_grad_norm'] > 0,
                     f'{name}.optimizer.max_grad_norm', 'a number > 0', optimizer['max_grad_norm'], where)
        scheduler = _mapping(section.get('scheduler'), f'{name}.scheduler', where)
        for option, value in _mapping(scheduler.get('kwargs'), f'{name}.scheduler.kwargs', where).items():
            # torch's schedulers take numbers here and fail on text only at their first step, mid-run
            if option in _SCHEDULER_NUMBERS and value is not None:
                per_group = option in _PER_GROUP and isinstance(value, (list, tuple)) and all(map(_is_number, value))
                _require(_is_number(value) or per_group, f'{name}.scheduler.kwargs.{option}',
                         'a number' + (' or a list of numbers (one per parameter group)' if option in _PER_GROUP
                                       else ''), value, where)
            elif option == 'milestones':
                _require(isinstance(value, (list, tuple)) and all(_is_int(v) for v in value),
                         f'{name}.scheduler.kwargs.milestones', 'a list of whole numbers', value, where)
    if (config.get('runner') or {}).get('mixed_precision') is False:  # YAML 1.1 reads an unquoted `no` as false
        config['runner']['mixed_precision'] = 'no'
    runner = dict(RUNNER_DEFAULTS, **(config.get('runner') or {}))
    _require(_is_int(runner['seed']) and 0 <= runner['seed'] < 2 ** 32, 'runner.seed', 'a whole number in [0, 2**32)',
             runner['seed'], where)
    _require(_is_int(runner['eval_every']) and runner['eval_every'] >= 1, 'runner.eval_every', 'a whole number >= 1',
             runner['eval_every'], where)
    _require(_is_int(runner['recalibrate_bn']) and runner['recalibrate_bn'] >= 0, 'runner.recalibrate_bn',
             'a whole number >= 0 (batches; 0 turns it off)', runner['recalibrate_bn'], where)
    _require(runner['mixed_precision'] in MIXED_PRECISION, 'runner.mixed_precision', f'one of {MIXED_PRECISION}',
             runner['mixed_precision'], where)
    try:
        check_ema_decay(runner['ema_decay'], 'runner.ema_decay')
    except ValueError as e:
        raise ConfigError(f'{where}: {e} Fix the YAML or override it, e.g. runner.ema_decay=0.999.') from None
    for flag in ('sync_batchnorm', 'find_unused_parameters', 'channels_last', 'ema_warmup'):
        _require(isinstance(runner[flag], bool), f'runner.{flag}', 'true or false', runner[flag], where)
    _require(isinstance(runner['compile'], (bool, str)) and runner['compile'] != '', 'runner.compile',
             'true, false or a torch.compile backend name (e.g. inductor, aot_eager)', runner['compile'], where)
    backends = torch.compiler.list_backends(exclude_tags=()) if isinstance(runner['compile'], str) else ()
    if isinstance(runner['compile'], str) and runner['compile'] not in backends:
        raise ConfigError(f'{where}: runner.compile={runner["compile"]!r} is not a torch.compile backend; '
                          f'choose true (inductor) or one of {sorted(backends)}.')
    _require(runner['output_dir'] is None or isinstance(runner['output_dir'], str), 'runner.output_dir',
             'a path', runner['output_dir'], where)
    return config


def num_epochs(config: Dict) -> int:
    """The run's length in epochs: ``train.num_epochs``, or the sum over torchdistill's stages."""
    train_config = config['train']
    stages = [v for k, v in train_config.items() if k.startswith('stage')]
    return sum(stage['num_epochs'] for stage in stages) if stages else train_config['num_epochs']

