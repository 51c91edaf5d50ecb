"""torchvision models, and their twins, by name: ``torchvision:<name>`` and ``plain_torchvision:<name>``.

The YAML's model kwargs (:func:`jointrd_timm.integrations.torchdistill.timm_model`, so ``jointrd_model``,
``fading_model`` and the other methods' models) take these names beside timm's, for a torchdistill user whose
teacher is a torchvision model: ``torchvision.models.get_model(name, **kwargs)`` builds it (``num_classes``,
``weights``: a torchvision weights name, read from torch's hub cache, with a fresh classifier where ``num_classes``
differs from the weights' classes, ...), and the ``plain_`` name derives its twin
(:func:`~jointrd_timm.make_plain`, or :func:`~jointrd_timm.twins.fade.make_fading` with ``shortcut_fade=True``).
JointRD cuts such a model into stages from its forward (:mod:`jointrd_timm.methods.stages`).

The model carries what timm's models carry and the runner reads: ``num_classes`` and a ``pretrained_cfg`` (its name
as ``architecture``, how its weights read images, or without weights how its default weights do: size, crop,
interpolation, mean / std)
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

__all__ = ['TORCHVISION_PREFIX', 'torchvision_name', 'check_torchvision_name', 'torchvision_weights',
           'weights_reading', 'default_reading', 'weights_file', 'missing_weights_text', 'MissingTorchvisionWeights',
           'create_torchvision_model', 'create_named_model', 'save_torchvision_model',
           'load_torchvision_folder', 'is_torchvision_folder']

TORCHVISION_PREFIX = 'torchvision:'


def torchvision_name(model_name: str) -> Optional[str]:
    """The torchvision model ``model_name`` names (``torchvision:resnet18``, ``plain_torchvision:resnet18``), or
    None for any other name."""
    base = model_name[len(TWIN_PREFIX):] if model_name.startswith(TWIN_PREFIX) else model_name
    return base[len(TORCHVISION_PREFIX):] if base.startswith(TORCHVISION_PREFIX) else None


def check_torchvision_name(model_name: str) -> str:
    """The torchvision classification model ``model_name`` names (``[plain_]torchvision:<name>``).

    Raises:
        ValueError: not such a name, or an unknown model (with the close ones)."""
    from difflib import get_close_matches

    import torchvision
    name = torchvision_name(model_name)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = get_close_matches(name or '', known, n=5)
        raise ValueError(f'Unknown torchvision model {name!r} (in {model_name!r}): '
                         + (f'did you mean one of {close}? ' if close else '')
                         + 'torchvision.models.list_models() lists the classification models.')
    return name


class MissingTorchvisionWeights(RuntimeError):
    """torchvision weights that are neither in torch's hub cache nor downloadable here."""


def torchvision_weights(name: str, weights):
    """The torchvision weights enum member of model ``name`` that ``weights`` names ('IMAGENET1K_V1', 'DEFAULT',
    'ResNet18_Weights.IMAGENET1K_V1' or the member itself).

    Raises:
        ValueError: weights the model does not have (listing the ones it has)."""
    import torchvision
    enum = torchvision.models.get_model_weights(name)
    if isinstance(weights, enum):
        return weights
    key = str(weights)
    key = key[len(enum.__name__) + 1:] if key.startswith(enum.__name__ + '.') else key
    if key not in enum.__members__:
        raise ValueError(f'torchvision model {name} has no weights {weights!r}; its weights: '
                         f'{", ".join(enum.__members__)}.')
    return enum[key]


def weights_file(weights) -> Path:
    """Where torch's hub cache keeps the file of torchvision ``weights`` (an enum member)."""
    import torch
    from urllib.parse import urlparse
    return Path(torch.hub.get_dir()) / 'checkpoints' / Path(urlparse(weights.url).path).name


def missing_weights_text(name: str, weights, error: Exception) -> str:
    """What a user reads when torchvision ``weights`` of model ``name`` cannot be had: the file looked for, why, and
    the ways to provide it."""
    path = weights_file(weights)
    return (f'The torchvision weights {type(weights).__name__}.{weights.name} of {name} are not available: {path} is '
            f'not in torch\'s hub cache and {weights.url} could not be downloaded ({type(error).__name__}: '
            f'{str(error).splitlines()[0] if str(error) else ""}). Nothing was written. Provide them, then run the '
            f'same command again: download that file on a connected machine and copy it to {path} (TORCH_HOME moves '
            'the cache), or save the model\'s state dict as safetensors and give it with its architecture '
            '(jointrd distill torchvision:NAME --teacher-weights FILE).')


def weights_reading(weights) -> Dict:
    """How torchvision ``weights`` (an enum member) read images, in timm's pretrained_cfg terms: their
    ``ImageClassification`` transform's crop and resize (as ``input_size`` and ``crop_pct``), interpolation, mean and
    std."""
    import inspect

    transform = weights.transforms
    defaults = {k: p.default for k, p in inspect.signature(transform.func).parameters.items()
                if p.default is not inspect.Parameter.empty}
    args = dict(defaults, **transform.keywords)
    crop = args['crop_size']
    interpolation = args.get('interpolation')
    return dict(input_size=(3, crop, crop), crop_pct=crop / args.get('resize_size', crop), crop_mode='center',
                interpolation=getattr(interpolation, 'value', interpolation or 'bilinear'),
                mean=tuple(args['mean']), std=tuple(args['std']))


def default_reading(name: str) -> Dict:
    """How the default weights of torchvision model ``name`` read images (:func:`weights_reading`): the reading of
    the model built without weights, as a bare timm model carries its default tag's. Metadata only, nothing
    fetched."""
    import torchvision
    return weights_reading(torchvision.models.get_model_weights(name).DEFAULT)


def _fresh_classifier(model: nn.Module, num_classes: int, model_name: str) -> None:
    """Replace the classifier (the model's last ``nn.Linear``, as :func:`jointrd_timm.io.classifier_name` finds it)
    by a freshly initialised one with ``num_classes`` outputs."""
    from ..io import classifier_name
    head = classifier_name(model)
    old = model.get_submodule(head) if head else None
    if not isinstance(old, nn.Linear):
        raise ValueError(f'{model_name}: its classifier is not one nn.Linear, so weights for other classes cannot be '
                         'loaded with a fresh one; give num_classes as the weights have them.')
    parent, _, leaf = head.rpartition('.')
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    new.to(old.weight.device, old.weight.dtype)
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def create_torchvision_model(model_name: str, shortcut_fade: bool = False, keep_projection_shortcuts: bool = False,
                             reset_head: bool = False, **kwargs) -> nn.Module:
    """The torchvision model (``torchvision:<name>``) or its twin (``plain_torchvision:<name>``; ``shortcut_fade``:
    a fading twin, at s = 1 the residual model) built by ``torchvision.models.get_model(name, **kwargs)``.
    ``weights`` (a torchvision weights name) with another ``num_classes`` than theirs, or ``reset_head``: every weight
    loaded but the classifier's, which is initialised afresh (as timm's ``create_model(..., num_classes=)`` does).
    ``in_chans`` is taken for timm's sake when it is 3 (torchvision models read RGB).

    Raises:
        ValueError: an unknown name (with the close ones) or weights name, twin arguments given to the residual model,
            or kwargs the torchvision builder does not take (timm's ``pretrained``, ``in_chans`` other than 3: say
            what to give instead).
        MissingTorchvisionWeights: ``weights`` neither in torch's hub cache nor downloadable.
    """
    import torchvision
    name = check_torchvision_name(model_name)
    twin = model_name.startswith(TWIN_PREFIX)
    for flag, value in (('shortcut_fade', shortcut_fade), ('keep_projection_shortcuts', keep_projection_shortcuts)):
        if not isinstance(value, bool):
            raise ValueError(f'{model_name}: {flag} must be true or false, got {value!r}.')
        if value and not twin:
            raise ValueError(f'{model_name}: {flag} is an argument of the twin; name it '
                             f'{TWIN_PREFIX}{TORCHVISION_PREFIX}{name}.')
    if kwargs.get('in_chans', 3) == 3:
        kwargs.pop('in_chans', None)
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
    weights = kwargs.get('weights')
    build = dict(kwargs)
    if weights is not None:
        weights = build['weights'] = torchvision_weights(name, weights)
        build['num_classes'] = len(weights.meta['categories'])
    # default: the weights' classes; without weights torchvision's builders default to ImageNet's 1000
    num_classes = kwargs.get('num_classes', build.get('num_classes', 1000))
    try:
        model = torchvision.models.get_model(name, **build)
    except OSError as e:  # not cached, and the download failed (urllib's URLError is an OSError)
        if weights is None:
            raise
        raise MissingTorchvisionWeights(missing_weights_text(name, weights, e)) from e
    if weights is not None and (reset_head or num_classes != build['num_classes']):
        _fresh_classifier(model, num_classes, model_name)
    elif reset_head:
        raise ValueError(f'{model_name}: reset_head needs weights whose head to reset (a torchvision weights name, or '
                         'a checkpoint).')
    if twin:
        (make_fading if shortcut_fade else make_plain)(model, keep_projection_shortcuts=keep_projection_shortcuts)
    model.num_classes = num_classes
    reading = weights_reading(weights) if weights is not None else default_reading(name)
    model.pretrained_cfg = dict(architecture=(TWIN_PREFIX if twin else '') + TORCHVISION_PREFIX + name,
                                num_classes=model.num_classes, **reading)
    model.pretrained_model_args = model_args
    return model


def create_named_model(model_name: str, **kwargs) -> nn.Module:
    """The model ``model_name`` names, built with ``kwargs``: a torchvision name (``[plain_]torchvision:<name>``,
    :func:`create_torchvision_model`) or any name ``timm.create_model`` takes. The builder of the commands that take
    either by name (``jointrd derive``, ``memory``, ``bench``)."""
    if torchvision_name(model_name) is not None:
        return create_torchvision_model(model_name, **kwargs)
    import timm
    import jointrd_timm  # noqa: F401  (the plain_* and CIFAR names)
    return timm.create_model(model_name, **kwargs)


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
