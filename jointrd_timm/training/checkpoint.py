"""Checkpoints in safetensors, written atomically; weights loading that refuses pickles.

A training checkpoint is ONE .safetensors file: the model's tensors under ``model.``, every optimizer's tensors
under ``optimizer.<name>.``, the torch RNG state under ``rng.torch``, and the rest (epoch, optimizer structure,
scheduler state, Python/NumPy RNG, user extras) as JSON in the safetensors metadata. It is written to a temporary
file beside the target and moved into place with ``os.replace``, so a crash never leaves a half-written file (the
temporary file a kill leaves behind is removed by the next run into the folder, see ``run_folder``).

Pickles are refused everywhere except :func:`convert_checkpoint`, which reads one with ``torch.load(...,
weights_only=True)`` (tensors and plain containers only, no code) to turn a torchdistill checkpoint into safetensors.
"""
import json
import os
import random
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .faults import fault_point

__all__ = ['atomic_write', 'save_checkpoint', 'load_checkpoint', 'load_weights', 'read_state_dict',
           'convert_checkpoint', 'CheckpointError', 'FORMAT', 'TMP_MARK']

FORMAT = 'jointrd-checkpoint/1'
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.ckpt')
TMP_MARK = '.tmp-'  # in the name of every temporary file of atomic_write: .<name>.tmp-<pid>


class CheckpointError(ValueError):
    """A weights or checkpoint file is missing, truncated, pickled, or does not match the model."""


def atomic_write(path: Union[str, Path], write, point: Optional[str] = None) -> Path:
    """Call ``write(tmp_path)`` then move tmp_path onto ``path`` atomically (``point``: a test-only fault point
    between the two, see ``faults``). A failed write (disk full) leaves the previous ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}{TMP_MARK}{os.getpid()}')
    try:
        write(tmp)
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        if point:
            fault_point(point)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


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
                    schedulers: Optional[Dict] = None, extra: Optional[Dict] = None) -> Path:
    """Save everything a resume needs. ``optimizers``/``schedulers`` are name -> object (None entries skipped)."""
    tensors = _tensors(model.state_dict(), 'model.')
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
    np_state = np.random.get_state()
    metadata = dict(format=FORMAT, epoch=str(epoch), optimizers=json.dumps(optim_meta),
                    schedulers=json.dumps(sched_meta), extra=json.dumps(extra or {}),
                    rng_python=json.dumps(random.getstate()),
                    rng_numpy=json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]))
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), point='checkpoint_write')


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f'No checkpoint at {path}.')
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f'{path} is a pickle file ({path.suffix}); only .safetensors is loaded (pickles can '
                              'run arbitrary code). If you trust it (e.g. a checkpoint of torchdistill\'s example '
                              f'script), convert its weights: jointrd convert-checkpoint {path} '
                              f'{path.with_suffix(".safetensors")}')
    try:
        with safe_open(str(path), 'pt') as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path} is not a readable .safetensors file (truncated or corrupt?): {e}') from e


def load_checkpoint(path, model: nn.Module, optimizers: Optional[Dict] = None,
                    schedulers: Optional[Dict] = None, restore_rng: bool = True) -> Dict:
    """Restore a :func:`save_checkpoint` file into live objects. Returns ``dict(epoch=..., extra=...)``."""
    path = Path(path)
    tensors, metadata = _open(path)
    if metadata.get('format') != FORMAT:
        raise CheckpointError(f'{path} is not a jointrd training checkpoint (format {metadata.get("format")!r}).')
    _load_strict(model, {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}, path)
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
            scheduler.__dict__.update(sched_meta[name])
    if restore_rng:
        torch.set_rng_state(tensors['rng.torch'])
        py_state = json.loads(metadata['rng_python'])
        random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))
        np_state = json.loads(metadata['rng_numpy'])
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return dict(epoch=int(metadata['epoch']), extra=json.loads(metadata['extra']))


def _load_strict(model: nn.Module, state: Dict[str, torch.Tensor], source) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f'{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f'{source} does not match {type(model).__name__}: {len(missing)} missing (e.g. {missing[:3]}), '
            f'{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mismatched)} mis-shaped '
            f'(e.g. {mismatched[:2]}). Check the architecture and num_classes it was trained with.')
    model.load_state_dict(state)


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """Model tensors from a weights file (``model.safetensors``), a training checkpoint, or a folder holding one
    (a Hub-format folder, or a runner output folder)."""
    path = Path(path)
    if path.is_dir():
        for name in ('model.safetensors', 'model/model.safetensors', 'last.safetensors'):
            if (path / name).is_file():
                return read_state_dict(path / name)
        bins = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f' It holds pickle files {bins}, which are refused.' if bins else ''
        raise CheckpointError(f'No model.safetensors or last.safetensors in folder {path}.{hint}')
    tensors, metadata = _open(path)
    if metadata.get('format') == FORMAT:
        return {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}
    return tensors


def load_weights(model: nn.Module, path, part: Optional[str] = None, skip: Optional[str] = None) -> nn.Module:
    """Load weights strictly from :func:`read_state_dict`'s sources. A training checkpoint of a JointRD run holds
    ``student.*`` and ``teacher.*``: loading it into a bare model takes the ``student.`` part, or the one named by
    ``part`` (e.g. ``'teacher'``, the teacher a joint-mode run trained along). ``skip``: a module name (e.g. the
    classifier ``'fc'``) whose tensors are neither loaded nor required; the model keeps its own."""
    state = read_state_dict(path)
    if part is not None:
        prefix = f'{part}.'
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointError(f'{path} holds no {part} tensors ({prefix}*): not a JointRD run')
    elif not any(k in model.state_dict() for k in state) and any(k.startswith('student.') for k in state):
        state = {k[len('student.'):]: v for k, v in state.items() if k.startswith('student.')}
    if skip:
        state = {k: v for k, v in state.items() if not k.startswith(skip + '.')}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(skip + '.')})
    _load_strict(model, state, path)
    return model


def convert_checkpoint(src, dst, entry: str = 'model') -> Path:
    """Write the weights of a pickled checkpoint (torchdistill's ``save_ckpt`` file: a dict whose ``model`` entry is
    the state dict, or a bare state dict) to ``dst`` as safetensors. Read with ``torch.load(weights_only=True)``:
    tensors, plain containers and argparse.Namespace (torchdistill stores its arguments) only; anything else is
    refused by torch without being run. A DDP ``module.`` prefix is removed."""
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
    state = obj.get(entry) if isinstance(obj, dict) and isinstance(obj.get(entry), dict) else obj
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f'{src} holds no state dict of tensors under {entry!r} (found {keys}).')
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    tensors = _tensors(state, '')
    return atomic_write(dst, lambda tmp: save_file(tensors, str(tmp), metadata=dict(source=src.name)))
