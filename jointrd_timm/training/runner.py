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

DECISION: the YAML's ``batch_size`` is the GLOBAL batch; with N processes each gets batch_size / N of it
(accelerate ``split_batches``), and the shuffle order depends only on (seed, epoch) (accelerate's seedable
sampler), so a run's optimisation does not depend on the process count, and a resumed run repeats its epochs. Gradient
accumulation is torchdistill's ``optimizer.grad_accum_step``.

Per epoch: a progress bar (loss, accuracy, lr, and eta for JointRD), one JSON line in ``metrics.jsonl`` and a
checkpoint written atomically (model, optimizer(s), scheduler(s), epoch, RNG). ``--resume`` continues from it
exactly. After the last epoch the test split is evaluated once and the final model is saved in timm's Hub format.
"""
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..methods import base as method_api
from ..twins.dirac import has_dirac
from ..twins.fade import deployable, is_fading
from .checkpoint import load_checkpoint, load_weights, save_checkpoint

__all__ = ['train', 'evaluate', 'load_config', 'ConfigError', 'RUNNER_DEFAULTS']

_logger = logging.getLogger(__name__)

RUNNER_DEFAULTS = dict(seed=0, mixed_precision='no', sync_batchnorm=False, output_dir=None, eval_every=1,
                       find_unused_parameters=False)
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
            raise ConfigError('datasets are built while the YAML loads and cannot be overridden; use --dataset or '
                              'edit the YAML.')
        node = config
        for key in keys[:-1]:
            if not isinstance(node.get(key, {}), dict):
                raise ConfigError(f'Override {path}: {key} is not a mapping.')
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return config


def load_config(path, overrides: Optional[List[str]] = None) -> Dict:
    """Load a torchdistill YAML (its tags build the datasets), import its dependencies, check its keys."""
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import import_dependencies
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f'No config file at {path}.')
    config = yaml_util.load_yaml_file(str(path))
    if not isinstance(config, dict):
        raise ConfigError(f'{path} does not hold a mapping at top level.')
    import_dependencies(config.get('dependencies', None))
    _check_keys(config, TOP_LEVEL_KEYS, f'{path} (top level)')
    for section in ('datasets', 'models', 'train', 'test'):
        if section not in config:
            raise ConfigError(f'{path} has no `{section}` section; a torchdistill YAML needs datasets, models, '
                              'train and test.')
    _check_keys(config['train'], TRAIN_KEYS, f'{path}: train')
    _check_keys(config.get('runner') or {}, RUNNER_DEFAULTS, f'{path}: runner')
    models = config['models']
    if 'student_model' not in models and 'model' not in models:
        raise ConfigError(f'{path}: models needs `student_model` (or `model`).')
    return apply_overrides(config, overrides or [])


def _build_model(model_config: Dict) -> nn.Module:
    from torchdistill.models.registry import get_model
    from ..integrations import torchdistill as _registers  # noqa: F401  (timm_model, jointrd_model, ...)
    if 'key' not in model_config:
        raise ConfigError(f'A model config needs `key` (a torchdistill model key, e.g. timm_model); got {model_config}.')
    try:
        model = get_model(model_config['key'], model_config.get('repo_or_dir'), **(model_config.get('kwargs') or {}))
    except ValueError as e:
        raise ConfigError(f'{e}. jointrd_timm registers `timm_model` and `jointrd_model`; did the YAML list '
                          '`dependencies: [{name: jointrd_timm}]`?') from e
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


def train(config: Dict, output_dir: Optional[str] = None, resume: bool = False, device: Optional[str] = None) -> Dict:
    """Train as the YAML says; returns the final metrics (also written to ``<output_dir>/final.json``).
    Modules with their own optimizers (the adversarial discriminators) expose ``extra_optimizers()`` /
    ``extra_schedulers()``; they are checkpointed and restored with the main ones."""
    from accelerate.utils import set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.training import get_training_box
    from torchdistill.datasets.util import build_data_loader
    from ..integrations.torchdistill import accelerator_for_boxes, unwrap
    from ..integrations.hub import save_trained_model

    runner = dict(RUNNER_DEFAULTS, **(config.get('runner') or {}))
    out = Path(output_dir or runner['output_dir'] or 'runs/default')
    accelerator = _make_accelerator(runner, device)
    set_seed(runner['seed'])
    models = config['models']
    teacher = _build_model(models['teacher_model']) if 'teacher_model' in models else None
    student_config = models.get('student_model') or models['model']
    student = _build_model(student_config)
    if runner['sync_batchnorm'] and accelerator.device.type != 'cuda':
        raise ConfigError('runner.sync_batchnorm needs CUDA devices (torch.nn.SyncBatchNorm does not run on CPU); '
                          'on CPU use a BatchNorm-free model (e.g. norm_layer: groupnorm1) or sync_batchnorm: false.')
    if runner['sync_batchnorm']:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    train_config = config['train']
    # accelerate owns the processes (sharded loaders, DDP): the boxes must not add samplers or wrappers themselves
    distributed = False
    box_accelerator = accelerator_for_boxes(accelerator)
    if teacher is None:
        box = get_training_box(student, config['datasets'], train_config, accelerator.device, None, distributed, 1,
                               accelerator=box_accelerator)
        trained = box.model
    else:
        box = get_distillation_box(teacher, student, config['datasets'], train_config, accelerator.device, None,
                                   distributed, 1, accelerator=box_accelerator)
        trained = box.student_model
    module = unwrap(trained)
    tap = _OutputTap(module)
    optimizers = dict(model=box.optimizer, **method_api.extra_optimizers(module))
    schedulers = dict(model=box.lr_scheduler, **method_api.extra_schedulers(module))
    ckpt_path = out / 'last.safetensors'
    start_epoch = 0
    if resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f'--resume: no checkpoint at {ckpt_path}; run without --resume to start.')
        state = load_checkpoint(ckpt_path, module, optimizers, schedulers)
        start_epoch = state['epoch'] + 1
        accelerator.print(f'Resumed from {ckpt_path} (epoch {state["epoch"]} done).')
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    num_epochs = box.num_epochs
    metrics_path = out / 'metrics.jsonl'
    if accelerator.is_main_process and not resume and metrics_path.exists():
        metrics_path.unlink()
    val_accuracy = None
    for epoch in range(start_epoch, num_epochs):
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
        if box.val_data_loader is not None and ((epoch + 1) % runner['eval_every'] == 0 or epoch + 1 == num_epochs):
            val_accuracy = evaluate(trained, box.val_data_loader, accelerator)
            record['val_acc'] = val_accuracy
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
            save_checkpoint(ckpt_path, module, epoch, optimizers, schedulers)
            accelerator.print(json.dumps(record))
        accelerator.wait_for_everyone()
    final = dict(epochs=num_epochs, val_acc=val_accuracy)
    if accelerator.num_processes > 1:
        final['replica_max_abs_diff'] = replica_divergence(module)
        if final['replica_max_abs_diff'] > 1e-4:
            _logger.warning('Processes ended with different weights (max |diff| %.3g): a module trains parameters '
                           'outside DDP without all-reducing their gradients.', final['replica_max_abs_diff'])
    test_config = config['test'].get('test_data_loader')
    if test_config:
        loader = build_data_loader(config['datasets'][test_config['dataset_id']], test_config, distributed=False)
        loader = accelerator.prepare(loader)
        final['test_acc'] = evaluate(trained, loader, accelerator)
        deployed = method_api.deploy_module(module)
        if has_dirac(deployed) or is_fading(deployed):
            # what is saved and deployed: Dirac folded into plain convs, faded shortcuts removed
            final['test_acc_folded'] = evaluate(deployable(deployed), loader, accelerator)
    if accelerator.is_main_process:
        deployed = method_api.deploy_module(module)  # JointRD deploys its twin
        save_trained_model(deployed, out / 'model', metrics=final)
        (out / 'final.json').write_text(json.dumps(final, indent=1))
        accelerator.print(json.dumps(final))
    accelerator.wait_for_everyone()
    return final
