"""The runner: torchdistill's training/distillation boxes driven by Hugging Face accelerate.

One process on CPU or GPU, or many (``torchrun --nproc_per_node N -m jointrd_timm.cli train ...`` or
``accelerate launch``): DDP over gloo on CPU, NCCL on GPU. The YAML is torchdistill's format (datasets, models,
train, test) plus an optional ``runner`` section that torchdistill's own example script ignores:

    runner:
      seed: 0                      # set on every process (accelerate.utils.set_seed)
      mixed_precision: 'no'        # 'no' | 'fp16' | 'bf16' (the Accelerator's business)
      sync_batchnorm: false        # convert the trained model's BatchNorm to SyncBatchNorm (multi-process)
      output_dir: runs/<name>      # metrics.jsonl, last.safetensors (checkpoint), final.json, model/
      eval_every: 1                # epochs between evaluations on train.val_data_loader (never used to select)
      recalibrate_bn: 200          # batches of training data that recompute a faded twin's BN statistics (0: off)
      channels_last: false         # models and image batches in channels_last (NHWC) memory format
      compile: false               # torch.compile the models' modules: true (inductor) or a backend name

DECISION: the YAML's ``batch_size`` is the GLOBAL batch; with N processes each gets batch_size / N of it
(accelerate ``split_batches``), and the shuffle order depends only on (seed, epoch) (accelerate's seedable
sampler), so a run's optimisation does not depend on the process count, and a resumed run repeats its epochs. Gradient
accumulation is torchdistill's ``optimizer.grad_accum_step``.

``train`` reads like accelerate's examples: :func:`setup` (numbers checked, output folder claimed, models, boxes,
checkpoint when resuming), :func:`train_one_epoch` per epoch, :func:`finish`. Per epoch: a progress bar (loss,
accuracy, lr, and eta for JointRD), a checkpoint written atomically (model, optimizer(s), scheduler(s), epoch, RNG,
the metrics history), then one JSON line in ``metrics.jsonl``. ``--resume`` continues from the checkpoint exactly.
After the last epoch the test split is evaluated once, the final model is saved in timm's Hub format, and
``final.json`` is written last.

DECISION: a twin whose shortcuts faded during the run gets its BatchNorm statistics recomputed before it is
evaluated and saved (:func:`recalibrate_batchnorm`, ``runner.recalibrate_bn`` batches of the training data, no
gradients). The running statistics are moving averages over the run: while ``s`` falls they follow a network that is
not the deployed one, and a run whose fade ends close to its last step (a short run, or ``shortcut_fade`` near 1)
would deploy statistics of a residual net. Statistics of the deployed network itself cost a fraction of an epoch of
forward passes; ``final.json`` keeps ``test_acc`` (the model as trained) beside ``test_acc_folded`` (deployed). The output folder belongs to the run (``run_folder``: writability, lock, no silent
replacement; docs/reliability.md).

``channels_last`` puts every model's 4-D weights and every 4-D input in NHWC memory format (the convs' fast layout
with cuDNN under mixed precision, and for oneDNN on many CPUs; off by default because what it saves depends on the
device: measure it). The function is the same; checkpoints and the saved model hold contiguous tensors.

``compile`` (:func:`compile_modules`) compiles, in place (``nn.Module.compile``: parameter names, checkpoints and
the saved model are unchanged), a plain model whole, and for a method module (JointRD, the fading student, the
adversarial methods) each top-level child of its twin and of its teacher: the stem, the stages and the head, which
both the twin's own forward and JointRD's stage split call. The methods' own Python (the fade's per-step scale, a
buffer that compiled code reads; the hybrid paths; lean memory's autograd functions; the discriminators' steps)
stays eager around them, so nothing in it breaks a graph, and the BN-folded teacher tails (custom autograd
functions) stay eager. Off by default: measured on CPU in benchmarks/results/training_cost_compile.md.
"""
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from ..methods import base as method_api
from ..twins.dirac import has_dirac
from ..twins.fade import deployable, is_fading
from .checkpoint import atomic_write, load_checkpoint, load_weights, save_checkpoint
from ..faults import fault_point
from .run_folder import RunFolder, RunFolderError, checkpoint_epochs

__all__ = ['train', 'setup', 'train_one_epoch', 'finish', 'evaluate', 'recalibrate_batchnorm', 'to_channels_last',
           'load_config', 'validate', 'ConfigError', 'compile_modules',
           'RunFolderError', 'RUNNER_DEFAULTS']

_logger = logging.getLogger(__name__)

MIXED_PRECISION = ('no', 'fp16', 'bf16')
RUNNER_DEFAULTS = dict(seed=0, mixed_precision='no', sync_batchnorm=False, output_dir=None, eval_every=1,
                       find_unused_parameters=False, recalibrate_bn=200, channels_last=False, compile=False)
TOP_LEVEL_KEYS = {'dependencies', 'datasets', 'models', 'train', 'test', 'runner'}
TRAIN_KEYS = {'log_freq', 'num_epochs', 'train_data_loader', 'val_data_loader', 'teacher', 'student', 'model',
              'optimizer', 'scheduler', 'criterion', 'pre_epoch_process', 'pre_forward_process',
              'post_forward_process', 'post_epoch_process', 'stage1', 'stage2', 'stage3'}


class ConfigError(ValueError):
    """The YAML is missing something the runner needs, or has a key it does not know."""


def _check_keys(section: Dict, allowed, where: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ConfigError(f'Unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}.')


def apply_overrides(config: Dict, overrides: List[str]) -> Dict:
    """``a.b.c=value`` (value parsed as YAML) into plain config sections (train, test, runner, models)."""
    import yaml
    for item in overrides:
        if '=' not in item:
            raise ConfigError(f'Override {item!r} is not of the form key.path=value.')
        path, raw = item.split('=', 1)
        keys = path.split('.')
        if keys[0] == 'datasets':
            raise ConfigError(f'{path}: datasets are built while the YAML loads, so they cannot be overridden on the '
                              'command line; edit the datasets section of the YAML (or let `jointrd distill --data '
                              'SOURCE` write one for your data).')
        node = config
        for key in keys[:-1]:
            if not isinstance(node.get(key, {}), dict):
                raise ConfigError(f'Override {path}: {key} is not a mapping.')
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return config


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
    _check_keys(config, TOP_LEVEL_KEYS, f'{path} (top level)')
    for section in ('datasets', 'models', 'train', 'test'):
        if section not in config:
            raise ConfigError(f'{path} has no `{section}` section; a torchdistill YAML needs datasets, models, '
                              'train and test.')
    _check_keys(config['train'] or {}, TRAIN_KEYS, f'{path}: train')
    _check_keys(config.get('runner') or {}, RUNNER_DEFAULTS, f'{path}: runner')
    models = config['models'] or {}
    if 'student_model' not in models and 'model' not in models:
        raise ConfigError(f'{path}: models needs `student_model` (or `model`).')
    return config


def load_config(path, overrides: Optional[List[str]] = None) -> Dict:
    """Load a torchdistill YAML: its keys checked with a safe loader first, then loaded by torchdistill (whose tags
    import and run code: run only YAMLs you trust), its dependencies imported, overrides applied, numbers checked."""
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import import_dependencies
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'No config file at {path}.')
    peeked = _peek(path)
    validate(apply_overrides(peeked, list(overrides or [])), where=str(path))  # numbers, before any tag runs
    config = yaml_util.load_yaml_file(str(path))
    import_dependencies(config.get('dependencies', None))
    return validate(apply_overrides(config, overrides or []), where=str(path))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(ok: bool, key: str, what: str, value, where: str) -> None:
    if not ok:
        raise ConfigError(f'{where}: {key} must be {what} (got {value!r}); fix the YAML or override it, e.g. '
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
            kwargs = (loader or {}).get('kwargs') or {} if isinstance(loader, dict) else {}
            if 'batch_size' in kwargs:
                _require(_is_int(kwargs['batch_size']) and kwargs['batch_size'] >= 1, f'{key}.kwargs.batch_size',
                         'a whole number >= 1', kwargs['batch_size'], where)
            if 'num_workers' in kwargs:
                _require(_is_int(kwargs['num_workers']) and kwargs['num_workers'] >= 0, f'{key}.kwargs.num_workers',
                         'a whole number >= 0', kwargs['num_workers'], where)
        optimizer = section.get('optimizer') or {}
        lr = (optimizer.get('kwargs') or {}).get('lr')
        if lr is not None:
            _require(_is_number(lr) and lr >= 0, f'{name}.optimizer.kwargs.lr', 'a number >= 0', lr, where)
        if 'grad_accum_step' in optimizer:
            _require(_is_int(optimizer['grad_accum_step']) and optimizer['grad_accum_step'] >= 1,
                     f'{name}.optimizer.grad_accum_step', 'a whole number >= 1', optimizer['grad_accum_step'], where)
        if optimizer.get('max_grad_norm') is not None:
            _require(_is_number(optimizer['max_grad_norm']) and optimizer['max_grad_norm'] > 0,
                     f'{name}.optimizer.max_grad_norm', 'a number > 0', optimizer['max_grad_norm'], where)
    runner = dict(RUNNER_DEFAULTS, **(config.get('runner') or {}))
    _require(_is_int(runner['seed']) and 0 <= runner['seed'] < 2 ** 32, 'runner.seed', 'a whole number in [0, 2**32)',
             runner['seed'], where)
    _require(_is_int(runner['eval_every']) and runner['eval_every'] >= 1, 'runner.eval_every', 'a whole number >= 1',
             runner['eval_every'], where)
    _require(_is_int(runner['recalibrate_bn']) and runner['recalibrate_bn'] >= 0, 'runner.recalibrate_bn',
             'a whole number >= 0 (batches; 0 turns it off)', runner['recalibrate_bn'], where)
    _require(runner['mixed_precision'] in MIXED_PRECISION, 'runner.mixed_precision', f'one of {MIXED_PRECISION}',
             runner['mixed_precision'], where)
    for flag in ('sync_batchnorm', 'find_unused_parameters', 'channels_last'):
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


def _channels_last_inputs(module: nn.Module, args: tuple):
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                 for a in args)


def compile_modules(module: nn.Module, backend='inductor') -> List[str]:
    """``torch.compile`` in place what a training step of ``module`` spends its time in (see the module docstring):
    the model whole, or for a method module each top-level child of its twin and teacher. Returns the names of the
    compiled modules. ``backend``: a torch.compile backend (True: inductor)."""
    backend = 'inductor' if backend is True else backend
    if not isinstance(module, method_api.TrainingMethod):
        module.compile(backend=backend)
        return ['model']
    compiled = []
    for role in ('student', 'teacher'):
        model = getattr(module, role, None)
        if not isinstance(model, nn.Module):
            continue
        for name, child in model.named_children():
            if any(True for _ in child.parameters()) or any(True for _ in child.children()):
                child.compile(backend=backend)
                compiled.append(f'{role}.{name}')
    return compiled


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` in place with its 4-D parameters and buffers in channels_last memory format, and a forward pre-hook
    that hands it its 4-D tensor arguments in that format (what ``runner.channels_last`` does)."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_inputs)
    return model


def _build_model(model_config: Dict, name: str = 'model') -> nn.Module:
    import inspect
    from torchdistill.models.registry import MODEL_DICT, get_model
    from ..integrations import torchdistill as _registers  # noqa: F401  (timm_model, jointrd_model, ...)
    if 'key' not in model_config:
        raise ConfigError(f'models.{name} needs `key` (a torchdistill model key, e.g. timm_model); got {model_config}.')
    key, repo = model_config['key'], model_config.get('repo_or_dir')
    if key not in MODEL_DICT and repo is None:
        raise ConfigError(f'models.{name}: unknown model key {key!r}. jointrd_timm registers '
                          f'{sorted(k for k in MODEL_DICT if MODEL_DICT[k].__module__.startswith("jointrd_timm"))}; '
                          'a YAML selects them with `dependencies: [{name: jointrd_timm}]`.')
    kwargs = model_config.get('kwargs') or {}
    try:
        model = get_model(key, repo, **kwargs)
    except TypeError as e:
        if 'argument' not in str(e):
            raise
        builder = MODEL_DICT.get(key)
        takes = f' {key}{inspect.signature(builder)}' if builder is not None else ''
        raise ConfigError(f'models.{name}.kwargs do not fit {key}: {e}.{takes and " It takes" + takes + "."}') from e
    if model_config.get('src_ckpt'):
        load_weights(model, model_config['src_ckpt'])
    return model


def _logits(output):
    return output['logits'] if isinstance(output, dict) else output


class _OutputTap:
    """Keeps the last logits of a model's forward, for the running training accuracy."""

    def __init__(self, model: nn.Module):
        self.logits = None
        model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.logits = _logits(output).detach() if module.training else None


@torch.no_grad()
def evaluate(model: nn.Module, data_loader, accelerator) -> float:
    """Top-1 accuracy (%) over the whole loader, gathered over processes."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, targets in data_loader:
        preds = _logits(model(images)).argmax(1)
        preds, targets = accelerator.gather_for_metrics((preds, targets))
        correct += int((preds == targets).sum())
        total += int(targets.numel())
    model.train(was_training)
    return 100.0 * correct / max(1, total)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data_loader, batches: int, accelerator=None, seed: int = 0) -> int:
    """Recompute the running statistics of every BatchNorm in ``model`` as the plain average over ``batches``
    batches of ``data_loader`` (all of it when shorter), the other modules in eval mode (no dropout, no stochastic
    depth), no gradients. The data order and augmentations are drawn from a generator seeded with ``seed`` and the
    global RNG is left as it was, so the result is reproducible and training is not disturbed. With several
    processes each one averages its shard and the statistics are then averaged over processes. Returns the number
    of batches used (0 when the model has no BatchNorm)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or batches <= 0:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    used = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for batch in data_loader:
                if used >= batches:
                    break
                model(batch[0])
                used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        for m in norms:
            m.running_mean.copy_(accelerator.reduce(m.running_mean.clone(), 'mean'))
            m.running_var.copy_(accelerator.reduce(m.running_var.clone(), 'mean'))
    return used


def replica_divergence(module: nn.Module) -> float:
    """Largest |difference| between any parameter on this process and on process 0 (0.0 when single-process).
    DDP keeps the student in step; the discriminators' own optimizers stay in step only because their gradients
    are all-reduced, so this is checked at the end of every multi-process run."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    worst = torch.zeros(())
    for p in module.parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, 0)
        worst = torch.maximum(worst, (p.detach() - reference).abs().max().float().cpu())
    worst = worst.to(next(module.parameters()).device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _make_accelerator(runner: Dict, device: Optional[str]):
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    # accelerate keeps one AcceleratorState per process; successive runs in one process (the demo, benchmarks)
    # may differ in mixed precision, so start each from a fresh state (the process group is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=device == 'cpu', mixed_precision=runner['mixed_precision'],
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=runner['find_unused_parameters'])])


class _Run:
    """What one run holds between setup, its epochs and its end."""

    def __init__(self, runner: Dict, out: Path, folder: RunFolder):
        self.runner, self.out, self.folder = runner, out, folder
        self.accelerator = self.box = self.trained = self.module = self.tap = None
        self.optimizers, self.schedulers, self.history = {}, {}, []  # history: the metrics records so far
        self.start_epoch, self.val_accuracy = 0, None
        self.done: Optional[Dict] = None  # a resumed run that had already finished: its final.json


def train(config: Dict, output_dir: Optional[str] = None, resume: bool = False, device: Optional[str] = None,
          overwrite: bool = False) -> Dict:
    """Train as the YAML says; returns the final metrics (also written to ``<output_dir>/final.json``).

    The output folder is this run's (``run_folder``): a folder holding a run is refused unless ``resume`` (continue
    it exactly) or ``overwrite`` (replace it, deleted once this run has saved its first epoch)."""
    run = setup(config, output_dir, resume, device, overwrite)
    try:
        if run.done is not None:
            return run.done
        for epoch in range(run.start_epoch, run.box.num_epochs):
            train_one_epoch(run, config, epoch)
        return finish(run, config)
    finally:
        if run.folder is not None:
            run.folder.release()


def _is_main_process() -> bool:
    # before accelerate starts (torchrun and accelerate launch set RANK): the folder is claimed by rank 0 only
    return int(os.environ.get('RANK', '0')) == 0


def setup(config: Dict, output_dir: Optional[str], resume: bool, device: Optional[str], overwrite: bool) -> _Run:
    """Numbers checked, output folder claimed, then models, boxes, optimisers, and the checkpoint when resuming."""
    from accelerate.utils import set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.training import get_training_box
    from ..integrations.torchdistill import accelerator_for_boxes, check_pair
    from ..io import unwrap

    validate(config)
    runner = dict(RUNNER_DEFAULTS, **(config.get('runner') or {}))
    out = Path(output_dir or runner['output_dir'] or 'runs/default')
    run = _Run(runner, out, RunFolder(out, resume=resume, overwrite=overwrite, say=print))
    if _is_main_process():
        run.folder.claim()
    try:
        run.accelerator = accelerator = _make_accelerator(runner, device)
        if resume and _already_finished(run, config):
            return run
        set_seed(runner['seed'])
        models = config['models']
        teacher = _build_model(models['teacher_model'], 'teacher_model') if 'teacher_model' in models else None
        name = 'student_model' if 'student_model' in models else 'model'
        student = _build_model(models[name], name)
        if teacher is not None:
            check_pair(teacher, student, 'models.teacher_model / models.student_model')
        if runner['sync_batchnorm'] and accelerator.device.type != 'cuda':
            raise ConfigError('runner.sync_batchnorm needs CUDA devices (torch.nn.SyncBatchNorm does not run on CPU); '
                              'on CPU use a BatchNorm-free model (e.g. norm_layer: groupnorm1) or sync_batchnorm: false.')
        if runner['sync_batchnorm']:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        if runner['channels_last']:
            for model in (teacher, student):
                if model is not None:
                    to_channels_last(model)
        # accelerate owns the processes (sharded loaders, DDP): the boxes must not add samplers or wrappers themselves
        box_args = (config['datasets'], config['train'], accelerator.device, None, False, 1)
        if teacher is None:
            run.box = get_training_box(student, *box_args, accelerator=accelerator_for_boxes(accelerator))
            run.trained = run.box.model
        else:
            run.box = get_distillation_box(teacher, student, *box_args, accelerator=accelerator_for_boxes(accelerator))
            run.trained = run.box.student_model
        run.module = unwrap(run.trained)
        if runner['compile']:
            compile_modules(run.module, runner['compile'])
        run.tap = _OutputTap(run.module)
        run.optimizers = dict(model=run.box.optimizer, **method_api.extra_optimizers(run.module))
        run.schedulers = dict(model=run.box.lr_scheduler, **method_api.extra_schedulers(run.module))
        if resume:
            _resume(run)
    except BaseException:
        run.folder.release()
        raise
    return run


def _already_finished(run: _Run, config: Dict) -> bool:
    """--resume of a finished run returns its final.json; of a run given more epochs since, it continues (the
    shorter run's final.json and model/ are removed first, so nothing reads them as this run's result)."""
    final = run.out / 'final.json'
    if not final.is_file():
        return False
    saved = checkpoint_epochs(run.folder.checkpoint)
    num_epochs = _num_epochs(config)
    if saved is not None and saved >= num_epochs:
        run.accelerator.print(f'{run.out} holds a finished run of {saved} epoch(s); nothing to resume.')
        run.done = json.loads(final.read_text())
        return True
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.accelerator.print(f'Extending the finished run in {run.out} from {saved} to {num_epochs} epochs: its '
                              'final.json and model/ are removed until this run ends.')
        final.unlink()
        shutil.rmtree(run.out / 'model', ignore_errors=True)
    run.accelerator.wait_for_everyone()
    return False


def _num_epochs(config: Dict) -> int:
    train_config = config['train']
    stages = [v for k, v in train_config.items() if k.startswith('stage')]
    return sum(stage['num_epochs'] for stage in stages) if stages else train_config['num_epochs']


def _resume(run: _Run) -> None:
    """Restore the checkpoint; metrics.jsonl is rewritten from the history the checkpoint holds, so a kill between
    the checkpoint and its metrics line, or in the middle of a line, leaves neither a gap nor a duplicate."""
    state = load_checkpoint(run.folder.checkpoint, run.module, run.optimizers, run.schedulers)
    done = state['epoch'] + 1
    if done > run.box.num_epochs:
        raise ConfigError(f'{run.folder.checkpoint} holds {done} epochs, more than train.num_epochs='
                          f'{run.box.num_epochs}; resume with train.num_epochs={done} or more.')
    run.start_epoch = done
    history = state['extra'].get('history')
    # a checkpoint written before checkpoints carried the history: keep the file's records of the epochs it holds
    run.history = list(history) if history is not None else _metrics_on_file(run.out / 'metrics.jsonl', done)
    run.val_accuracy = next((r['val_acc'] for r in reversed(run.history) if 'val_acc' in r), None)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        _rewrite_metrics(run.out / 'metrics.jsonl', run.history)
    then = f'continuing with epoch {done + 1}' if done < run.box.num_epochs else 'finishing (test, final save)'
    run.accelerator.print(f'Resumed from {run.folder.checkpoint}: {done} of {run.box.num_epochs} epoch(s) done, '
                          f'{then}.')


def _metrics_on_file(path: Path, epochs: int) -> List[Dict]:
    """The last readable record of each epoch 1..``epochs`` in a metrics file (a torn last line is skipped)."""
    records = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get('epoch'), int) and 1 <= record['epoch'] <= epochs:
            records[record['epoch']] = record
    return [records[e] for e in sorted(records)]


def _rewrite_metrics(path: Path, history: List[Dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(''.join(json.dumps(r) + '\n' for r in history)))


def train_one_epoch(run: _Run, config: Dict, epoch: int) -> None:
    """One pass over the training data, an evaluation every ``eval_every`` epochs, then the checkpoint and its
    metrics line (in that order: the checkpoint carries the history the line is rewritten from after a kill)."""
    box, accelerator, module, tap = run.box, run.accelerator, run.module, run.tap
    num_epochs = box.num_epochs
    start = time.time()
    box.pre_epoch_process(epoch=epoch)
    if hasattr(box.train_data_loader, 'set_epoch'):  # the shuffle order depends on (seed, epoch) only
        box.train_data_loader.set_epoch(epoch)
    loss_sum, correct, seen = 0.0, 0, 0
    bar = tqdm(box.train_data_loader, desc=f'epoch {epoch + 1}/{num_epochs}',
               disable=not accelerator.is_local_main_process, leave=False, dynamic_ncols=True)
    for batch in bar:
        images, targets, supp = batch if len(batch) == 3 else (*batch, {})
        loss = box.forward_process(images, targets, supp)
        box.post_forward_process(loss=loss)
        fault_point('step')
        if not torch.isfinite(loss):
            raise FloatingPointError(f'Loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate '
                                     'or check the data.')
        loss_sum += float(loss.detach()) * len(targets)
        seen += len(targets)
        if tap.logits is not None:
            correct += int((tap.logits.argmax(1) == targets).sum())
        postfix = dict(loss=f'{loss_sum / seen:.3f}', acc=f'{100 * correct / seen:.1f}',
                       lr=f'{box.optimizer.param_groups[0]["lr"]:.3g}')
        postfix.update((k, f'{v:.3f}') for k, v in method_api.epoch_metrics(module).items())
        bar.set_postfix(postfix)
    box.post_epoch_process()
    record = dict(epoch=epoch + 1, train_loss=loss_sum / max(1, seen), train_acc=100 * correct / max(1, seen),
                  lr=box.optimizer.param_groups[0]['lr'], seconds=round(time.time() - start, 2))
    record.update(method_api.epoch_metrics(module))  # e.g. JointRD's eta, a fading twin's shortcut scale
    if box.val_data_loader is not None and ((epoch + 1) % run.runner['eval_every'] == 0 or epoch + 1 == num_epochs):
        run.val_accuracy = evaluate(run.trained, box.val_data_loader, accelerator)
        record['val_acc'] = run.val_accuracy
    run.history.append(record)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_epoch(run, epoch, record)
        accelerator.print(json.dumps(record))
    accelerator.wait_for_everyone()


def _save_epoch(run: _Run, epoch: int, record: Dict) -> None:
    folder = run.folder
    folder.before_save()
    try:
        save_checkpoint(folder.checkpoint, run.module, epoch, run.optimizers, run.schedulers,
                        extra=dict(history=run.history))
    except OSError as e:
        kept = checkpoint_epochs(folder.checkpoint)
        raise RunFolderError(f'Could not write the checkpoint of epoch {epoch + 1} to {folder.checkpoint} '
                             f'({e.strerror or e}). ' + (f'The previous checkpoint ({kept} epoch(s)) is intact: fix '
                             'the cause (e.g. free space) and continue with --resume.' if kept else
                             'No epoch was saved yet.')) from e
    folder.after_save()
    line = json.dumps(record) + '\n'
    with open(run.out / 'metrics.jsonl', 'a') as f:
        f.write(line[:len(line) // 2])
        f.flush()
        fault_point('metrics_write')  # a kill here leaves half a line, which the resume rewrites
        f.write(line[len(line) // 2:])


def finish(run: _Run, config: Dict) -> Dict:
    """The test split evaluated once (residual and deployed form), the deployed model saved in timm's Hub format,
    then final.json, written last: it marks the run finished."""
    from torchdistill.datasets.util import build_data_loader
    from ..integrations.hub import save_trained_model
    accelerator, module = run.accelerator, run.module
    final = dict(epochs=run.box.num_epochs, val_acc=run.val_accuracy)
    if accelerator.num_processes > 1:
        final['replica_max_abs_diff'] = replica_divergence(module)
        if final['replica_max_abs_diff'] > 1e-4:
            _logger.warning('Processes ended with different weights (max |diff| %.3g): a module trains parameters '
                            'outside DDP without all-reducing their gradients.', final['replica_max_abs_diff'])
    test_config = config['test'].get('test_data_loader')
    deployed = method_api.deploy_module(module)  # JointRD deploys its twin
    if test_config:
        loader = build_data_loader(config['datasets'][test_config['dataset_id']], test_config, distributed=False)
        loader = accelerator.prepare(loader)
        final['test_acc'] = evaluate(run.trained, loader, accelerator)
    if is_fading(deployed) and run.runner['recalibrate_bn']:
        used = recalibrate_batchnorm(deployed, run.box.train_data_loader, run.runner['recalibrate_bn'], accelerator,
                                     run.runner['seed'])
        if used:
            final['bn_recalibrated_batches'] = used
    if test_config:
        if has_dirac(deployed) or is_fading(deployed):
            # what is saved and deployed: Dirac folded into plain convs, faded shortcuts removed
            final['test_acc_folded'] = evaluate(deployable(deployed), loader, accelerator)
    if accelerator.is_main_process:
        save_trained_model(deployed, run.out / 'model', metrics=final)
        fault_point('final_save')
        atomic_write(run.out / 'final.json', lambda tmp: Path(tmp).write_text(json.dumps(final, indent=1)))
        accelerator.print(json.dumps(final))
    accelerator.wait_for_everyone()
    return final
