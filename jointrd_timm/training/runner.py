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
      ema_decay: 0                 # a weight average of the deployed model (0: off; e.g. 0.999): .ema
      ema_warmup: true             # its decay grows with the steps averaged (timm's use_warmup)

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
forward passes; ``final.json`` keeps ``test_acc_as_trained`` beside ``test_acc_deployed`` (what ``model/`` holds;
read it with ``run_folder.deployed_accuracy``, docs/cli.md). The output folder belongs to the run (``run_folder``:
writability, lock, no silent replacement, resume and "finished"; docs/reliability.md).

``channels_last`` and ``compile``: :mod:`.performance`. ``ema_decay``: :mod:`.ema` (the average, not the trained
twin, is then what is deployed and saved; ``final.json`` keeps the trained twin's deployed accuracy too,
``test_acc_deployed_without_ema``).
"""
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import DivergedError, JointRDError
from ..faults import fault_point
from ..io import input_channels, load_weights, near_chance
from ..methods import base as method_api
from ..methods.lr_schedules import set_scheduler_run_length
from ..twins.dirac import has_dirac
from ..twins.fade import deployable, is_fading
from .checkpoint import atomic_write, load_checkpoint, module_state, save_checkpoint
from .data import dataset_classes, dataset_data_cfg, dataset_label_names, dataset_origin
from .ema import TwinEma
from .evaluation import _OutputTap, evaluate, recalibrate_batchnorm, replica_divergence
from .performance import compile_modules, to_channels_last
from .run_config import (MIXED_PRECISION, RUNNER_DEFAULTS, TOP_LEVEL_KEYS, TRAIN_KEYS, ConfigError,  # noqa: F401
                         apply_overrides, check_structure, load_config, num_epochs, validate)
from .run_folder import RunFolder, RunFolderError, checkpoint_epochs, deployed_accuracy, read_metrics

# re-exported, as imported from here before run_config, evaluation and performance were split out
__all__ = ['train', 'setup', 'check_device',
           'train_one_epoch', 'finish', 'evaluate', 'recalibrate_batchnorm', 'replica_divergence',
           'to_channels_last', 'load_config', 'validate', 'apply_overrides', 'ConfigError', 'compile_modules',
           'RunFolderError', 'RUNNER_DEFAULTS', 'MIXED_PRECISION']

_logger = logging.getLogger(__name__)


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
    except RuntimeError as e:  # timm's refusal of a model name it does not know
        if not str(e).startswith('Unknown model'):
            raise
        raise ConfigError(f'models.{name}: {e}; timm.list_models() lists the names timm knows (`jointrd derive '
                          '--list` the ones with a twin).') from e
    except ValueError as e:  # a setting refused by the method or the model it builds (e.g. jointrd.eta_min: 2)
        if isinstance(e, JointRDError):
            raise
        raise ConfigError(f'models.{name}.kwargs: {e}') from e
    if model_config.get('src_ckpt'):
        load_weights(model, model_config['src_ckpt'])
    return model


def check_device(device) -> Optional[str]:
    """The device's type ('cpu', 'cuda'; None: cuda if available), refusing one this machine does not have instead
    of training on the CPU without a word. ``device``: None, a name torch reads ('cpu', 'cuda', 'cuda:0') or a
    ``torch.device``."""
    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        kind = None
    if kind not in ('cpu', 'cuda'):
        raise ConfigError(f"device must be 'cpu', 'cuda' or None (cuda if available), got {device!r}.")
    if kind == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'device {str(device)!r} was asked for, but torch sees no CUDA GPU here '
                          '(torch.cuda.is_available() is False): give --device cpu, or no --device to use a GPU when '
                          'there is one.')
    return kind


def _make_accelerator(runner: Dict, device_type: Optional[str]):
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    # accelerate keeps one AcceleratorState per process; successive runs in one process (the demo, benchmarks)
    # may differ in mixed precision, so start each from a fresh state (the process group is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=device_type == 'cpu', mixed_precision=runner['mixed_precision'],
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=runner['find_unused_parameters'])])
    if runner['mixed_precision'] == 'fp16' and accelerator.device.type == 'cpu':
        _logger.warning("runner.mixed_precision 'fp16' on the CPU: torch autocasts to float16 there, which most CPUs "
                        "compute no faster than float32 (often slower) and in float16's narrow range. Use 'bf16' on a "
                        "CPU with bfloat16 instructions, or 'no'.")
    return accelerator


class _Run:
    """What one run holds between setup, its epochs and its end."""

    def __init__(self, runner: Dict, out: Path, folder: RunFolder):
        self.runner, self.out, self.folder = runner, out, folder
        self.accelerator = self.box = self.trained = self.module = self.tap = None
        self.ema: Optional[TwinEma] = None  # runner.ema_decay: the average of the deployed module
        self.stepped = False  # the optimizer stepped since the average last did
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

    validate(check_structure(config, 'config'))  # a config built in Python is checked as a YAML is
    device_type = check_device(device)  # before the folder is claimed
    runner = dict(RUNNER_DEFAULTS, **(config.get('runner') or {}))
    out = Path(output_dir or runner['output_dir'] or 'runs/default')
    run = _Run(runner, out, RunFolder(out, resume=resume, overwrite=overwrite, say=print))
    if _is_main_process():
        run.folder.claim()
    try:
        run.accelerator = accelerator = _make_accelerator(runner, device_type)
        if resume and _finished(run, config):
            return run
        set_seed(runner['seed'])
        models = config['models']
        teacher = _build_model(models['teacher_model'], 'teacher_model') if 'teacher_model' in models else None
        name = 'student_model' if 'student_model' in models else 'model'
        student = _build_model(models[name], name)
        if teacher is not None:
            check_pair(teacher, student, 'models.teacher_model / models.student_model')
        _check_classes(config['datasets'], dict(teacher_model=teacher, **{name: student}))
        if runner['sync_batchnorm'] and accelerator.device.type != 'cuda':
            raise ConfigError('runner.sync_batchnorm needs CUDA devices (torch.nn.SyncBatchNorm does not run on CPU); '
                              'on CPU use a BatchNorm-free model (e.g. norm_layer: groupnorm1) or sync_batchnorm: false.')
        if runner['sync_batchnorm']:  # timm's: BatchNormAct2d keeps its activation (torch's drops it)
            from timm.layers import convert_sync_batchnorm
            student = convert_sync_batchnorm(student)
        if runner['channels_last']:
            for model in (teacher, student):
                if model is not None:
                    to_channels_last(model)
        # accelerate owns the processes (sharded loaders, DDP): the boxes must not add samplers or wrappers themselves
        box_args = (config['datasets'], config['train'], accelerator.device, None, False, 1)
        try:
            if teacher is None:
                run.box = get_training_box(student, *box_args, accelerator=accelerator_for_boxes(accelerator))
                run.trained = run.box.model
            else:
                run.box = get_distillation_box(teacher, student, *box_args,
                                               accelerator=accelerator_for_boxes(accelerator))
                run.trained = run.box.student_model
        except ValueError as e:  # torchdistill looks the train section's registry keys up here
            if isinstance(e, JointRDError) or not re.match(r'No .* registered', str(e)):
                raise  # anything else keeps its traceback
            raise ConfigError(f'the train section does not build ({type(e).__name__}: {e}): check the key it names '
                              '(optimizer, scheduler, criterion and pre/post-process keys are names registered with '
                              'torchdistill or jointrd_timm, e.g. optimizer.key: SGD).') from e
        run.module = unwrap(run.trained)
        try:
            method_api.check_fade_driven(run.module, f'models.{name}')
        except ValueError as e:
            raise ConfigError(str(e)) from None
        method_api.keep_frozen(run.box)  # before a resume's stage advance rebuilds an optimizer
        if runner['ema_decay']:  # before compile: the average is a plain copy of the module to deploy
            run.ema = TwinEma(method_api.deploy_module(run.module), runner['ema_decay'], runner['ema_warmup'])
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


def _run_card(config: Dict, run: '_Run', deployed: nn.Module, final: Dict) -> str:
    """The model card (README.md) of a run's saved model: its architecture, the method and teacher that trained it,
    the data it read (as load_image_dataset read it), the budget and the measured accuracies, and how to load and
    evaluate it; ``jointrd save`` and ``jointrd push`` carry it along."""
    from ..integrations.hub import model_card
    from ..io import unwrap
    arch = (getattr(deployed, 'pretrained_cfg', None) or {}).get('architecture') or type(deployed).__name__
    teacher = getattr(run.module, 'teacher', None) or getattr(run.box, 'teacher_model', None)
    teacher = unwrap(teacher) if isinstance(teacher, nn.Module) else None  # a distillation box's, DDP-wrapped
    teacher_name = ((getattr(teacher, 'pretrained_cfg', None) or {}).get('architecture') or type(teacher).__name__) \
        if isinstance(teacher, nn.Module) else None
    method = (f'`{type(run.module).__name__}` (jointrd_timm.methods)' if method_api.deploy_module(run.module) is not
              run.module else 'the torchdistill YAML\'s criterion' + (' with a teacher' if teacher_name else ''))
    train_config = config['train']
    loaders = dict(train=_train_loader_config(config), test=config['test'].get('test_data_loader') or {})
    origins = {part: dataset_origin(config['datasets'].get(loader.get('dataset_id'))) for part, loader in
               loaders.items()}
    described = {part: (f"`{o['source']}` ({part}: split `{o['split']}`" + ''.join(
        f', {k} {v}' for k, v in o.items() if k not in ('source', 'split')) + ')') if o else None
        for part, o in origins.items()}
    test = origins['test']
    optimizer = (train_config.get('optimizer') or {}).get('kwargs') or {}
    epochs, batch = final['epochs'], (loaders['train'].get('kwargs') or {}).get('batch_size', '?')
    budget = f'{epochs} epoch{"s" * (epochs != 1)}, batch {batch}' + (
        f', lr {optimizer["lr"]}' if 'lr' in optimizer else '')
    accuracy = deployed_accuracy(final)
    metrics = {k: round(v, 2) for k, v in (('top1_test', accuracy), ('val_acc', final.get('val_acc')))
               if isinstance(v, (int, float))}
    return model_card(dict(
        name=arch, architecture=arch, teacher=teacher_name, method=method, metrics=metrics,
        description=f'`{arch}` trained by `jointrd train` (the jointrd_timm runner, a torchdistill YAML).',
        dataset=' and '.join(d for d in described.values() if d) or 'not recorded (datasets not read by '
                                                                     'jointrd_timm.training.data)',
        hf_dataset=test.get('source') if test and not test.get('test_fraction') else None,
        training=dict(budget=budget), results_title='Results (measured by `jointrd train`)',
        warnings=final.get('warnings'),
        eval=dict(dataset=test['source'], split=test['split'], validate_args=False) if test else None,
        eval_args=f'--split {test["split"]}' + (f' --test-fraction {test["test_fraction"]}' if test.get(
            'test_fraction') else '') if test else None,
        local_dir=str((run.out / 'model').resolve())))


def _chance_warning(accuracy: float, num_classes: Optional[int],
                    without_ema: Optional[float] = None) -> Optional[str]:
    """What to say when the deployed model ended near chance on the test split (:func:`~jointrd_timm.io.near_chance`),
    else None. ``without_ema``: with a weight average deployed, the trained model's own deployed accuracy."""
    if not isinstance(num_classes, int) or not near_chance(accuracy, num_classes):
        return None
    chance = f'near chance ({100 / num_classes:.2f} % for {num_classes} classes)'
    if without_ema is not None and not near_chance(without_ema, num_classes):
        return (f'the deployed weight average is at {accuracy:.2f} % on the test split, {chance}, where the trained '
                f'model is at {without_ema:.2f} %: the average still holds early weights. Lower runner.ema_decay '
                '(or keep runner.ema_warmup on) for a run this short.')
    return (f'the deployed model is at {accuracy:.2f} % on the test split, {chance}: it has learned (almost) '
            'nothing. Train it longer, check that the loss fell (metrics.jsonl: a run that diverged ends at chance '
            'too) and that the labels belong to the images.')


def _train_loader_config(config: Dict) -> Dict:
    """The ``train_data_loader`` section of a run: the train section's, or in a multi-stage run its first stage's."""
    train_config = config['train']
    stages = [train_config[k] or {} for k in sorted(train_config) if k.startswith('stage')]
    return train_config.get('train_data_loader') or next(
        (stage['train_data_loader'] for stage in stages if stage.get('train_data_loader')), {})


def _trained_label_names(config: Dict) -> Optional[List[str]]:
    """The class names of the training data, for the saved config.json (``[]`` for integer labels, which name
    none: names the model came with, its teacher's, are not its classes now); None where the dataset does not say."""
    dataset = config['datasets'].get(_train_loader_config(config).get('dataset_id'))
    names = dataset_label_names(dataset)
    return [] if names is None and dataset_classes(dataset) is not None else names


def _check_classes(datasets: Dict, models: Dict[str, Optional[nn.Module]]) -> None:
    """Refuse, before anything trains, a model whose classifier has fewer outputs than the classes the labels of a
    dataset index (a label beyond them fails mid-epoch, deep in the loss), or none at all (num_classes 0: a
    headless model whose 'accuracy' would mean nothing). Datasets and models that do not say are not checked."""
    for name, model in models.items():
        if model is None:
            continue
        deployed = method_api.deploy_module(model)  # a method's twin (and its teacher, which check_pair matched)
        where = f'models.{name}' if deployed is model else f"models.{name}'s student"
        field = f'models.{name}.kwargs.num_classes' if deployed is model else f'num_classes in models.{name}.kwargs'
        outputs = getattr(deployed, 'num_classes', None)
        if not isinstance(outputs, int) or isinstance(outputs, bool):
            continue
        for key, dataset in datasets.items():
            classes = dataset_classes(dataset)
            if classes is None:
                continue
            if outputs == 0:
                raise ConfigError(f'{where} has no classifier (num_classes 0), and the labels of dataset {key!r} index '
                                  f'{classes} classes: set {field} to {classes}.')
            if classes > outputs:
                raise ConfigError(f'{where} predicts {outputs} classes, but the labels of dataset {key!r} index '
                                  f'{classes}: set {field} to {classes} (a model trained for other classes: fine-tune '
                                  'its classifier first, jointrd distill --num-classes).')


def _finished(run: _Run, config: Dict) -> bool:
    """--resume of a finished run returns its final.json (``run.done``); of a run given more epochs since, it
    continues (:func:`_resume` retires the shorter run's result first)."""
    folder, epochs = run.folder, num_epochs(config)
    if folder.is_finished(epochs):
        run.accelerator.print(f'{run.out} holds a finished run of {folder.saved_epochs()} epoch(s); nothing to '
                              'resume.')
        run.done = folder.final()
        return True
    return False


def _check_run_length(run: _Run) -> None:
    """A method that lays schedules out over fractions of its run (the shortcut fade, eta's horizon) resumes only
    as a run of the length its checkpoint was trained as: at another length they would move (an extended run's
    finished fade would bring the shortcuts back), so that is refused before anything in the folder changes."""
    from safetensors import safe_open
    schedules = method_api.run_length_schedules(run.module)
    if not schedules:
        return
    with safe_open(str(run.folder.checkpoint), 'pt') as f:  # the method's run-length buffer, as it was saved
        saved = int(f.get_tensor('model.num_epochs')) if 'model.num_epochs' in f.keys() else 0
    if saved and saved != run.box.num_epochs:
        raise ConfigError(
            f'{run.folder.checkpoint} was trained as a run of {saved} epoch(s), and {" and ".join(schedules)} '
            f'{"are" if len(schedules) > 1 else "is"} laid out over them: resuming it as a run of '
            f'{run.box.num_epochs} would move {"them" if len(schedules) > 1 else "it"} (a finished fade would bring '
            f'the shortcuts back). Resume with train.num_epochs={saved}; to train the twin longer, start a new run '
            "from this run's model/ (its deployed twin).")


def _resume(run: _Run) -> None:
    """Restore the checkpoint; metrics.jsonl is rewritten from the history the checkpoint holds, so a kill between
    the checkpoint and its metrics line, or in the middle of a line, leaves neither a gap nor a duplicate. A
    finished run given more epochs is extended: its result is retired (``RunFolder.extend``) once the checkpoint has
    loaded into this run, so a resume that cannot continue it (another model, another length) leaves it intact."""
    _check_run_length(run)
    _advance_stages(run, checkpoint_epochs(run.folder.checkpoint) or 0)
    state = load_checkpoint(run.folder.checkpoint, run.module, run.optimizers, run.schedulers)
    if run.ema is not None:
        run.ema.load_state_dict(module_state(run.folder.checkpoint, state, 'ema'), state['extra'].get('ema_steps', 0))
    if 'grad_count' in state['extra']:  # older checkpoints: the count restarts, as it did
        run.box.stage_grad_count = state['extra']['grad_count']
    if 'grads' in state['modules']:
        PendingGrads(run.module).load_state_dict(state['modules']['grads'])
    scaler = getattr(run.accelerator, 'scaler', None)
    if scaler is not None and 'grad_scaler' in state['extra']:  # else (bf16, CPU, older checkpoint) it starts anew
        scaler.load_state_dict(state['extra']['grad_scaler'])
    done = state['epoch'] + 1
    if done > run.box.num_epochs:
        raise ConfigError(f'{run.folder.checkpoint} holds {done} epochs, more than train.num_epochs='
                          f'{run.box.num_epochs}; resume with train.num_epochs={done} or more.')
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.folder.extend(run.box.num_epochs)
    run.start_epoch = done
    history = state['extra'].get('history')
    # a checkpoint written before checkpoints carried the history: keep the file's records of the epochs it holds
    run.history = list(history) if history is not None else read_metrics(run.out / 'metrics.jsonl', done)
    run.val_accuracy = next((r['val_acc'] for r in reversed(run.history) if 'val_acc' in r), None)
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        _rewrite_metrics(run.out / 'metrics.jsonl', run.history)
    then = f'continuing with epoch {done + 1}' if done < run.box.num_epochs else 'finishing (test, final save)'
    run.accelerator.print(f'Resumed from {run.folder.checkpoint}: {done} of {run.box.num_epochs} epoch(s) done, '
                          f'{then}.')


def _rewrite_metrics(path: Path, history: List[Dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(''.join(json.dumps(r) + '\n' for r in history)))


def train_one_epoch(run: _Run, config: Dict, epoch: int) -> None:
    """One pass over the training data, an evaluation every ``eval_every`` epochs, then the checkpoint and its
    metrics line (in that order: the checkpoint carries the history the line is rewritten from after a kill)."""
    box, accelerator, module, tap = run.box, run.accelerator, run.module, run.tap
    num_epochs = box.num_epochs
    start = time.time()
    # a per-step scheduler that needs the run length gets it from any box (jointrd_pre_epoch_process gives it too)
    set_scheduler_run_length(box.lr_scheduler, len(box.train_data_loader), num_epochs,
                             getattr(box, 'grad_accum_step', 1))
    box.pre_epoch_process(epoch=epoch)
    # a discriminator or joint teacher steps when the student's optimizer does (gradient accumulation)
    method_api.set_grad_accumulation(module, getattr(box, 'grad_accum_step', 1))
    if getattr(box, 'teacher_updatable', None) is False:
        # a frozen teacher (KD, FitNets) answers from its running statistics: torchdistill's pre-epoch process puts
        # the student in train mode and leaves the teacher as built, in train mode (batch statistics, drifting)
        box.teacher_model.eval()
    if hasattr(box.train_data_loader, 'set_epoch'):  # the shuffle order depends on (seed, epoch) only
        box.train_data_loader.set_epoch(epoch)
    loss_sum, correct, seen = 0.0, 0, 0
    _follow_optimizer(run)
    bar = tqdm(box.train_data_loader, desc=f'epoch {epoch + 1}/{num_epochs}',
               disable=not accelerator.is_local_main_process, leave=False, dynamic_ncols=True)
    for index, batch in enumerate(bar):
        images, targets, supp = batch if len(batch) == 3 else (*batch, {})
        try:
            loss = box.forward_process(images, targets, supp)
        except (AssertionError, RuntimeError) as e:
            if index > 0 or epoch != run.start_epoch or isinstance(e, JointRDError) or 'out of memory' in str(e) or \
                    not (isinstance(e, AssertionError) or re.search(r'shape|size|channels|mat1', str(e))):
                raise
            # the run's first batch: the model does not take the data as configured (e.g. timm's ViT: 'Input
            # height (32) doesn't match model (224)'); later, the same error is a bug and keeps its traceback
            raise ConfigError(f'The model does not run on the first training batch, of shape {tuple(images.shape)} '
                              f'({type(e).__name__}: {str(e)[:300]}): make the data and the model agree (the '
                              "dataset's input_size, or the model's img_size / in_chans / num_classes kwargs).") from e
        except ValueError as e:
            if 'Expected more than 1 value per channel' not in str(e):
                raise
            raise ConfigError(f'A training batch of {len(targets)} image(s) reached a BatchNorm layer with one value '
                              f'per channel ({e}): the last batch of an epoch holds what is left of the training set. '
                              'Set train.train_data_loader.kwargs.drop_last: true (or pick a batch size that leaves '
                              'more than one image; a batch size of 1 itself cannot train BatchNorm: use more, or a '
                              'model without BatchNorm).') from e
        box.post_forward_process(loss=loss)
        if run.ema is not None and run.stepped:  # after each optimizer step
            run.ema.step()
            run.stepped = False
        fault_point('step')
        if not torch.isfinite(loss):
            raise DivergedError(f'Loss became {loss.item()} at epoch {epoch + 1}; lower the learning rate '
                                '(jointrd distill --lr, a YAML\'s train.optimizer.kwargs.lr) or check the data.')
        loss_sum += float(loss.detach()) * len(targets)
        seen += len(targets)
        if tap.logits is not None:
            correct += int((tap.logits.argmax(1) == targets).sum())
        postfix = dict(loss=f'{loss_sum / seen:.3f}', acc=f'{100 * correct / seen:.1f}',
                       lr=f'{box.optimizer.param_groups[0]["lr"]:.3g}')
        postfix.update((k, f'{v:.3f}') for k, v in method_api.epoch_metrics(module).items())
        bar.set_postfix(postfix)
    box.post_epoch_process()
    _follow_stage(run)  # a multi-stage box may have moved to its next stage
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


def _follow_optimizer(run: _Run) -> None:
    """The weight average steps when the optimizer does (gradient accumulation, skipped steps): a post-step hook on
    the torch optimizer of the current stage, registered once per optimizer."""
    optimizer = getattr(run.box.optimizer, 'optimizer', run.box.optimizer)  # accelerate's wrapper: its own
    if run.ema is None or getattr(optimizer, '_jointrd_followed', False):
        return
    optimizer.register_step_post_hook(lambda *args: setattr(run, 'stepped', True))
    optimizer._jointrd_followed = True


def _advance_stages(run: _Run, done: int) -> None:
    """A multi-stage box (``train.stage1``, ``stage2``...) set to the stage its run was in after ``done`` epochs, as
    its own post-epoch process advanced it, so the checkpoint's optimizer and scheduler load into that stage's."""
    box = run.box
    if not hasattr(box, 'advance_to_next_stage'):
        return
    while box.stage_end_epoch <= done and box.stage_end_epoch < box.num_epochs:  # the last stage ends the run
        box.current_epoch = box.stage_end_epoch
        box.advance_to_next_stage()
    box.current_epoch = done
    _follow_stage(run)


def _follow_stage(run: _Run) -> None:
    """Checkpoint the optimizer and scheduler of the stage the box is in (a multi-stage box sets up its own for each
    stage)."""
    run.optimizers['model'], run.schedulers['model'] = run.box.optimizer, run.box.lr_scheduler


class PendingGrads:
    """The gradients a run has accumulated but not yet stepped (``grad_accum_step`` > 1, whose count runs across
    epochs: an epoch can end mid-accumulation), as a side module of the checkpoint, so a resume continues them."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.grad.detach() for n, p in self.module.named_parameters() if p.grad is not None}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for name, parameter in self.module.named_parameters():
            if name in state:
                parameter.grad = state[name].to(parameter.device, parameter.dtype).clone()


def _grad_count(box) -> Tuple[int, bool]:
    """torchdistill's count of backward passes in the stage (it decides the accumulation's optimizer steps and a
    step-wise scheduler's steps), and whether gradients are pending."""
    count = int(getattr(box, 'stage_grad_count', 0) or 0)
    return count, count % (getattr(box, 'grad_accum_step', 1) or 1) != 0


def _save_epoch(run: _Run, epoch: int, record: Dict) -> None:
    folder = run.folder
    folder.before_save()
    try:
        ema = dict(ema_steps=run.ema.steps) if run.ema is not None else {}
        count, pending = _grad_count(run.box)
        modules = dict(ema=run.ema) if ema else {}
        if pending:
            modules['grads'] = PendingGrads(run.module)
        scaler = getattr(run.accelerator, 'scaler', None)  # fp16 on a GPU: the loss scale it has learnt
        scaled = dict(grad_scaler=scaler.state_dict()) if scaler is not None else {}
        save_checkpoint(folder.checkpoint, run.module, epoch, run.optimizers, run.schedulers,
                        extra=dict(history=run.history, grad_count=count, **ema, **scaled), modules=modules or None)
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


def _deploy(run: _Run, deployed: nn.Module, loader, as_trained: Optional[float]) -> Dict:
    """Make ``deployed`` what is saved (a faded twin's BN statistics recomputed) and measure it on ``loader`` (the
    test split; None: not measured): ``bn_recalibrated_batches`` and ``test_acc_deployed``, evaluated in its deployed
    form (Dirac folded into plain convs, faded shortcuts removed), or ``as_trained`` when nothing folds."""
    found = {}
    if is_fading(deployed) and run.runner['recalibrate_bn']:
        train_loader = run.box.train_data_loader
        if hasattr(train_loader, 'set_epoch'):  # the batches of the run's end, also when a resume came straight here
            train_loader.set_epoch(run.box.num_epochs)
        used = recalibrate_batchnorm(deployed, train_loader, run.runner['recalibrate_bn'], run.accelerator,
                                     run.runner['seed'])
        if used:
            found['bn_recalibrated_batches'] = used
    if loader is not None:
        folds = has_dirac(deployed) or is_fading(deployed)
        found['test_acc_deployed'] = evaluate(deployable(deployed), loader, run.accelerator) \
            if folds or as_trained is None else as_trained
    return found


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
    loader = data_cfg = None
    if test_config:
        test_set = config['datasets'][test_config['dataset_id']]
        # the saved config.json says how the test images were read, where the test transform can say it as timm's
        # data config (else the architecture's own stays): timm's validate.py and `jointrd eval` then read them so
        data_cfg = dataset_data_cfg(test_set, input_channels(deployed) or 3)
        loader = build_data_loader(test_set, test_config, distributed=False)
        loader = accelerator.prepare(loader)
        final['test_acc_as_trained'] = evaluate(run.trained, loader, accelerator)
    found = _deploy(run, deployed, loader, final.get('test_acc_as_trained'))
    if run.ema is not None:  # the average is what is deployed; the trained twin's accuracy is kept beside it
        if 'test_acc_deployed' in found:
            final['test_acc_deployed_without_ema'] = found['test_acc_deployed']
        deployed = run.ema.module
        found = _deploy(run, deployed, loader, None)
        final['ema_steps'] = run.ema.steps
        if run.box.val_data_loader is not None:
            final['val_acc_ema'] = evaluate(deployable(deployed), run.box.val_data_loader, accelerator)
    final.update(found)
    if test_config:
        # the names of records written before these two keys (deprecated: read them with run_folder.deployed_accuracy)
        final['test_acc'] = final['test_acc_as_trained']
        if has_dirac(deployed) or is_fading(deployed):
            final['test_acc_folded'] = final['test_acc_deployed']
        warning = _chance_warning(deployed_accuracy(final), dataset_classes(test_set)
                                  or getattr(deployed, 'num_classes', None), final.get('test_acc_deployed_without_ema'))
        if warning:
            final['warnings'] = [warning]
            if accelerator.is_main_process:
                _logger.warning(warning)
    if accelerator.is_main_process:
        save_trained_model(deployed, run.out / 'model', metrics=final, data_cfg=data_cfg,
                           label_names=_trained_label_names(config), model_card=_run_card(config, run, deployed, final))
        fault_point('final_save')
        atomic_write(run.out / 'final.json', lambda tmp: Path(tmp).write_text(json.dumps(final, indent=1)))
        accelerator.print(json.dumps(final))
    accelerator.wait_for_everyone()
    return final
