"""Image classification data through Hugging Face ``datasets``: a Hub id, a local Hub-layout folder (parquet),
an image folder (class subfolders), or the demo's embedded ``sklearn:digits``; with the CIFAR and ImageNet
transforms of the JointRD spec (torchvision / timm; ``transform``).

Used from torchdistill YAMLs as ``!import_call {key: jointrd_timm.training.data.load_image_dataset, init: {kwargs: ...}}``.
"""
import functools
import math
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..errors import InputError, JointRDError

__all__ = ['load_image_dataset', 'find_columns', 'evaluate_model', 'HFImageDataset', 'make_transform',
           'DatasetColumnError', 'TRANSFORMS', 'transform_data_cfg', 'dataset_data_cfg', 'dataset_label_names',
           'dataset_origin', 'eval_transform', 'labelled_as_datasets_labels_it']

TRANSFORMS = ('cifar', 'imagenet', 'tensor')
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DatasetColumnError(JointRDError, KeyError):
    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def make_transform(name: str, train: bool, input_size: int, mean: Sequence[float], std: Sequence[float]):
    """``cifar``: random crop with 4-pixel padding (``input_size // 8``) + flip (train); ``imagenet``: timm's
    random-resized-crop + flip (train) and resize 256 / centre crop 224 (eval); ``tensor``: no augmentation (resize,
    centre crop).

    ``cifar`` first resizes images whose shorter side is not ``input_size`` (CIFAR's 32 px images read at 64 px for a
    net whose stride needs more resolution), then crops them square; at the images' own size both are exact copies,
    so 32 px CIFAR is read as it always was."""
    if name not in TRANSFORMS:
        raise InputError(f'Unknown transform {name!r}; choose one of {TRANSFORMS}.')
    if name == 'imagenet':
        from timm.data import create_transform
        return create_transform(input_size, is_training=train, mean=mean, std=std, crop_pct=0.875,
                                interpolation='bilinear', hflip=0.5 if train else 0.0)
    steps = [T.Resize(input_size)]
    if name == 'cifar':
        steps += ([T.RandomCrop(input_size, padding=input_size // 8), T.RandomHorizontalFlip()] if train
                  else [T.CenterCrop(input_size)])
    else:  # 'tensor': a non-square image is cut to the square in its centre (an exact copy for a square one)
        steps.append(T.CenterCrop(input_size))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


# timm's data config keys an evaluation transform is made from (timm.data.create_transform)
DATA_CFG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')


def eval_transform(data_cfg: Mapping):
    """The evaluation transform timm makes from a data config (``input_size``, ``crop_pct``, ``interpolation``,
    ``mean``, ``std``, ``crop_mode``: a model's ``pretrained_cfg`` or :func:`timm.data.resolve_data_config`'s)."""
    from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_cfg.items()
           if k in DATA_CFG_KEYS and v is not None}
    transform = create_transform(**cfg, is_training=False)
    # what it was made from, with timm's defaults for what the config left out: transform_data_cfg gives it back
    # whole (a 'squash' or 'border' crop included, which the pipeline's steps alone would not say)
    size = cfg.get('input_size', 224)
    size = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    transform.data_cfg = dict(dict(interpolation='bilinear', crop_pct=DEFAULT_CROP_PCT, crop_mode='center',
                                   mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
                              **dict(cfg, input_size=(3, *size)))
    return transform


def _size(size) -> Optional[int]:
    """A Resize / CenterCrop size as one side: an int, or a one- or square two-element sequence (None otherwise)."""
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)) and len(size) in (1, 2) and len(set(size)) == 1 and isinstance(size[0], int):
        return size[0]
    return None


def _crop_pct(crop: int, resize: int) -> float:
    """``crop / resize`` as timm reads it back (``floor(crop / crop_pct)`` gives ``resize`` again), in the fewest
    decimals that do (32 of 36: 0.88, not 0.8888888888888888, which a command line would round the wrong way)."""
    for decimals in range(1, 16):
        pct = math.floor(crop / resize * 10 ** decimals) / 10 ** decimals
        if pct > 0 and math.floor(crop / pct) == resize:
            return pct
    pct = crop / resize
    while math.floor(crop / pct) < resize:  # float division can land just below
        pct = math.nextafter(pct, 0.0)
    return pct


def transform_data_cfg(transform, channels: int = 3) -> Optional[Dict]:
    """The timm data config of an evaluation pipeline: ``input_size``, ``crop_pct``, ``crop_mode``,
    ``interpolation``, ``mean``, ``std``, such that :func:`eval_transform` (timm's ``create_transform``) gives the
    same tensors: the config a pipeline of :func:`eval_transform` was made from, else read from ``transform``, a
    torchvision ``Compose`` (or one transform) of a square resize of the shorter side, a square centre crop, the
    conversion to a tensor and ``Normalize``, as :func:`make_transform` and timm make them for evaluation.

    None where the pipeline does anything these keys cannot say (augmentation, padding, a resize to a fixed
    non-square shape or of images already made tensors, no resize or no crop, no normalisation, or one of pixel
    values not scaled to [0, 1]): a saved model then keeps its architecture's config."""
    from torchvision.transforms import v2
    made_from = getattr(transform, 'data_cfg', None)  # made by eval_transform
    if isinstance(made_from, Mapping):
        return dict(made_from, input_size=(channels, *made_from['input_size'][-2:]))
    steps = list(getattr(transform, 'transforms', [transform]))
    resize = crop = normalize = None
    tensor = False  # images already tensors: a resize there is not PIL's, which timm's transform uses
    scaled = False  # pixel values in [0, 1], as timm's ToTensor gives them (PILToTensor, ToImage: 0..255 integers)
    for step in steps:
        name = type(step).__name__
        if name in ('ToTensor', 'MaybeToTensor', 'PILToTensor', 'ConvertImageDtype', 'ToDtype', 'ToImage'):
            tensor = True
            scaled = scaled or name in ('ToTensor', 'MaybeToTensor', 'ConvertImageDtype') or \
                (name == 'ToDtype' and getattr(step, 'scale', False))
            continue
        if isinstance(step, (T.Resize, v2.Resize)) and resize is None and crop is None and normalize is None \
                and not tensor:
            resize = step
        elif isinstance(step, (T.CenterCrop, v2.CenterCrop)) and resize is not None and crop is None \
                and normalize is None:
            crop = step
        elif isinstance(step, (T.Normalize, v2.Normalize)) and normalize is None and scaled:
            normalize = step
        else:
            return None
    if resize is None or crop is None or normalize is None or getattr(resize, 'max_size', None) is not None:
        return None
    side, resized = _size(crop.size), resize.size
    resized = resized if isinstance(resized, int) else (resized[0] if len(resized) == 1 else None)
    interpolation = getattr(resize.interpolation, 'value', None)
    if side is None or resized is None or not isinstance(interpolation, str) or side > resized:
        return None

    def numbers(values):  # a float32 tensor's values as the shortest decimals that give them back (0.485)
        if hasattr(values, 'flatten'):
            return tuple(float(str(np.float32(v))) for v in values.flatten().tolist())
        return tuple(float(v) for v in values)
    return dict(input_size=(channels, side, side), interpolation=interpolation, crop_pct=_crop_pct(side, resized),
                crop_mode='center', mean=numbers(normalize.mean), std=numbers(normalize.std))


def dataset_data_cfg(dataset, channels: int = 3) -> Optional[Dict]:
    """:func:`transform_data_cfg` of the transform ``dataset`` applies (found on it or on the datasets it wraps:
    a ``Subset``'s ``dataset``); None where there is none or it cannot be said as a data config."""
    for layer in _wrapped(dataset):
        transform = getattr(layer, 'transform', None)
        if transform is not None:
            return transform_data_cfg(transform, channels)
    return None


def _wrapped(dataset):
    """``dataset`` and the datasets it wraps (a ``Subset``'s ``dataset``, and so on), outermost first, at most 8."""
    for _ in range(8):
        if dataset is None:
            return
        yield dataset
        dataset = getattr(dataset, 'dataset', None)


def _image_dataset(dataset) -> Optional['HFImageDataset']:
    """The :class:`HFImageDataset` that ``dataset`` is or wraps (a ``Subset``'s ``dataset``, ...); None where none."""
    return next((layer for layer in _wrapped(dataset) if isinstance(layer, HFImageDataset)), None)


def dataset_classes(dataset) -> Optional[int]:
    """The classes the labels of ``dataset`` index (:attr:`HFImageDataset.num_classes`, found on it or on the datasets
    it wraps, as :func:`dataset_data_cfg` finds a transform); None where no dataset says."""
    found = _image_dataset(dataset)
    return found.num_classes if found is not None else None


def dataset_origin(dataset) -> Dict:
    """Where :func:`load_image_dataset` read ``dataset`` (``source``, ``split`` and the carving options given), found
    as :func:`dataset_classes` finds the count; empty for a dataset it did not load."""
    found = _image_dataset(dataset)
    return dict(found.origin) if found is not None else {}


def dataset_label_names(dataset) -> Optional[List[str]]:
    """The class names the labels of ``dataset`` stand for (:attr:`HFImageDataset.label_names`, found as
    :func:`dataset_classes` finds the count); None where no dataset names them."""
    found = _image_dataset(dataset)
    return found.label_names if found is not None else None


def to_mode(image, mode: str):
    """``image`` (PIL) as ``mode`` ('RGB' or 'L'). PIL's ``convert`` clips wide grey images to 8 bits (a 16-bit PNG
    turns almost white), so those are scaled first, by their mode alone (every image of a dataset alike): 16-bit and
    32-bit integer images (``I;16*``, ``I``: how PIL opens a 16-bit PNG) as 16-bit values, divided by 257 (65535 ->
    255); float images (``F``) as values in [0, 1], times 255; what falls outside is clipped."""
    if image.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I', 'F'):
        from PIL import Image
        scale = 255.0 if image.mode == 'F' else 1 / 257.0
        values = np.asarray(image, dtype=np.float64) * scale
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), 'L')
    return image.convert(mode)


class HFImageDataset(Dataset):
    """(image tensor, label) pairs from a ``datasets.Dataset``; decoding and transforms happen per item."""

    def __init__(self, hf_dataset, transform, image_column: str, label_column: str, mode: str,
                 num_classes: Optional[int] = None, unused_classes: Sequence[int] = ()):
        self.data = hf_dataset
        self.transform = transform
        self.image_column, self.label_column, self.mode = image_column, label_column, mode
        self._num_classes = num_classes
        # integer labels (no ClassLabel) of the whole split: the indices below the largest that no image has
        self.unused_classes: List[int] = list(unused_classes)
        # label -> the index a model gives that class (evaluate_model, where its classes are named otherwise)
        self.label_map: Optional[List[int]] = None
        # where load_image_dataset read it: source, split (and test_fraction, part, limit where given)
        self.origin: Dict = {}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index):
        try:  # PIL decodes as the row is read, and lazily again as the image is converted
            row = self.data[int(index)]
            image = to_mode(row[self.image_column], self.mode)
        except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError; truncated files, too
            raise InputError(f'Image {self._where(index)} cannot be read ({type(e).__name__}: {str(e)[:200]}): '
                             'replace or remove the file.') from e
        label = int(row[self.label_column])
        return self.transform(image), (label if self.label_map is None else self.label_map[label])

    def _where(self, index) -> str:
        """The file of example ``index`` where the dataset keeps one (an image folder), else its index."""
        import datasets
        try:
            raw = self.data.cast_column(self.image_column, datasets.Image(decode=False))[int(index)][self.image_column]
            return f"{raw.get('path') or f'#{index}'} (example {index})"
        except Exception:  # noqa: BLE001 (only for the message)
            return f'#{index}'

    @property
    def label_names(self) -> Optional[List[str]]:
        """The class names of a ClassLabel label column (an image folder's class folders, a Hub dataset's names), in
        label order; None for plain integer labels."""
        names = getattr(self.data.features[self.label_column], 'names', None)
        return list(names) if names else None

    @property
    def num_classes(self) -> int:
        """The classes the labels index: a ClassLabel's count, else the largest label + 1 of the whole split (before a
        limit or validation split took part of it)."""
        if self._num_classes is None:
            self._num_classes = label_classes(self.data, self.label_column, 'the dataset')
        return self._num_classes


def label_classes(data, column: str, where: str) -> int:
    """How many classes the label ``column`` of ``data`` (a ``datasets.Dataset``) indexes: a ClassLabel's count,
    else the largest label + 1; labels that are not integers >= 0 are refused, naming what to do."""
    return _label_classes(data, column, where)[0]


def _label_classes(data, column: str, where: str) -> Tuple[int, List[int]]:
    """:func:`label_classes`, and for integer labels (no ClassLabel) the indices below the largest that no label
    has, from the same one read of the column."""
    feature = data.features[column]
    if hasattr(feature, 'num_classes'):
        return feature.num_classes, []
    labels = data[column]
    bad = next((v for v in labels if not (isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0)),
               None) if labels else None
    if bad is not None:
        raise DatasetColumnError(
            f'{where}: the label column {column!r} holds {bad!r}, not a class index (an integer >= 0). Encode it first '
            f'(datasets: dataset.class_encode_column({column!r})) or name another label column.')
    classes = int(max(labels)) + 1 if labels else 0
    return classes, sorted(set(range(classes)) - {int(v) for v in labels})


@functools.lru_cache(maxsize=None)
def _digits(split: str):
    """scikit-learn's 8x8 digits (1797 images, shipped inside the package): a fixed 80/20 train/test split. Built
    once per process and split (encoding the images is most of a small run's data time); every later step (limit,
    carving, columns) makes a new ``datasets.Dataset`` from it and leaves it as it is."""
    import datasets
    from PIL import Image
    from ..extras import require
    load_digits = require('sklearn.datasets', 'sklearn:digits (the embedded demo data)').load_digits
    digits = load_digits()
    images = [Image.fromarray((img * (255 / 16)).astype(np.uint8), mode='L') for img in digits.images]
    order = np.random.RandomState(0).permutation(len(images))
    cut = int(0.8 * len(images))
    chosen = order[:cut] if split == 'train' else order[cut:]
    features = datasets.Features({'img': datasets.Image(), 'label': datasets.ClassLabel(num_classes=10)})
    return datasets.Dataset.from_dict(
        {'img': [images[i] for i in chosen], 'label': [int(digits.target[i]) for i in chosen]}, features=features)


def _image_suffixes() -> set:
    """The files datasets' imagefolder reads as images (PIL's openable formats where datasets moved the list)."""
    try:
        from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
        return {e.lower() for e in ImageFolder.EXTENSIONS}
    except (ImportError, AttributeError):
        from PIL import Image
        Image.init()
        return {e.lower() for e, f in Image.registered_extensions().items() if f in Image.OPEN}


def _images_under(folder, suffixes: set):
    """The images under ``folder`` at any depth, in sorted order and lazily; symlinked folders followed, hidden files
    and folders skipped."""
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        yield from (os.path.join(top, f) for f in sorted(files)
                    if not f.startswith('.') and os.path.splitext(f)[1].lower() in suffixes)


def _holds_nested_images(folder: Path, suffixes: set) -> bool:
    """Whether a subfolder of ``folder`` (at any depth) holds an image; stops at the first one."""
    return any(next(_images_under(entry.path, suffixes), None) is not None for entry in os.scandir(folder)
               if not entry.name.startswith('.') and entry.is_dir())


def _split_of(name: str) -> Optional[str]:
    """The split datasets' imagefolder reads a folder named ``name`` as ('train' for ``train``, ``training``,
    ``seg_train``, ``train2017``; 'validation' for ``val``, ``dev``...; 'test' for ``test``, ``eval``...), by its
    keywords and separators (datasets.data_files); None for none or more than one."""
    import re
    try:
        from datasets.data_files import NON_WORDS_CHARS, SPLIT_KEYWORDS
    except ImportError:  # a datasets that no longer exports them: 5.2's keywords
        NON_WORDS_CHARS = '-._ 0-9'
        SPLIT_KEYWORDS = dict(train=['train', 'training'], validation=['validation', 'valid', 'dev', 'val'],
                              test=['test', 'testing', 'eval', 'evaluation'])
    sep = re.escape(NON_WORDS_CHARS).replace(r'0\-9', '0-9')
    found = {str(split) for split, words in SPLIT_KEYWORDS.items() for word in words
             if re.search(rf'(^|[{sep}]){re.escape(word)}($|[{sep}])', name.lower())}
    return found.pop() if len(found) == 1 else None


def _nested_image_folder(root: Path, split: str):
    """An image folder whose class folders hold their images in subfolders (``cat/indoor/1.png``), read with the
    class folders as the classes and their images at any depth, as torchvision's ImageFolder reads it: datasets'
    imagefolder names each image by its innermost folder, so ``cat/indoor`` and ``dog/indoor`` would both be class
    ``indoor``. The class names are those of every split folder together (one label index in each). None (datasets
    reads the folder, as for any flat one) for a flat folder, a folder with a metadata file, a layout whose split
    folders are not all clear (some children named as splits, some not), or a split it does not have."""
    import datasets
    class_roots = None if _has_metadata(root) else _class_roots(root)
    if class_roots is None:
        return None
    if class_roots == [root]:  # class folders alone: the train split
        bases = [root] if split == 'train' else []
    else:  # split folders of class folders
        bases = [d for d in class_roots if split in (_split_of(d.name), d.name)]
    suffixes = _image_suffixes()
    classes = _class_names(class_roots)
    if not bases or not any(_holds_nested_images(r / c, suffixes) for r in class_roots for c in classes
                            if (r / c).is_dir()):
        return None
    images, labels = [], []
    for index, name in enumerate(classes):
        for base in bases:
            found = list(_images_under(base / name, suffixes)) if (base / name).is_dir() else []
            images += found
            labels += [index] * len(found)
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict({'image': images, 'label': labels},
                                      info=datasets.DatasetInfo(description=NESTED_FOLDER, features=features))


NESTED_FOLDER = 'class folders with subfolders, read as torchvision ImageFolder reads them'


def labelled_as_datasets_labels_it(hf_dataset) -> bool:
    """Whether ``datasets.load_dataset`` of the same folder (what timm's ``hfds/`` reader, and so validate.py, calls)
    gives the labels this module gave: not for class folders with subfolders (:func:`_nested_image_folder`)."""
    return getattr(getattr(hf_dataset, 'info', None), 'description', None) != NESTED_FOLDER


def _has_metadata(root: Path) -> bool:
    """A metadata file (csv, jsonl, parquet) in ``root`` or a split folder: datasets' own imagefolder layout, whose
    labels it names itself."""
    return any(root.glob('metadata.*')) or any(root.glob('*/metadata.*'))


def _subfolders(folder: Path) -> List[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith('.'))


def _class_roots(root: Path) -> Optional[List[Path]]:
    """The folders holding an image folder's class folders: its split folders where every child is named as a
    split (train/, test/, ...), ``root`` itself where none is; None for a mix of the two."""
    children = _subfolders(root)
    named = [bool(_split_of(d.name)) for d in children]
    if children and all(named):
        return children
    return None if any(named) else [root]


def _class_names(class_roots: Sequence[Path]) -> List[str]:
    """The class folders' names over every class root together (one label index each), sorted."""
    return sorted({d.name for r in class_roots for d in _subfolders(r)})


def _check_class_folders(root: Path, data) -> None:
    """After datasets' imagefolder read ``root``: refuse what it does silently, a class folder without an image (it
    drops the class, so a model trained there has one class fewer and every later index moves) and a single class
    folder (it drops the label column). Folders with a metadata file are datasets' own layout and not checked."""
    import datasets
    if _has_metadata(root):
        return
    folders = _class_names(_class_roots(root) or [root])
    label = data.features.get('label')
    if isinstance(label, datasets.ClassLabel):
        empty = [name for name in folders if name not in label.names]
        if empty:
            raise InputError(f'{root}: class folder(s) {empty[:8]} hold no image (files with an image suffix such as '
                             '.png or .jpg), so they would silently be no class at all: add their images or remove '
                             'the folders.')
    elif len(folders) == 1:
        raise InputError(f'{root} holds one class folder ({folders[0]!r}): a classifier needs two classes or more, '
                         'one folder of images per class.')


def _load(source: str, split: str, config_name: Optional[str]):
    import datasets
    if not isinstance(source, str) or not source.strip():
        raise InputError(f'The dataset source {source!r} is empty: give a folder, a Hub dataset id or sklearn:digits '
                         '(an empty path would read the current folder).')
    if source == 'sklearn:digits':
        if split not in ('train', 'test'):
            raise InputError(f'sklearn:digits has splits train and test, not {split!r}.')
        return _digits(split)
    if source.startswith('sklearn:'):
        raise InputError(f'{source}: the one scikit-learn dataset read here is sklearn:digits.')
    path = Path(source).expanduser()
    if path.is_file():
        raise InputError(f'The dataset source {source} is a file, not a folder: give the folder that holds the data '
                         '(class folders of images, a Hub-layout folder or a save_to_disk folder) or a Hub id.')
    if (path / 'state.json').is_file() or (path / 'dataset_dict.json').is_file():
        return _saved_to_disk(path, source, split)
    if path.is_dir():
        has_data_files = any(path.glob('**/*.parquet')) or any(path.glob('**/*.arrow')) or (path / 'README.md').is_file()
        nested = None if has_data_files else _nested_image_folder(path, split)
        if nested is not None:
            return nested
        # class subfolders of images, else a Hub-layout folder
        args = ('imagefolder',) if not has_data_files else (str(path), config_name)
        kwargs = dict(data_dir=str(path)) if not has_data_files else {}
    elif path.suffix or source.startswith(('.', '/', '~')):
        raise FileNotFoundError(f'Dataset folder {source} does not exist.')
    else:
        args, kwargs = (source, config_name), {}  # a Hub id
    try:
        data = datasets.load_dataset(*args, split=split, **kwargs)
    except FileNotFoundError:
        raise  # datasets names the folder or Hub id it did not find
    except (OSError, ValueError) as e:  # offline without a cache, a mistyped folder read as a Hub id, bad files
        if isinstance(e, OSError) and path.is_dir():
            raise  # the disk or the cache (permissions, no space), not the folder's contents
        if 'Unknown split' not in str(e):
            what = ('the folder holds files the datasets library cannot read as a dataset' if path.is_dir() else
                    f'it is no folder here (a relative path is read from {Path.cwd()}), so it was read as a Hub id: '
                    'give a folder that exists, or a Hub dataset reachable now or in the Hub cache')
            raise InputError(f'Cannot load the dataset {source}: {type(e).__name__}: {str(e)[:300]} ({what}).') from e
        folder = ' An image folder of class subfolders alone has only a train split: carve a test set from it ' \
            "(jointrd distill's --test-fraction, e.g. 0.1; load_image_dataset's test_fraction), or put the class " \
            'folders in train/ and test/ subfolders.' \
            if 'data_dir' in kwargs and "['train']" in str(e) else ''
        raise InputError(f'{source} has no split {split!r} ({e}); name one of its splits (jointrd eval --split; '
                         f"jointrd distill --train-split / --test-split; a YAML's split).{folder}") from e
    if 'data_dir' in kwargs:
        _check_class_folders(path, data)
    return data


def _saved_to_disk(path: Path, source: str, split: str):
    """A folder written by ``datasets``' ``save_to_disk`` (``load_dataset`` refuses it): a DatasetDict's ``split``,
    or a single Dataset, which holds the one split it was saved from (``train`` when it does not say)."""
    import datasets
    try:
        saved = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise InputError(f'{source} was written by save_to_disk but does not load: {type(e).__name__}: '
                         f'{str(e)[:300]}') from e
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise InputError(f'{source} (saved by save_to_disk) has no split {split!r}; its splits: '
                             f"{sorted(saved)} (jointrd eval --split; jointrd distill --train-split / "
                             "--test-split; a YAML's split).")
        return saved[split]
    held = str(saved.split).split('[')[0] if saved.split is not None else 'train'  # 'train[:50%]': of train
    if split != held:
        raise InputError(f'{source} is one dataset saved by save_to_disk, its {held!r} split, so it has no split '
                         f'{split!r}: name {held!r} (jointrd eval --split {held}), or carve a test set from it '
                         f'(jointrd distill --train-split {held} --test-fraction 0.1; load_image_dataset\'s '
                         'test_fraction).')
    return saved


def find_columns(data, image_column: Optional[str], label_column: Optional[str], where: str) -> Tuple[str, str]:
    """The (image, label) column names of ``data`` (a ``datasets.Dataset``). A name given must be a column; None
    finds it: the image column is the one column of type ``datasets.Image``, the label column is ``label`` where
    there is one, else the one ``ClassLabel`` column. Anything else is refused naming the columns and the option."""
    import datasets
    features = data.features

    def kinds(kind):
        return [name for name, feature in features.items() if isinstance(feature, kind)]

    def refuse(role, problem):
        described = ', '.join(f'{name} ({type(feature).__name__})' for name, feature in features.items())
        raise DatasetColumnError(f'{where}: {problem}; its columns are: {described}. Set {role} to the right one (in a '
                                 f'YAML: datasets.<id>.init.kwargs.{role}).')

    for role, given in (('image_column', image_column), ('label_column', label_column)):
        if given is not None and given not in features:
            refuse(role, f'has no column {given!r}')
    if image_column is not None and not isinstance(features[image_column], datasets.Image):
        refuse('image_column', f'has column {image_column!r} of {type(features[image_column]).__name__}, not of images '
                               '(datasets.Image)')
    if image_column is None:
        images = kinds(datasets.Image)
        if len(images) != 1:
            refuse('image_column', f'has {"no column" if not images else f"{len(images)} columns"} of images')
        image_column = images[0]
    if label_column is None:
        labels = ['label'] if 'label' in features and image_column != 'label' else kinds(datasets.ClassLabel)
        if len(labels) != 1:
            refuse('label_column', 'has no column "label" and ' + (
                'no class-label column' if not labels else f'{len(labels)} class-label columns {labels}'))
        label_column = labels[0]
    return image_column, label_column


def load_image_dataset(
        source: str,
        split: str = 'train',
        transform: str = 'cifar',
        train: Optional[bool] = None,
        input_size: int = 32,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        channels: int = 3,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        validation_fraction: float = 0.0,
        part: str = 'all',
        test_fraction: float = 0.0,
        limit: Optional[int] = None,
        seed: int = 0,
        config_name: Optional[str] = None,
        recipe: Optional[str] = None,
        data_cfg: Optional[Mapping] = None,
) -> HFImageDataset:
    """An image classification dataset as a torch Dataset of (tensor, label).

    Args:
        source: Hub id (``uoft-cs/cifar10``), local Hub-layout folder, image folder, or ``sklearn:digits``.
        split: the dataset split to read (``train``/``test``/...).
        transform: ``cifar``, ``imagenet`` or ``tensor`` (:func:`make_transform`); ``train`` (default: split ==
            'train') switches augmentation on. ``recipe`` is its former name, still accepted.
        image_column, label_column: column names (CIFAR-10 on the Hub: ``img``/``label``; imagefolder:
            ``image``/``label``); None: the one image column / the label column (:func:`find_columns`).
        channels: 3 (RGB) or 1 (grayscale).
        mean, std: normalisation (default: CIFAR statistics for ``cifar``, ImageNet's otherwise, 0.5 for 1 channel).
        validation_fraction, part: carve a held-out validation set from the split: ``part='train'`` gives the rest,
            ``part='val'`` the held-out fraction (seeded, the same for both calls), ``'all'`` the whole split.
        test_fraction: carve a test set from the split first (for data that has no test split, e.g. a folder of
            class subfolders alone): ``part='test'`` gives it; ``'train'`` and ``'val'`` are then carved from what
            is left, so the three never share an image (seeded; the same ``seed`` and fractions in every call).
        limit: keep only the first ``limit`` examples (after a seeded shuffle), for quick runs.
        data_cfg: evaluation only: read the images as this timm data config says (:func:`eval_transform`; a model's
            ``pretrained_cfg``) instead of ``transform``, ``input_size``, ``mean`` and ``std``.
    """
    if recipe is not None:
        transform = recipe
    if part not in ('all', 'train', 'val', 'test'):
        raise InputError(f"part must be 'all', 'train', 'val' or 'test', got {part!r}.")
    for name, value in (('validation_fraction', validation_fraction), ('test_fraction', test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise InputError(f'{name} must be a number in [0, 1) (0: no carve), got {value!r}.')
    if part == 'all' and test_fraction:
        raise InputError("test_fraction carves the split in parts: give part='train', 'val' or 'test' with it.")
    needs = dict(val=('validation_fraction',), test=('test_fraction',),
                 train=('validation_fraction', 'test_fraction')).get(part, ())
    if needs and not any(dict(validation_fraction=validation_fraction, test_fraction=test_fraction)[n] for n in needs):
        raise InputError(f'part={part!r} needs {" or ".join(needs)} above 0 (got validation_fraction='
                         f'{validation_fraction}, test_fraction={test_fraction}).')
    if channels not in (1, 3):
        raise InputError(f'channels must be 1 or 3, got {channels}.')
    train = split == 'train' if train is None else train
    if data_cfg is not None and train:
        raise InputError('data_cfg gives an evaluation transform; a training split takes transform, input_size, mean '
                         'and std (or pass train=False).')
    data = _load(source, split, config_name)
    where = f'Dataset {source!r} (split {split!r})'
    image_column, label_column = find_columns(data, image_column, label_column, where)
    classes, unused = _label_classes(data, label_column, where)  # of the whole split
    # the test set first, then the held-out part of what is left; each carve keeps its 'test' half for that part
    for fraction, carved in ((test_fraction, 'test'), (validation_fraction if part != 'test' else 0.0, 'val')):
        if part == 'all' or not fraction:
            continue
        try:
            halves = data.train_test_split(test_size=fraction, seed=seed)
        except ValueError as e:  # too few images to carve the fraction and keep the rest
            raise InputError(f'{where}: cannot carve {fraction} of its {len(data)} images ({e}); give a fraction '
                             'that leaves images on both sides.') from e
        data = halves['test' if part == carved else 'train']
    if limit is not None and limit < len(data):
        data = data.shuffle(seed=seed).select(range(limit))
    if data_cfg is not None:
        transforms = eval_transform(data_cfg)
    else:
        if mean is None or std is None:
            if channels == 1:
                mean, std = (0.5,), (0.5,)
            else:
                mean, std = (CIFAR_MEAN, CIFAR_STD) if transform == 'cifar' else (IMAGENET_MEAN, IMAGENET_STD)
        transforms = make_transform(transform, train, input_size, mean, std)
    loaded = HFImageDataset(data, transforms, image_column, label_column, 'RGB' if channels == 3 else 'L', classes,
                            unused)
    carving = dict(test_fraction=test_fraction, validation_fraction=validation_fraction, limit=limit)
    loaded.origin = dict(source=source, split=split, **{k: v for k, v in carving.items() if v},
                         **({'part': part} if part != 'all' else {}))
    return loaded


def evaluate_model(model, dataset: str, split: str = 'test', batch_size: int = 256, predictions: bool = False,
                   **data_kwargs) -> dict:
    """Top-1 accuracy (%) of ``model`` on a dataset :func:`load_image_dataset` takes (CIFAR transform by default);
    with ``predictions``, also its top-1 output index for each image, in the dataset's order (``predicted``; see
    :func:`class_agreement` to compare two models' by class).

    Where the model's config.json names its classes (timm's ``label_names``, which jointrd_timm saves from the
    training data) and the data names its labels, a label counts as the model's output of the same name: data that
    names a class the model does not know is refused, and data holding some of its classes, or in another order, is
    matched by name. Where either side names none, label i is taken as output i; the result's ``note`` says so when
    the counts differ."""
    from ..io import top1_agreement, top1_predictions
    data = load_image_dataset(dataset, split, train=False, **data_kwargs)
    if len(data) == 0:
        raise InputError(f'Dataset {dataset!r} (split {split!r}) holds no images to evaluate on.')
    where = f'{dataset!r} (split {split!r}, column {data.label_column!r})'
    note = _match_classes(model, data, where)
    outputs = getattr(model, 'num_classes', None)
    if data.label_map is None and isinstance(outputs, int) and outputs > 0 and data.num_classes > outputs:
        raise InputError(f'The model predicts {outputs} classes, but the labels of {where} index {data.num_classes}: '
                         'it was trained for other classes. Evaluate it on the data it was trained for, or fine-tune '
                         'it on this data first (jointrd distill --num-classes).')
    predicted, labels = top1_predictions(model, data, batch_size)
    result = dict(top1=top1_agreement(predicted, labels), samples=len(data), dataset=dataset, split=split)
    if predictions:
        result['predicted'] = predicted
    if note:
        result['note'] = note
    return result


def class_agreement(model_a, predicted_a, model_b, predicted_b) -> Tuple[float, Optional[str]]:
    """The share (%) of images on which two models give the same class (their ``predicted`` output indices from
    :func:`evaluate_model` on the same images), and a note on how classes were matched, or None. Where both configs
    name their classes (timm's ``label_names``) outputs are compared by name, so two models that list their classes
    in different orders are compared class for class; where either names none, output i of one is taken as output i
    of the other, with a note when that cannot be checked."""
    import torch
    from ..integrations.hub import model_label_names
    from ..io import top1_agreement
    names_a, names_b = model_label_names(model_a), model_label_names(model_b)
    if names_a and names_b:
        # each output index of b as the index of a that names the same class (-1: a class a does not know)
        index = {n: i for i, n in sorted(names_a.items(), reverse=True)}
        as_a = torch.tensor([index.get(names_b.get(int(i)), -1) for i in predicted_b], dtype=torch.long)
        same = top1_agreement(torch.as_tensor(predicted_a), as_a)
        listed = [names_a[i] for i in sorted(names_a)] == [names_b[i] for i in sorted(names_b)]
        return same, None if listed else 'the two models list their classes differently: compared by class name.'
    counts = [getattr(m, 'num_classes', None) for m in (model_a, model_b)]
    note = None
    if names_a or names_b or counts[0] != counts[1]:
        named = 'neither names its classes' if not names_a and not names_b else \
            'only one of them names its classes'
        note = (f'{named} and they predict {counts[0]} and {counts[1]} classes' if counts[0] != counts[1] else named)
        note += ', so output i of one is taken as output i of the other without a check that they are the same class.'
    return top1_agreement(predicted_a, predicted_b), note


def _match_classes(model, data: HFImageDataset, where: str) -> Optional[str]:
    """Match the labels of ``data`` to ``model``'s outputs by class name where both name them (sets
    ``data.label_map`` where the order differs; refuses names the model does not know); a note where the match
    cannot be checked and the class counts differ, else None."""
    from ..integrations.hub import model_label_names
    known, names = model_label_names(model), data.label_names
    outputs = getattr(model, 'num_classes', None)
    if known and names:
        if all(known.get(i) == n for i, n in enumerate(names)):
            return None
        index = {n: i for i, n in sorted(known.items(), reverse=True)}  # a repeated name: its first output
        unknown = [n for n in names if n not in index]
        if unknown:
            listed = ', '.join(known[i] for i in sorted(known)[:10]) + (', ...' if len(known) > 10 else '')
            raise InputError(f'The labels of {where} name classes the model was not trained for: '
                             f'{", ".join(map(repr, unknown[:5]))}{", ..." if len(unknown) > 5 else ""} (its config.json '
                             f'names {len(known)}: {listed}). Evaluate it on data of its classes, or fine-tune it on '
                             'this data first (jointrd distill --num-classes).')
        data.label_map = [index[n] for n in names]
        return (f'the {len(names)} classes of {where} are matched to the model\'s outputs by name (its config.json '
                f'names {len(known)} classes, in another order or more of them).')
    if isinstance(outputs, int) and 0 < data.num_classes < outputs:
        unnamed = 'neither names its classes' if not known and not names else \
            'the model names no classes' if not known else 'the data names no classes'
        return (f'the model predicts {outputs} classes and the labels of {where} index {data.num_classes}; {unnamed}, '
                'so label i is taken as output i without a check that they are the same class.')
    return None
