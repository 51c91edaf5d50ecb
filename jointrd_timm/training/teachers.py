"""The TEACHER of ``jointrd distill``: what a timm name, pretrained tag, ``hf-hub:`` id or folder resolves to
(:func:`resolve_teacher`, no weights loaded), and its weights (:func:`load_teacher`). Weights the Hub cannot provide
are named with the ways to provide them (:func:`missing_weights_error`).

A torchvision model is a TEACHER too: ``torchvision:<name>`` (trained here, or with ``--teacher-weights``),
``torchvision:<name>.<weights>`` (torchvision's weights, e.g. ``IMAGENET1K_V1``, from torch's hub cache), or a folder
that ``jointrd train`` / ``distill`` wrote for one; its twin is ``plain_torchvision:<name>``."""
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch

from ..integrations.hub import HUB_DOWNLOAD_ERRORS, hub_repo, missing_weights_message
from ..io import CheckpointError
from .distill_inputs import DistillError

__all__ = ['Teacher', 'resolve_teacher', 'with_weights_file', 'load_teacher', 'missing_weights_error',
           'extract_run_teacher', 'build_model', 'tag_hint', 'HUB_DOWNLOAD_ERRORS']

@dataclass
class Teacher:
    """A resolved TEACHER: its architecture and the ``timm_model`` kwargs that build it with its weights."""
    spec: str
    arch: str
    model: Dict
    num_classes: Optional[int]  # of its weights; None: no weights (trained here from scratch)
    in_chans: int
    input_size: int
    license: str = 'other'
    run_checkpoint: Optional[Path] = None  # a JointRD run's checkpoint, holding the teacher as `teacher.*`
    # how its weights expect images (mean, std, interpolation, crop_pct, crop_mode of its pretrained_cfg); None: no
    # weights, or no such config
    data_cfg: Optional[Dict] = None
    weights_file: Optional[Path] = None  # a .safetensors state dict given with --teacher-weights
    # the builder arguments that shape a torchvision teacher (and its twin) beyond num_classes: its saved model_args
    model_args: Dict = field(default_factory=dict)

    @property
    def torchvision(self) -> bool:
        """A torchvision model (``torchvision:<name>``), which reads 3-channel images whatever the data."""
        from ..models.torchvision_models import torchvision_name
        return torchvision_name(self.arch) is not None


def _reading(cfg) -> Optional[Dict]:
    """The preprocessing a pretrained_cfg (dict or timm's PretrainedCfg) states, input size aside; None without mean
    and std."""
    from .data import DATA_CFG_KEYS
    get = cfg.get if isinstance(cfg, dict) else (lambda key: getattr(cfg, key, None))
    reading = {k: get(k) for k in DATA_CFG_KEYS if k != 'input_size' and get(k) is not None}
    if 'mean' not in reading or 'std' not in reading:
        return None
    reading['mean'], reading['std'] = tuple(reading['mean']), tuple(reading['std'])
    return reading


def _from_config_json(spec: str, model: Dict, config: Dict, arch: Optional[str] = None) -> Teacher:
    """A Teacher from timm's Hub config.json (``save_for_hf``'s layout)."""
    pretrained_cfg = config.get('pretrained_cfg', config)
    model_args = config.get('model_args') or {}
    input_size = pretrained_cfg.get('input_size', (3, 224, 224))
    arch = arch or config['architecture'].partition('.')[0]
    if arch.startswith('plain_'):
        raise DistillError(f'{spec} holds a shortcut-free twin ({arch}), not a residual teacher; give the residual '
                           f'model it was trained from (e.g. {arch[len("plain_"):]} with its weights).')
    return Teacher(spec, arch, model, config.get('num_classes', pretrained_cfg.get('num_classes')),
                   model_args.get('in_chans', input_size[0]), input_size[-1], pretrained_cfg.get('license') or 'other',
                   data_cfg=_reading(pretrained_cfg))


def _teacher_from_folder(spec: str, path: Path) -> Teacher:
    from ..models.plain_twins import teacher_of
    folder = path / 'model' if (path / 'model' / 'config.json').is_file() else path
    if not (folder / 'config.json').is_file():
        if (path / 'last.safetensors').is_file():
            raise DistillError(f'Teacher folder {path} is a runner output whose run has not finished: no '
                               'model/config.json names its architecture. Finish it (jointrd train --resume) first.')
        raise DistillError(f'Teacher folder {path} holds neither config.json + model.safetensors (timm\'s Hub format, '
                           'as `jointrd save` writes) nor a runner output (model/ or last.safetensors).')
    config = json.loads((folder / 'config.json').read_text())
    if config['architecture'].startswith('plain_') and (path / 'distill.yaml').is_file():
        trained = path / 'teacher' / 'model'
        raise DistillError(f'{path} is the output of jointrd distill: its model/ is the twin. To distill from the same '
                           f'teacher again, give {path / "twin"} (the JointRD run: its checkpoint holds the teacher)'
                           + (f' or {trained} (the teacher trained there)' if (trained / 'config.json').is_file()
                              else '') + '.')
    if config['architecture'].startswith('plain_') and (path / 'last.safetensors').is_file():
        # a JointRD run: model/ is its twin, the teacher is the `teacher.` part of its checkpoint
        teacher = _from_config_json(spec, {}, config, teacher_of(config['architecture']))
        teacher.run_checkpoint = path / 'last.safetensors'
        if teacher.torchvision:  # its builder arguments are the twin's, less the twin's own
            from ..integrations.torchdistill import architecture_kwargs
            teacher.model_args = architecture_kwargs(dict(config.get('model_args', {}), model_name=teacher.arch))
            teacher.model = dict(model_name=teacher.arch, **teacher.model_args)
        return teacher
    if config.get('library') == 'torchvision':
        teacher = _from_config_json(spec, torchvision_folder_kwargs(folder, config), config)
        teacher.model_args = dict(config.get('model_args', {}))
        return teacher
    return _from_config_json(spec, dict(model_name=f'local-dir:{folder.resolve()}', pretrained=True), config)


def torchvision_folder_kwargs(folder: Path, config: Optional[Dict] = None) -> Dict:
    """``timm_model`` kwargs of the torchvision model saved in ``folder`` (its config.json's architecture, classes
    and builder arguments, and its weights as the checkpoint); ``config``: that config.json, read already."""
    config = config if config is not None else json.loads((Path(folder) / 'config.json').read_text())
    return dict(model_name=config['architecture'], num_classes=config['num_classes'], **config.get('model_args', {}),
                checkpoint=str((Path(folder) / 'model.safetensors').resolve()))


def _torchvision_teacher(spec: str) -> Teacher:
    """``torchvision:<name>`` (no weights: trained here, or given with --teacher-weights) or
    ``torchvision:<name>.<weights>`` (torchvision's weights, read from torch's hub cache when loaded)."""
    from ..models.torchvision_models import (TORCHVISION_PREFIX, check_torchvision_name, default_reading,
                                             missing_weights_text, torchvision_weights, weights_file, weights_reading)
    base, _, tag = spec.partition('.')
    if base.startswith('plain_'):
        raise DistillError(f'{spec} is a shortcut-free twin already; give its residual teacher '
                           f'({spec[len("plain_"):]}).')
    try:
        name = check_torchvision_name(base)
    except ValueError as e:
        raise DistillError(f'Unknown teacher {spec!r}: {e}') from None
    arch = TORCHVISION_PREFIX + name
    if not tag:  # at the size its default weights read images at, as a bare timm architecture at its default tag's
        return Teacher(spec, arch, dict(model_name=arch), None, 3, default_reading(name)['input_size'][-1])
    try:
        weights = torchvision_weights(name, tag)
    except ValueError as e:
        raise DistillError(f'Teacher {spec}: {e}') from None
    if not weights_file(weights).is_file():  # fetched now, so that weights that cannot be had stop it before the data
        try:
            weights.get_state_dict(progress=True, check_hash=True)
        except OSError as e:  # urllib's URLError is one
            raise DistillError(missing_weights_text(name, weights, e)) from e
    reading = weights_reading(weights)
    return Teacher(spec, arch, dict(model_name=arch, weights=weights.name), len(weights.meta['categories']), 3,
                   reading['input_size'][-1], data_cfg=_reading(reading))


def resolve_teacher(spec: str) -> Teacher:
    """What TEACHER names (see the module docstring); no weights are loaded yet."""
    import timm
    import jointrd_timm  # noqa: F401  (the CIFAR teachers and plain_* names)
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec).expanduser()
    if path.is_dir():
        return _teacher_from_folder(spec, path)
    if spec.startswith('local-dir:') or spec.startswith(('.', '/', '~')):
        raise DistillError(f'Teacher folder {path} does not exist.')
    from ..models.torchvision_models import torchvision_name
    if torchvision_name(spec.partition('.')[0]) is not None:
        return _torchvision_teacher(spec)
    if spec[:7].lower() in ('hf-hub:', 'hf_hub:'):  # as timm and `jointrd eval` take it, a revision too
        from huggingface_hub import hf_hub_download
        spec = 'hf-hub:' + spec[7:]
        repo, revision = hub_repo(spec)
        try:
            config = json.loads(Path(hf_hub_download(repo, 'config.json', revision=revision)).read_text())
        except HUB_DOWNLOAD_ERRORS as e:
            raise missing_weights_error(spec, e) from e
        except Exception as e:  # a malformed repo id, a config.json that is not JSON
            raise DistillError(f'Cannot read config.json of teacher {spec} ({type(e).__name__}: {e}).') from e
        return _from_config_json(spec, dict(model_name=spec, pretrained=True), config)
    arch, _, tag = spec.partition('.')
    if arch.startswith('plain_'):
        raise DistillError(f'{spec} is a shortcut-free twin already; give its residual teacher '
                           f'({arch[len("plain_"):]}).')
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise DistillError(f'Unknown teacher {spec!r}: not a timm architecture, hf-hub: id or folder'
                           + (f' (did you mean {", ".join(close)}?)' if close else '')
                           + '. `jointrd derive --list` lists the architectures that have a twin.')
    if tag and not timm.list_pretrained(spec):
        raise DistillError(f'{arch} has no pretrained tag {tag!r}; its tags: '
                           f'{", ".join(timm.list_pretrained(arch + ".*")) or "none"}.')
    cfg = timm.get_pretrained_cfg(spec)
    license_ = getattr(cfg, 'license', None) or 'other'
    if not tag:
        return Teacher(spec, arch, dict(model_name=arch), None, cfg.input_size[0], cfg.input_size[-1], license_)
    return Teacher(spec, arch, dict(model_name=spec, pretrained=True), cfg.num_classes, cfg.input_size[0],
                   cfg.input_size[-1], license_, data_cfg=_reading(cfg))


def with_weights_file(teacher: Teacher, weights) -> Teacher:
    """A bare timm architecture (``teacher`` as :func:`resolve_teacher` gives it, without weights) with the weights
    of a .safetensors state dict ``weights`` (``--teacher-weights``): a model trained elsewhere, e.g. by timm's
    train.py, whose checkpoint ``jointrd convert-checkpoint`` turned into safetensors. Its classes and input channels
    are read from the file (the classifier's rows, 0 for a file without classifier tensors; the first conv's input
    channels); its images are read with the mean and std of the architecture's default config where it has as many
    channels (what timm's train.py uses unless told otherwise)."""
    import timm
    from ..io import PICKLE_SUFFIXES, input_channels, read_state_dict
    from ..io import classifier_name
    path = Path(weights).expanduser()
    if teacher.num_classes is not None:
        raise DistillError(f'--teacher-weights {weights}: TEACHER {teacher.spec} has weights of its own. Give the '
                           f'bare architecture ({teacher.arch}) with --teacher-weights, or TEACHER alone.')
    if not path.is_file():
        raise DistillError(f'--teacher-weights {path}: no such file.')
    if path.suffix in PICKLE_SUFFIXES or path.suffix == '.tar':
        raise DistillError(f'--teacher-weights {path} is a pickle, which is not loaded (unpickling can run code). '
                           f'Write its weights as safetensors first: jointrd convert-checkpoint {path} '
                           f'{path.name.split(".")[0]}.safetensors (it finds the state dict of a timm train.py or '
                           'torchdistill checkpoint; --entry names another, e.g. state_dict_ema).')
    try:
        state = read_state_dict(path)
    except (CheckpointError, OSError, ValueError) as e:
        raise DistillError(f'--teacher-weights {path} cannot be read as safetensors: {e}') from e
    model = build_model(dict(model_name=teacher.arch)) if teacher.torchvision else timm.create_model(teacher.arch)
    conv = next((n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)), None)
    head = classifier_name(model)  # None: a classifier that is not one module (e.g. a tuple of heads)
    if conv is None or head is None:
        raise DistillError(f'--teacher-weights: the classes and input channels of {teacher.arch} cannot be read from '
                           'a file (no single classifier module or no convolution); give its weights as a Hub-format '
                           'folder (config.json + model.safetensors) as TEACHER instead.')
    if f'{conv}.weight' not in state:
        raise DistillError(f'--teacher-weights {path} has no {conv}.weight: not the weights of {teacher.arch} (its '
                           f'keys start {", ".join(sorted(state)[:4])}, ...). Give the architecture the file was '
                           'trained as.')
    per_channel = model.get_submodule(conv).in_channels // (input_channels(model) or 1)  # a space-to-depth stem
    in_chans = state[f'{conv}.weight'].shape[1] // per_channel
    if teacher.torchvision and in_chans != 3:
        raise DistillError(f'--teacher-weights {path}: its first convolution takes {in_chans} channels, but '
                           f'{teacher.arch} is built for 3 (torchvision models read RGB). Give timm\'s same '
                           'architecture if it has one (timm\'s ResNets share torchvision\'s parameter names; timm '
                           'takes in_chans), or weights of a 3-channel model.')
    # no classifier tensors: a model saved without its classifier (num_classes=0), which --num-classes gives one
    num_classes = state[f'{head}.weight'].shape[0] if f'{head}.weight' in state else 0
    cfg = model.pretrained_cfg if teacher.torchvision else timm.get_pretrained_cfg(teacher.arch)
    kwargs = dict(model_name=teacher.arch, num_classes=num_classes, checkpoint=str(path.resolve()))
    if not teacher.torchvision:
        kwargs['in_chans'] = in_chans
    return Teacher(teacher.arch, teacher.arch, kwargs, num_classes, in_chans, teacher.input_size, 'other',
                   data_cfg=_reading(cfg) if cfg else None, weights_file=path.resolve())


def missing_weights_error(spec: str, error: Exception) -> DistillError:
    """What a user reads when the teacher's files cannot be fetched from the Hub
    (:func:`~jointrd_timm.integrations.hub.missing_weights_message`)."""
    return DistillError(missing_weights_message(spec, error, role='teacher'))


def load_teacher(teacher: Teacher) -> Optional[torch.nn.Module]:
    """The teacher with its weights, as they were saved (their classes and input channels); None for a teacher
    without weights (trained here). Weights the Hub cannot provide raise :func:`missing_weights_error`."""
    if teacher.num_classes is None:
        return None
    from ..models.torchvision_models import MissingTorchvisionWeights
    if teacher.run_checkpoint is not None:
        from ..io import load_weights
        kwargs = dict(teacher.model) if teacher.torchvision else dict(model_name=teacher.arch,
                                                                      in_chans=teacher.in_chans)
        model = build_model(dict(kwargs, num_classes=teacher.num_classes))
        load_weights(model, teacher.run_checkpoint, part='teacher')
        return model
    try:
        return build_model(teacher.model)
    except HUB_DOWNLOAD_ERRORS as e:
        raise missing_weights_error(teacher.spec, e) from e
    except MissingTorchvisionWeights as e:
        raise DistillError(str(e)) from e
    except CheckpointError as e:
        if teacher.weights_file is None:
            raise
        # a --teacher-weights file whose tensors do not fit the architecture
        raise DistillError(f'--teacher-weights {teacher.weights_file} does not load into {teacher.arch}: {e}') from e


def build_model(model_kwargs: Dict) -> torch.nn.Module:
    """A ``timm_model`` config built, in eval mode."""
    from ..integrations.torchdistill import timm_model
    return timm_model(**model_kwargs).eval()


def tag_hint(teacher: Teacher) -> str:
    """For a teacher without weights: its pretrained tags, as a hint (empty when it has weights or no tags)."""
    import timm
    if teacher.torchvision:
        import torchvision
        from ..models.torchvision_models import torchvision_name
        names = torchvision.models.get_model_weights(torchvision_name(teacher.arch)).__members__
        tags = [f'{teacher.arch}.{w}' for w in names] if teacher.num_classes is None else []
        return f' To start from torchvision\'s weights give them, e.g. {", ".join(tags[:3])}.' if tags else ''
    tags = timm.list_pretrained(teacher.arch + '.*') if teacher.num_classes is None else []
    return f' To start from pretrained weights give a tag, e.g. {", ".join(tags[:3])}.' if tags else ''


def extract_run_teacher(teacher: Teacher, folder: Path) -> Dict:
    """The teacher part of a JointRD run's checkpoint, written in Hub format; its timm_model kwargs."""
    from ..integrations.hub import save_trained_model
    save_trained_model(load_teacher(teacher), folder)
    if teacher.torchvision:
        return torchvision_folder_kwargs(folder)
    return dict(model_name=f'local-dir:{folder.resolve()}', pretrained=True)
