"""torchvision models, and their twins, by name: ``torchvision:<name>`` and ``plain_torchvision:<name>``.

The YAML's model kwargs (:func:`jointrd_timm.integrations.torchdistill.timm_model`, so ``jointrd_model``,
``fading_model`` and the other methods' models) take these names beside timm's, for a torchdistill user whose
teacher is a torchvision model: ``torchvision.models.get_model(name, **kwargs)`` builds it (``num_classes``,
``weights``: a torchvision weights name, read from torch's hub cache, ...), and the ``plain_`` name derives its twin
(:func:`~jointrd_timm.make_plain`, or :func:`~jointrd_timm.twins.fade.make_fading` with ``shortcut_fade=True``).
JointRD cuts such a model into stages from its forward (:mod:`jointrd_timm.methods.stages`).

The model carries what timm's models carry and the runner reads: ``num_classes`` and a ``pretrained_cfg`` (its name
as ``architecture``, torchvision's ImageNet reading of images: 224 px, crop 0.875, bilinear, ImageNet mean / std)
and ``pretrained_model_args`` (the builder's kwargs). :func:`save_torchvision_model` writes a trained one as
safetensors with a ``config.json`` of those; :func:`load_torchvision_folder` builds it back (``jointrd eval``,
``export`` and ``timm``-free loading go through :func:`jointrd_timm.integrations.hub.load_model`).
"""
import json
from pathlib import Path
from typing import Dict, Optional

from safetensors.torch import save_file
from torch import nn

from ..twins import make_plain
from ..twins.derive import TWIN_PREFIX
from ..twins.fade import make_fading

__all__ = ['TORCHVISION_PREFIX', 'torchvision_name', 'create_torchvision_model', 'save_torchvision_model',
           'load_torchvision_folder', 'is_torchvision_folder']

TORCHVISION_PREFIX = 'torchvision:'


def torchvision_name(model_name: str) -> Optional[str]:
    """The torchvision model ``model_name`` names (``torchvision:resnet18``, ``plain_torchvision:resnet18``), or
    None for any other name."""
    base = model_name[len(TWIN_PREFIX):] if model_name.startswith(TWIN_PREFIX) else model_name
    return base[len(TORCHVISION_PREFIX):] if base.startswith(TORCHVISION_PREFIX) else None


def create_torchvision_model(model_name: str, shortcut_fade: bool = False, keep_projection_shortcuts: bool = False,
                             **kwargs) -> nn.Module:
    """The torchvision model (``torchvision:<name>``) or its twin (``plain_torchvision:<name>``; ``shortcut_fade``:
    a fading twin, at s = 1 the residual model) built by ``torchvision.models.get_model(name, **kwargs)``.

    Raises:
        ValueError: an unknown name (with the close ones), twin arguments given to the residual model, or kwargs
            the torchvision builder does not take (timm's ``pretrained`` / ``in_chans``: say what to give instead).
    """
    from difflib import get_close_matches

    import torchvision
    name = torchvision_name(model_name)
    twin = model_name.startswith(TWIN_PREFIX)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = get_close_matches(name or '', known, n=5)
        raise ValueError(f'Unknown torchvision model {name!r} (in {model_name!r}): '
                         + (f'did you mean one of {close}? ' if close else '')
                         + 'torchvision.models.list_models() lists the classification models.')
    for flag, value in (('shortcut_fade', shortcut_fade), ('keep_projection_shortcuts', keep_projection_shortcuts)):
        if not isinstance(value, bool):
            raise ValueError(f'{model_name}: {flag} must be true or false, got {value!r}.')
        if value and not twin:
            raise ValueError(f'{model_name}: {flag} is an argument of the twin; name it '
                             f'{TWIN_PREFIX}{TORCHVISION_PREFIX}{name}.')
    for timm_only, instead in (('pretrained', "weights (a torchvision weights name, e.g. 'IMAGENET1K_V1')"),
                               ('in_chans', 'the images in 3 channels (torchvision models take 3)')):
        if timm_only in kwargs:
            raise ValueError(f'{model_name}: {timm_only} is a timm argument; torchvision models take {instead}.')
    model_args = {k: v for k, v in kwargs.items() if k not in ('weights', 'num_classes')}
    if keep_projection_shortcuts:
        model_args['keep_projection_shortcuts'] = True
    try:
        json.dumps(model_args)
    except (TypeError, ValueError) as e:
        raise ValueError(f'{model_name}: builder arguments {sorted(model_args)} include one that is not plain data '
                         f'({e}): the saved config.json could not record it, so the trained model could not be built '
                         'back. Give numbers, strings and lists only.') from None
    model = torchvision.models.get_model(name, **kwargs)
    if twin:
        (make_fading if shortcut_fade else make_plain)(model, keep_projection_shortcuts=keep_projection_shortcuts)
    model.num_classes = kwargs.get('num_classes', 1000)  # torchvision's builders default to ImageNet's 1000
    model.pretrained_cfg = dict(architecture=(TWIN_PREFIX if twin else '') + TORCHVISION_PREFIX + name,
                                num_classes=model.num_classes, **_IMAGENET_READING)
    model.pretrained_model_args = model_args
    return model


# how torchvision's classification weights read images (its ImageClassification transform)
_IMAGENET_READING = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation='bilinear', crop_mode='center',
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def save_torchvision_model(model: nn.Module, folder: Path, config_extra: Dict) -> None:
    """Write a (deployable) torchvision model built by :func:`create_torchvision_model` into ``folder`` (a new,
    empty folder that the caller moves into place): ``model.safetensors`` and ``config.json`` with its
    ``architecture``, ``num_classes``, ``model_args`` and ``pretrained_cfg`` (``config_extra`` replaces keys: a
    ``pretrained_cfg`` with the run's reading of the images, ``label_names``)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / 'model.safetensors'))
    cfg = dict(model.pretrained_cfg)
    config = dict(architecture=cfg['architecture'], num_classes=model.num_classes, library='torchvision',
                  model_args=dict(model.pretrained_model_args), pretrained_cfg=cfg)
    config.update(config_extra)
    (folder / 'config.json').write_text(json.dumps(config, indent=2) + '\n')


def is_torchvision_folder(folder: Path) -> bool:
    """``folder`` holds a model that :func:`save_torchvision_model` wrote."""
    config = Path(folder) / 'config.json'
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get('library') == 'torchvision'
    except json.JSONDecodeError:
        return False


def load_torchvision_folder(folder: Path, num_classes: Optional[int] = None) -> nn.Module:
    """The model :func:`save_torchvision_model` wrote into ``folder``, its weights loaded strictly. ``num_classes``
    other than the saved one keeps every weight but the classifier's (its last ``nn.Linear``), which is initialised
    afresh (as timm's ``create_model(..., num_classes=)`` does).

    Raises:
        CheckpointError: weights that do not fit the model config.json names."""
    from ..io import classifier_name, load_weights
    config = json.loads((Path(folder) / 'config.json').read_text())
    saved = config['num_classes']
    model = create_torchvision_model(config['architecture'], num_classes=num_classes or saved,
                                     **config.get('model_args', {}))
    # strict, with the checkpoint errors of every load; another class count: the classifier stays fresh
    load_weights(model, Path(folder) / 'model.safetensors',
                 skip=classifier_name(model) if num_classes and num_classes != saved else None)
    model.pretrained_cfg = dict(config['pretrained_cfg'], architecture=config['architecture'])
    if 'label_names' in config:
        model.pretrained_cfg['label_names'] = config['label_names']
    return model.eval()
