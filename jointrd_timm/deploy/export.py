"""``jointrd export``: a trained twin to deployable files, each checked against the eager model.

Folded (BN + Dirac) -> ONNX (run by onnxruntime) and TorchScript (traced), both compared with the eager model on
the same random input; the max abs error of each is reported. Files are written atomically.

An error above ``atol`` is judged against float32 itself: a deep net can amplify rounding so much (a random-init
twin without shortcuts, e.g. MambaOut's) that the eager float32 model is that far from its own float64 result. An
export then passes when it is no farther from the float64 result than twice the eager float32 model is; the report
records both distances (``float64_error`` per file, ``eager_float64_error``).
"""
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..errors import JointRDError
from ..io import atomic_write, file_in_the_way, input_channels
from ..twins.fade import is_fading, shortcut_scale
from .fold import fold_for_deployment
from ..extras import require

__all__ = ['export_model', 'ExportError', 'UnsupportedExportError']


class ExportError(JointRDError, RuntimeError):
    """An exported file does not reproduce the eager model within tolerance (its ``report`` attribute then holds the
    measured errors), or export was asked for what it cannot do."""
    report: Optional[Dict] = None


class UnsupportedExportError(JointRDError, RuntimeError):
    """The exporter has no translation for an operator of the model (e.g. halo attention's Unfold in ONNX)."""


def _input(model: nn.Module, batch: int, input_size) -> torch.Tensor:
    """A random batch the model takes: the first conv's input channels, or the configured ones when the stem
    rearranges its input before any conv (TResNet's space-to-depth: the first conv sees 16x the channels); its
    height and width ``input_size`` (one side, or (height, width)), by default the model's configured ones."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if input_size is None:
        height, width = (int(v) for v in tuple(cfg.get('input_size', (3, 224, 224)))[-2:])
    elif isinstance(input_size, (tuple, list)):  # (height, width), or a pretrained_cfg's (channels, h, w)
        height, width = (int(v) for v in tuple(input_size)[-2:])
    else:
        height = width = int(input_size)
    first_conv = input_channels(model) or 3
    candidates = dict.fromkeys([first_conv, cfg.get('input_size', (3,))[0]])
    for chans in candidates:
        try:
            x = torch.randn(batch, chans, height, width)
        except RuntimeError as e:  # the allocator's refusal, e.g. --input-size 100000
            raise ExportError(f'An example input of {batch}x{chans}x{height}x{width} does not fit in memory '
                              f'({str(e).splitlines()[0][:120]}): give the input size the model takes (--input-size, '
                              'input_size=).') from e
        try:
            with torch.no_grad():
                model(x[:1])
        except (RuntimeError, AssertionError, ValueError):
            continue
        return x
    return torch.randn(batch, first_conv, height, width)  # let export_model report the model's own error


def _tensors(output, model_name: str = 'the model') -> list:
    """A model's output as a list of tensors: one for a classifier, one per feature map for a feature extractor."""
    found = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, (list, tuple)) \
        else None
    if found is None or not found or not all(isinstance(t, torch.Tensor) for t in found):
        raise UnsupportedExportError(f'{model_name} returns {type(output).__name__}, not a tensor or a list of '
                                     'tensors: export exports models with tensor outputs.')
    return found


def _max_error(got: list, expected: list) -> float:
    """The largest absolute difference over every output."""
    return max((g.double() - e.double()).abs().max().item() for g, e in zip(got, expected))


def export_model(model: nn.Module, out_dir, name: str = 'model', formats=('onnx', 'torchscript'),
                 input_size=None, atol: float = 1e-3, opset: int = 17) -> Dict:
    """Export ``model`` (eval) to ``out_dir``; returns a report with files and max abs errors. ``input_size``: the
    traced input's side, or (height, width); default the model's configured input size. Raises ExportError
    when an export (or the folded model) deviates more than ``atol`` from the eager model and is farther from the
    model's float64 result than twice the eager float32 model is."""
    out_dir = Path(out_dir)
    if not isinstance(name, str) or not name or name in ('.', '..') or any(c in name for c in '/\\'):
        raise ExportError(f'The export name {name!r} names the files (NAME.onnx, ...) inside the output folder: give a '
                          'file name without a folder (no / or \\), and choose the folder with --output-dir.')
    blocker = file_in_the_way(out_dir)
    if blocker is not None:
        raise ExportError(f'Output folder {out_dir} cannot be created: {blocker} is a file, not a folder; choose '
                          'another --output-dir.')
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = sorted(set(formats) - {'onnx', 'torchscript'})
    if unknown or not formats:
        raise ExportError(f'Export formats {unknown or list(formats)}: export writes "onnx" and "torchscript"; give '
                          'one or both.')
    if is_fading(model):
        raise ExportError(f'{type(model).__name__} is a fading twin (shortcut scale s = {shortcut_scale(model):g}): '
                          'what deploys is jointrd_timm.deployable(model), its fade finished once s = 0 (a model '
                          'trained to the end of its fade); export that.')
    model = model.eval()
    x = _input(model, 2, input_size)
    with torch.no_grad():
        try:
            reference = model(x)
            single = isinstance(reference, torch.Tensor)  # a classifier; else a feature extractor's list of maps
        except (RuntimeError, AssertionError, ValueError) as e:  # e.g. a ViT built for another image size
            if 'out of memory' in str(e):
                raise
            raise ExportError(f'{type(model).__name__} does not run on an example input of shape {tuple(x.shape)}: '
                              f'{type(e).__name__}: {str(e)[:200]} If it takes another input size, give that '
                              '(--input-size, input_size=).') from e
        folded, fold_report = fold_for_deployment(model)
        reference = _tensors(reference, type(model).__name__)
        folded_out = _tensors(folded(x))
    traced = _Traced(model, folded, x, reference, single, folded_out,
                     dict(fold_report, max_abs_error=_max_error(folded_out, reference)))
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the model runs: a refusal leaves nothing behind
    # every file is written and checked in a hidden staging folder, and moved into out_dir only once all passed: a
    # failed export leaves no file that looks like one (and keeps an earlier export of the same name)
    staging = Path(tempfile.mkdtemp(prefix=f'.{name}.export-', dir=out_dir))
    try:
        report = _export_checked(traced, formats, staging, name, atol, opset)
        for entry in report['files'].values():
            final = out_dir / Path(entry['path']).name
            os.replace(entry['path'], final)
            entry['path'] = str(final)
        atomic_write(out_dir / f'{name}.export.json', lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
    return report


@dataclasses.dataclass
class _Traced:
    """What every export is checked against: the eager ``model``, its ``folded`` form and the example input ``x``,
    with the eager outputs (``reference``: one tensor for a classifier, ``single``; a feature extractor's maps
    otherwise), the folded model's outputs and the fold's report."""
    model: nn.Module
    folded: nn.Module
    x: torch.Tensor
    reference: list
    single: bool
    folded_out: list
    fold: Dict


def _write_onnx(traced: _Traced, path: Path, opset: int) -> list:
    """``traced.folded`` as ONNX at ``path`` (checked by onnx), and its outputs on ``traced.x`` in onnxruntime."""
    onnx = require('onnx', 'ONNX export')
    ort = require('onnxruntime', 'checking the ONNX export')
    require('onnxscript', 'ONNX export (torch.onnx)')
    # one output: 'logits'; a feature extractor's (features_only): 'features0', 'features1', ...
    names = ['logits'] if traced.single else [f'features{i}' for i in range(len(traced.reference))]

    def write(tmp):
        try:
            torch.onnx.export(traced.folded, (traced.x,), str(tmp), input_names=['input'], output_names=names,
                              dynamic_axes={n: {0: 'batch'} for n in ['input', *names]}, opset_version=opset,
                              dynamo=False)
        except (torch.onnx.errors.OnnxExporterError, TypeError, RuntimeError) as e:  # no translation (a TypeError
            if 'out of memory' in str(e):  # for a ViT's attention: 'is_causal must be bool, not Tensor')
                raise
            raise UnsupportedExportError(
                f'torch.onnx cannot export {type(traced.model).__name__}: {str(e).splitlines()[0][:200]} Export it '
                "as TorchScript only (formats=('torchscript',)).") from e
        onnx.checker.check_model(str(tmp))
    atomic_write(path, write)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {'input': traced.x.numpy()})]


def _write_torchscript(traced: _Traced, path: Path) -> list:
    """``traced.folded`` traced to TorchScript at ``path``, and the loaded file's outputs on ``traced.x``."""
    with torch.no_grad():
        # a list of feature maps (even of one): not strict
        script = torch.jit.trace(traced.folded, traced.x, strict=traced.single)
    atomic_write(path, lambda tmp: torch.jit.save(script, str(tmp)))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        return _tensors(loaded(traced.x))


def _export_checked(traced: _Traced, formats, out_dir: Path, name: str, atol: float, opset: int) -> Dict:
    """The exports of :func:`export_model` written into ``out_dir`` (its staging folder) and checked; the report, or
    an ExportError when one deviates."""
    model, x, reference = traced.model, traced.x, traced.reference
    outputs = {}
    report = dict(fold=traced.fold, files={}, input_shape=list(x.shape[1:]))
    for kind, file_name, write in (('onnx', f'{name}.onnx', lambda path: _write_onnx(traced, path, opset)),
                                   ('torchscript', f'{name}.torchscript.pt',
                                    lambda path: _write_torchscript(traced, path))):
        if kind in formats:
            path = out_dir / file_name
            got = outputs[kind] = write(path)
            report['files'][kind] = dict(path=str(path), max_abs_error=_max_error(got, reference))
    outputs['fold'] = traced.folded_out
    entries = dict(report['files'], fold=report['fold'])
    bad = {k: v['max_abs_error'] for k, v in entries.items() if v['max_abs_error'] > atol}
    if bad:  # how far float32 itself is from the exact result decides whether the deviation is the export's
        with torch.no_grad():
            exact = _tensors(copy.deepcopy(model).double()(x.double()))
        eager = _max_error(reference, exact)
        report['eager_float64_error'] = eager
        for k in bad:
            entries[k]['float64_error'] = _max_error(outputs[k], exact)
        bad = {k: v for k, v in bad.items() if entries[k]['float64_error'] > 2 * eager}
    if bad:
        error = ExportError(f'Exports deviate from the eager model by more than {atol}, and from its float64 result '
                            f'by more than twice the eager float32 model does ({report["eager_float64_error"]:.3g}): '
                            f'{bad}. No file was written.')
        error.report = report  # what export.json would have held, its files' paths in the removed staging folder
        raise error
    return report
