"""``jointrd export``: a trained twin to deployable files, each checked against the eager model.

Folded (BN + Dirac) -> ONNX (run by onnxruntime) and TorchScript (traced), both compared with the eager model on
the same random input; the max abs error of each is reported. Files are written atomically.
"""
import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from ..io import atomic_write
from .fold import fold_for_deployment
from ..extras import require

__all__ = ['export_model', 'ExportError']


class ExportError(RuntimeError):
    """An exported file does not reproduce the eager model within tolerance."""


def _input(model: nn.Module, batch: int, input_size: Optional[int]) -> torch.Tensor:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    chans = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    size = input_size or cfg.get('input_size', (3, 224, 224))[-1]
    return torch.randn(batch, chans, size, size)


def export_model(model: nn.Module, out_dir, name: str = 'model', formats=('onnx', 'torchscript'),
                 input_size: Optional[int] = None, atol: float = 1e-3, opset: int = 17) -> Dict:
    """Export ``model`` (eval) to ``out_dir``; returns a report with files and max abs errors. Raises ExportError
    when an export deviates more than ``atol`` from the eager model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = _input(model, 2, input_size)
    with torch.no_grad():
        reference = model(x)
        folded, fold_report = fold_for_deployment(model)
        fold_error = (folded(x) - reference).abs().max().item()
    report = dict(fold=dict(fold_report, max_abs_error=fold_error), files={})
    if 'onnx' in formats:
        onnx = require('onnx', 'ONNX export')
        ort = require('onnxruntime', 'checking the ONNX export')
        require('onnxscript', 'ONNX export (torch.onnx)')
        path = out_dir / f'{name}.onnx'

        def write_onnx(tmp):
            torch.onnx.export(folded, (x,), str(tmp), input_names=['input'], output_names=['logits'],
                              dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}}, opset_version=opset,
                              dynamo=False)
            onnx.checker.check_model(str(tmp))
        atomic_write(path, write_onnx)
        session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
        got = session.run(None, {'input': x.numpy()})[0]
        report['files']['onnx'] = dict(path=str(path), max_abs_error=float(np.abs(got - reference.numpy()).max()))
    if 'torchscript' in formats:
        path = out_dir / f'{name}.torchscript.pt'
        with torch.no_grad():
            traced = torch.jit.trace(folded, x)
        atomic_write(path, lambda tmp: torch.jit.save(traced, str(tmp)))
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = loaded(x)
        report['files']['torchscript'] = dict(path=str(path), max_abs_error=(got - reference).abs().max().item())
    atomic_write(out_dir / f'{name}.export.json', lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    bad = {k: v['max_abs_error'] for k, v in report['files'].items() if v['max_abs_error'] > atol}
    if fold_error > atol:
        bad['fold'] = fold_error
    if bad:
        raise ExportError(f'Exports deviate from the eager model by more than {atol}: {bad}.')
    return report
