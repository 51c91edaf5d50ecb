"""The catalogue of published twins as timm pretrained tags.

The catalogue is ``registry/`` at the repository root, shipped inside the package as ``jointrd_timm.registry``
(pyproject.toml maps it), so a wheel install lists and loads the same entries as a source checkout. Each entry
becomes the tag ``<architecture>.<tag>`` of a registered model, so ``timm.list_pretrained('plain_*')`` shows it and
``timm.create_model('plain_resnet20_cifar.jointrd_full_cifar10', pretrained=True)`` loads it: from the entry's weights
folder when it is present, else from its ``hf_hub_id``. ``JOINTRD_REGISTRY`` points at another catalogue folder.
"""
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

__all__ = ['registry_dir', 'entries', 'entry', 'tag_cfgs', 'weightless_cfg', 'register_timm_tags']

REQUIRED = ('name', 'architecture', 'tag', 'teacher', 'method', 'dataset', 'training', 'metrics', 'hf_hub_id',
            'license', 'weights', 'num_classes')


def registry_dir() -> Path:
    """``JOINTRD_REGISTRY``, else the installed ``jointrd_timm.registry``, else ``registry/`` beside the package (a
    source tree used without installing it)."""
    if 'JOINTRD_REGISTRY' in os.environ:
        return Path(os.environ['JOINTRD_REGISTRY'])
    try:
        from .. import registry
        return Path(registry.__file__).resolve().parent
    except ImportError:
        return Path(__file__).resolve().parents[2] / 'registry'



@lru_cache(maxsize=None)
def _load(folder: str) -> tuple:
    found = []
    for path in sorted(Path(folder).glob('*.json')):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f'Registry entry {path} is not valid JSON ({e}); fix or remove it.') from None
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(f'Registry entry {path} lacks {missing}.')
        if data['name'] != f'{data["architecture"]}.{data["tag"]}':
            raise ValueError(f'Registry entry {path}: name must be <architecture>.<tag>, got {data["name"]!r}.')
        data['_path'] = str(path)
        found.append(data)
    return tuple(found)


def entries() -> List[Dict]:
    folder = registry_dir()
    return list(_load(str(folder))) if folder.is_dir() else []


def entry(name: str) -> Dict:
    for e in entries():
        if e['name'] == name:
            return e
    raise KeyError(f'{name!r} is not in the registry ({registry_dir()}); known: {[e["name"] for e in entries()]}.')


def weights_folder(e: Dict) -> Path:
    return (registry_dir() / e['weights']).resolve()  # relative to the registry folder


# how a model's inputs are read: taken from the weights' own config.json over the architecture's defaults
DATA_KEYS = ('input_size', 'test_input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'test_crop_pct',
             'crop_mode', 'mean', 'std')


def _saved_data_cfg(folder: Path) -> Dict:
    """The data config saved with the weights in ``folder`` (config.json's ``pretrained_cfg``): a twin trained on
    32 px CIFAR-10 images is read that way, not as its architecture's 224 px ImageNet default."""
    path = folder / 'config.json'
    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text()).get('pretrained_cfg') or {}
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is not valid JSON ({e}); fix or remove it.') from None
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in DATA_KEYS}


# what says where a cfg's weights come from (and whose they are): a tag of another source drops these
WEIGHT_SOURCES = ('url', 'hf_hub_id', 'hf_hub_filename', 'hf_hub_revision', 'file', 'state_dict', 'tag', 'architecture',
                  'source', 'origin_url', 'paper_ids', 'paper_name', 'notes')


def weightless_cfg(architecture: str) -> Dict:
    """The default pretrained cfg timm registered for ``architecture`` (its input size, mean / std, classifier...),
    without its weight source."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(architecture)
    cfg = cfg.to_dict() if cfg is not None else {}
    return {key: value for key, value in cfg.items() if key not in WEIGHT_SOURCES}


def tag_cfgs(architecture: str, base_cfg: Dict) -> Dict[str, Dict]:
    """``{'<architecture>.<tag>': cfg}`` for the catalogue entries of ``architecture``: its base cfg, with the
    entry's classes, license and Hub id, and the data config saved with its weights."""
    from ..io import with_reading
    cfgs = {}
    for e in entries():
        if e['architecture'] != architecture:
            continue
        cfg = dict(base_cfg, num_classes=e['num_classes'], license=e['license'], hf_hub_id=e['hf_hub_id'])
        folder = weights_folder(e)
        if (folder / 'model.safetensors').is_file():
            cfg['file'] = str(folder / 'model.safetensors')
        cfgs[e['name']] = with_reading(cfg, _saved_data_cfg(folder))  # the saved reading, not the architecture's
    return cfgs


def register_timm_tags() -> List[str]:
    """Make the entries of architectures that timm itself registers (``resnet18.<tag>``, a teacher published beside
    its twin) timm tags too, after timm's own tags: ``pretrained=True`` without a tag keeps timm's default weights.
    The architectures this package registers take their entries through :func:`tag_cfgs` instead. Called at import;
    calling it again (after registering another architecture) adds what is new. Returns the names added."""
    import timm
    from ..twins._timm_compat import append_pretrained_tags
    added = []
    for architecture in sorted({e['architecture'] for e in entries()}):
        if not timm.is_model(architecture):
            continue  # not registered (yet): a later call adds its entries (load_model calls it on a missing tag)
        added += append_pretrained_tags(architecture, tag_cfgs(architecture, weightless_cfg(architecture)))
    return added
