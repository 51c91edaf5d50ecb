"""Training checkpoints in safetensors, written atomically (jointrd_timm.io: atomic writes, weights loading that
refuses pickles).

A training checkpoint is ONE .safetensors file: the model's tensors under ``model.``, every optimizer's tensors
under ``optimizer.<name>.``, the state of side modules (e.g. a weight average) under ``module.<name>.``, the torch
RNG state under ``rng.torch`` (each GPU's under ``rng.cuda.<i>`` once CUDA is in use), and the rest (epoch,
optimizer structure, scheduler state, Python/NumPy RNG, user extras such as the runner's fp16 loss scale) as JSON in the safetensors metadata. It is
written to a temporary file beside the target and moved into place with ``os.replace``, so a crash never leaves a
half-written file (the temporary file a kill leaves behind is removed by the next run into the folder, see
``run_folder``).

Pickles are refused everywhere except :func:`convert_checkpoint`, which reads one with ``torch.load(...,
weights_only=True)`` (tensors and plain containers only, no code) to turn a torchdistill checkpoint into safetensors.
"""
import json
import random
import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .. import io as _io
from ..io import FORMAT, TMP_MARK, CheckpointError, atomic_write, open_safetensors, strict_load  # noqa: F401

# CheckpointError, FORMAT, TMP_MARK and atomic_write are re-exported: this module writes and reads them too
__all__ = ['save_checkpoint', 'load_checkpoint', 'module_state', 'convert_checkpoint', 'CheckpointError', 'FORMAT',
           'TMP_MARK', 'atomic_write']
_MOVED = ('load_weights', 'read_state_dict')  # their home is jointrd_timm.io


def __getattr__(name: str):
    """``load_weights`` and ``read_state_dict`` imported from here: deprecated aliases of ``jointrd_timm.io``'s."""
    if name in _MOVED:
        warnings.warn(f'jointrd_timm.training.checkpoint.{name} is deprecated: import it from jointrd_timm.io.',
                      DeprecationWarning, stacklevel=2)
        return getattr(_io, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def _tensors(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied weights) and non-contiguous views
    return {f'{prefix}{k}': v.detach().cpu().contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}


def _json_safe(state: Dict) -> Dict:
    """The entries that survive a JSON round trip unchanged (e.g. not MultiStepLR's Counter of int keys, which
    the scheduler rebuilds from its constructor arguments anyway)."""
    safe = {}
    for key, value in state.items():
        try:
            if json.loads(json.dumps(value)) == value:
                safe[key] = value
        except (TypeError, ValueError):
            continue
    return safe


def save_checkpoint(path, model: nn.Module, epoch: int, optimizers: Optional[Dict] = None,
                    schedulers: Optional[Dict] = None, extra: Optional[Dict] = None,
                    modules: Optional[Dict] = None) -> Path:
    """Save everything a resume needs. ``optimizers``/``schedulers`` are name -> object (None entries skipped);
    ``modules``: name -> an object with a tensor ``state_dict()`` that is not part of ``model`` (a weight average)."""
    tensors = _tensors(model.state_dict(), 'model.')
    for name, module in (modules or {}).items():
        tensors.update(_tensors(module.state_dict(), f'module.{name}.'))
    optim_meta, sched_meta = {}, {}
    for name, optimizer in (optimizers or {}).items():
        if optimizer is None:
            continue
        state = optimizer.state_dict()
        plain_state = {}
        for index, values in state['state'].items():
            tensors.update(_tensors(values, f'optimizer.{name}.{index}.'))
            plain_state[str(index)] = {k: v for k, v in values.items() if not torch.is_tensor(v)}
        optim_meta[name] = dict(state=plain_state, param_groups=state['param_groups'])
    for name, scheduler in (schedulers or {}).items():
        if scheduler is not None:
            sched_meta[name] = _json_safe(scheduler.state_dict())
    tensors['rng.torch'] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout, drop-path on the GPU draw from these
        tensors.update({f'rng.cuda.{i}': state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    metadata = dict(format=FORMAT, epoch=str(epoch), optimizers=json.dumps(optim_meta),
                    schedulers=json.dumps(sched_meta), extra=json.dumps(extra or {}),
                    rng_python=json.dumps(random.getstate()),
                    rng_numpy=json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]))
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), point='checkpoint_write')


# where a scheduler is in its schedule (torch's LRScheduler and ReduceLROnPlateau), as opposed to the schedule itself
PROGRESS_KEYS = ('last_epoch', '_step_count', '_last_lr', '_get_lr_called_within_step', '_is_initial', 'best',
                 'num_bad_epochs', 'cooldown_counter')


def restore_progress(scheduler, saved: Dict) -> None:
    """Where ``scheduler`` was in its schedule (``last_epoch``, its lrs, step counts, a plateau's counters), from
    its saved state; the schedule itself (``T_max``, milestones, a one-cycle's phases, lambdas) stays the one the
    config built, so a run extended with a longer schedule follows it. The schedulers of a SequentialLR or
    ChainedScheduler are restored the same way."""
    for key in PROGRESS_KEYS:
        if key in saved and hasattr(scheduler, key):
            setattr(scheduler, key, saved[key])
    for child, child_saved in zip(getattr(scheduler, '_schedulers', None) or [], saved.get('_schedulers') or []):
        if isinstance(child_saved, dict):
            restore_progress(child, child_saved)


def load_checkpoint(path, model: nn.Module, optimizers: Optional[Dict] = None,
                    schedulers: Optional[Dict] = None, restore_rng: bool = True) -> Dict:
    """Restore a :func:`save_checkpoint` file into live objects. Returns ``dict(epoch=..., extra=..., modules=...)``,
    ``modules`` the side modules' states by name (the caller loads them: :func:`module_state`)."""
    path = Path(path)
    tensors, metadata = open_safetensors(path)
    if metadata.get('format') != FORMAT:
        raise CheckpointError(f'{path} is not a jointrd training checkpoint (format {metadata.get("format")!r}).')
    strict_load(model, {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}, path)
    optim_meta = json.loads(metadata['optimizers'])
    for name, optimizer in (optimizers or {}).items():
        if optimizer is None:
            continue
        if name not in optim_meta:
            raise CheckpointError(f'{path} holds no state for optimizer {name!r} (has {sorted(optim_meta)}).')
        meta = optim_meta[name]
        state = {}
        for index, plain in meta['state'].items():
            prefix = f'optimizer.{name}.{index}.'
            state[int(index)] = dict(plain, **{k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        optimizer.load_state_dict(dict(state=state, param_groups=meta['param_groups']))
    sched_meta = json.loads(metadata['schedulers'])
    for name, scheduler in (schedulers or {}).items():
        if scheduler is not None and name in sched_meta:
            restore_progress(scheduler, sched_meta[name])
    if restore_rng:
        torch.set_rng_state(tensors['rng.torch'])
        cuda = [tensors[f'rng.cuda.{i}'] for i in range(sum(k.startswith('rng.cuda.') for k in tensors))]
        if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        py_state = json.loads(metadata['rng_python'])
        random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
        np_state = json.loads(metadata['rng_numpy'])
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    modules = {}
    for key, value in tensors.items():
        if key.startswith('module.'):
            name, _, rest = key[len('module.'):].partition('.')
            modules.setdefault(name, {})[rest] = value
    return dict(epoch=int(metadata['epoch']), extra=json.loads(metadata['extra']), modules=modules)


def module_state(path, state: Dict, name: str) -> Dict[str, torch.Tensor]:
    """The state of side module ``name`` in a :func:`load_checkpoint` result ``state``, or a CheckpointError
    naming what the checkpoint holds instead."""
    if name not in state['modules']:
        raise CheckpointError(f'{path} holds no state for {name!r} (it holds {sorted(state["modules"]) or "none"}); '
                              'it was written by a run without it: resume with the settings it was started with.')
    return state['modules'][name]


# where checkpoints keep their state dict: torchdistill's save_ckpt under 'model', timm's train.py under 'state_dict'
STATE_DICT_ENTRIES = ('model', 'state_dict')


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def convert_checkpoint(src, dst, entry: Optional[str] = None) -> Path:
    """Write the weights of a pickled checkpoint to ``dst`` as safetensors: its ``entry`` (default: the first of
    :data:`STATE_DICT_ENTRIES` that holds a state dict: torchdistill's ``save_ckpt`` file keeps it under ``model``,
    timm's train.py under ``state_dict``, and its weight average under ``state_dict_ema``), or the file itself when
    it is a bare state dict. Read with ``torch.load(weights_only=True)``: tensors, plain containers and
    argparse.Namespace (both store their arguments) only; anything else is refused by torch without being run. A
    DDP ``module.`` prefix is removed."""
    import argparse
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CheckpointError(f'No checkpoint at {src}.')
    if dst.suffix != '.safetensors':
        raise CheckpointError(f'The output {dst} must end in .safetensors.')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(src), map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError or EOFError by case
        raise CheckpointError(f'{src} cannot be read as a weights-only pickle (torch.load weights_only=True): '
                              f'{str(e).splitlines()[0][:300]}') from e
    entries = (entry,) if entry else STATE_DICT_ENTRIES
    found = [e for e in entries if isinstance(obj, dict) and _is_state_dict(obj.get(e))]
    state = obj[found[0]] if found else obj
    if not _is_state_dict(state):
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f'{src} holds no state dict of tensors under {" or ".join(map(repr, entries))}, nor is '
                              f'it one (found {keys}): name the entry that holds it with --entry.')
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    tensors = _tensors(state, '')
    # where the weights came from: the file, and its entry ('' for a bare state dict)
    metadata = dict(source=src.name, entry=found[0] if found else '')
    return atomic_write(dst, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
