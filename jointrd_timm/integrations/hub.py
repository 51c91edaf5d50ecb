"""Trained models in timm's Hugging Face Hub format: config.json + model.safetensors (+ README.md model card).

Saving folds what only exists for training (Dirac parametrisation) so the files hold a plain, deployable twin
that ``timm.create_model('local-dir:<folder>', pretrained=True)`` or ``'hf-hub:org/name'`` loads back.
"""
import copy
import json
import shutil
from pathlib import Path
from typing import Dict, Optional

from torch import nn

from ..training.checkpoint import atomic_write
from ..twins.dirac import fold_dirac, has_dirac

__all__ = ['save_trained_model', 'load_model']


def save_trained_model(model: nn.Module, folder, metrics: Optional[Dict] = None, model_card: Optional[str] = None) -> Path:
    """Write ``model`` to ``folder`` in timm's Hub format (never pickle). Returns the folder."""
    from timm.models import save_for_hf
    folder = Path(folder)
    if has_dirac(model):
        model = fold_dirac(copy.deepcopy(model))
    model_args = dict(getattr(model, 'pretrained_model_args', None) or {})
    if 'dirac' in model_args:
        model_args['dirac'] = False  # folded: plain convs now
    model_args['num_classes'] = getattr(model, 'num_classes', None)
    in_chans = model.pretrained_cfg.get('input_size', (3,))[0] if hasattr(model, 'pretrained_cfg') else 3
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != in_chans:
        model_args['in_chans'] = first_conv.in_channels
    tmp = folder.with_name(f'.{folder.name}.tmp')
    if tmp.exists():
        shutil.rmtree(tmp)
    save_for_hf(model, str(tmp), model_args={k: v for k, v in model_args.items() if v is not None},
                safe_serialization=True)
    if metrics:
        (tmp / 'metrics.json').write_text(json.dumps(metrics, indent=1))
    if model_card:
        (tmp / 'README.md').write_text(model_card)
    _replace_folder(tmp, folder)
    return folder


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Swap a fully written folder into place (rename is atomic; the old one is removed after)."""
    old = folder.with_name(f'.{folder.name}.old')
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def load_model(spec: str, **kwargs) -> nn.Module:
    """A model from wherever a user has one: a timm / plain_* name (``name.tag`` loads that tag's weights),
    ``hf-hub:org/name``, ``local-dir:path``, a Hub-format folder, or a runner output folder (its ``model/``)."""
    import timm
    import jointrd_timm  # noqa: F401  (plain_* names)
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / 'model' if (path / 'model' / 'config.json').is_file() else path
        if not (folder / 'config.json').is_file():
            raise FileNotFoundError(f'{spec} holds no config.json (nor model/config.json): not a Hub-format folder '
                                    'or a runner output folder.')
        return timm.create_model(f'local-dir:{folder}', pretrained=True, **kwargs)
    pretrained = spec.startswith(('hf-hub:', 'local-dir:')) or '.' in spec
    return timm.create_model(spec, pretrained=pretrained, **kwargs)
