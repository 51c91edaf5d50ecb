"""Files and models in and out, shared by every layer: atomic writes, safetensors reading with its format checks,
strict weight loading from any of our sources, unwrapping, top-1 accuracy.

Pickles are refused everywhere (they can run code); ``training.checkpoint.convert_checkpoint`` turns a trusted one
into safetensors.
"""
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from .errors import JointRDError
from .faults import fault_point

__all__ = ['atomic_write', 'file_in_the_way', 'read_state_dict', 'load_weights', 'open_safetensors', 'strict_load',
           'unwrap', 'classifier_module', 'classifier_name', 'input_channels', 'top1_accuracy', 'top1_predictions',
           'top1_agreement', 'near_chance', 'CheckpointError', 'FORMAT', 'PICKLE_SUFFIXES', 'TMP_MARK', 'with_reading',
           'with_module_versions']

FORMAT = 'jointrd-checkpoint/1'  # the metadata format of a training checkpoint (training.checkpoint)
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.ckpt')
TMP_MARK = '.tmp-'  # in the name of every temporary file of atomic_write: .<name>.tmp-<pid>


class CheckpointError(JointRDError, ValueError):
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


def file_in_the_way(folder: Union[str, Path]) -> Optional[Path]:
    """The file (not a folder) at ``folder`` or at its nearest existing parent, which keeps ``folder`` from being
    created or used as a folder; None when there is none."""
    absolute = Path(os.path.abspath(folder))
    for parent in (absolute, *absolute.parents):
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def open_safetensors(path: Path):
    """(tensors, metadata) of a .safetensors file, or a CheckpointError saying why not."""
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


def with_module_versions(state, model: nn.Module, versions_of=None):
    """``state`` with module versions (a state dict's ``_metadata``) for ``model.load_state_dict``: its own, else
    those of ``versions_of`` (a state dict), else ``model``'s own. A state dict read from safetensors carries none, and
    a module that reads its version when loading (torchvision's MNASNet) refuses it without; the tensors were written
    from a model of the code that loads them."""
    if getattr(state, '_metadata', None) is not None:
        return state
    versioned = OrderedDict(state)
    versioned._metadata = getattr(versions_of, '_metadata', None) or model.state_dict()._metadata
    return versioned


def strict_load(model: nn.Module, state: Dict[str, torch.Tensor], source) -> None:
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
    model.load_state_dict(with_module_versions(state, model))


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
    tensors, metadata = open_safetensors(path)
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
    strict_load(model, state, path)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / accelerate wrappers."""
    while hasattr(model, 'module'):
        model = model.module
    return model


def classifier_module(model: nn.Module) -> Optional[nn.Module]:
    """The module that computes ``model``'s logits: a timm model's ``get_classifier()``; for a model without it
    (torchvision's) its last ``nn.Linear``, the classifier torchvision registers last; None when it has neither."""
    if hasattr(model, 'get_classifier'):
        return model.get_classifier()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def classifier_name(model: nn.Module) -> Optional[str]:
    """The module name of :func:`classifier_module` (``'fc'``, ``'classifier.1'``), or None without one."""
    head = classifier_module(model)
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None \
        else None


def input_channels(model: nn.Module) -> Optional[int]:
    """The image channels ``model`` takes: its first convolution's input channels, over block_size² when a
    space-to-depth stem rearranges the image before it (TResNet: the first conv sees 16x the channels); None for a
    model without a convolution."""
    from timm.layers import SpaceToDepth
    block = 1
    for module in model.modules():
        if isinstance(module, SpaceToDepth):
            block = module.bs
        elif isinstance(module, nn.Conv2d):
            return module.in_channels // (block * block)
    return None


@torch.no_grad()
def top1_predictions(model: nn.Module, data, batch_size: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-1 classes of ``model`` (put in eval mode) over a dataset of (image, label) pairs, and the labels."""
    from torch.utils.data import DataLoader
    model.eval()
    predicted, labels = [], []
    for images, targets in DataLoader(data, batch_size=batch_size):
        predicted.append(model(images).argmax(1))
        labels.append(torch.as_tensor(targets))
    if not predicted:
        raise ValueError('top1_predictions: the dataset holds no images')
    return torch.cat(predicted), torch.cat(labels)


def top1_accuracy(model: nn.Module, data, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) of ``model`` (put in eval mode) over a dataset of (image, label) pairs."""
    predicted, labels = top1_predictions(model, data, batch_size)
    return 100.0 * int((predicted == labels).sum()) / len(labels)


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share (%) of images on which two models' top-1 classes (:func:`top1_predictions`) are the same."""
    if a.shape != b.shape or not len(a):
        raise ValueError(f'top1_agreement compares two models\' classes on the same images: got {tuple(a.shape)} and '
                         f'{tuple(b.shape)}')
    return 100.0 * int((a == b).sum()) / len(a)


# a model at less than this share of the accuracy above chance that a model can have (100 % - chance), and below
# twice chance, has learned (almost) nothing: too few steps, a diverged run, labels that do not match the images
NEAR_CHANCE = 0.1


def near_chance(accuracy: float, num_classes: Optional[int], share: float = NEAR_CHANCE) -> bool:
    """Whether a top-1 ``accuracy`` (%) over ``num_classes`` classes lies less than ``share`` of the way from chance
    (100 / ``num_classes``) to 100 % and below twice chance (with many classes a tenth of the way is many times
    chance: a model that learned something). False when the class count is unknown or below 2."""
    if not num_classes or num_classes < 2:
        return False
    chance = 100.0 / num_classes
    return accuracy - chance < share * (100.0 - chance) and accuracy < 2 * chance


# the test-time entries of a pretrained_cfg (a larger evaluation size or crop): they belong to the architecture's
# default reading, not to a reading a run saved
TEST_TIME_KEYS = ('test_input_size', 'test_crop_pct')


def with_reading(cfg: Dict, reading: Optional[Dict]) -> Dict:
    """``cfg`` (a pretrained_cfg as a dict) with a saved ``reading`` of the images (input size, crop, interpolation,
    mean / std: how a run read its test set) in place of the architecture's, its test-time size and crop dropped;
    ``cfg`` unchanged without a reading."""
    if not reading:
        return dict(cfg)
    return dict({k: v for k, v in cfg.items() if k not in TEST_TIME_KEYS}, **reading)
