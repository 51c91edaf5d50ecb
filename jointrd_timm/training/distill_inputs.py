"""What ``jointrd distill`` is given (:class:`DataSpec`, :class:`TrainSpec`) and its checks before anything is written
or trained: each refusal is a :class:`DistillError` naming the option and what to do."""
import math
import shlex
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

import torch

from ..errors import JointRDError
from ..io import file_in_the_way
from ..settings import SCHEDULES, Schedule

if TYPE_CHECKING:
    from .teachers import Teacher

__all__ = ['DistillError', 'DataSpec', 'TrainSpec', 'specs', 'command_line', 'check_positive', 'check_output',
           'check_twin', 'check_pair', 'check_classes', 'check_splits_agree', 'dataset_kwargs', 'load_datasets',
           'setting_schedule', 'saved_an_epoch']


class DistillError(JointRDError, ValueError):
    """Bad input to ``jointrd distill``, found before any training starts."""


@dataclass(frozen=True)
class DataSpec:
    """The data of a distill run: ``source`` (a Hub id, a local folder, ``sklearn:digits``), its columns (None: found in
    the data, ``data.find_columns``) and splits, ``val_fraction`` of the train split held out for the per-epoch record,
    ``limit`` train images (quick runs), and how images are read (``transform``, ``input_size``; None: from the data
    and the teacher). ``test_fraction`` > 0 carves the test set from the train split instead of reading
    ``test_split`` (data without a test split, e.g. a folder of class subfolders alone); the held-out fraction is
    then carved from what is left."""
    source: str
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    train_split: str = 'train'
    test_split: str = 'test'
    val_fraction: float = 0.0
    limit: Optional[int] = None
    test_fraction: float = 0.0
    transform: Optional[str] = None
    input_size: Optional[int] = None


@dataclass(frozen=True)
class TrainSpec:
    """How a distill run trains (None: the setting's schedule): ``epochs`` of the twin, ``teacher_epochs`` of a
    teacher trained here (default: ``epochs``), the global ``batch_size``, ``lr``, loader ``workers``, ``seed``, and
    the runner options ``mixed_precision``, ``channels_last`` and ``compile`` (a torch.compile backend; None: off)."""
    epochs: Optional[int] = None
    teacher_epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    workers: Optional[int] = None
    seed: int = 0
    mixed_precision: str = 'no'
    channels_last: bool = False
    compile: Optional[str] = None

    def check(self, data: DataSpec) -> None:
        """The options that can be refused before anything is resolved."""
        from .runner import MIXED_PRECISION
        if self.mixed_precision not in MIXED_PRECISION:
            raise DistillError(f'mixed_precision must be one of {", ".join(MIXED_PRECISION)}, got '
                               f'{self.mixed_precision!r}.')
        check_positive(epochs=self.epochs, teacher_epochs=self.teacher_epochs, batch_size=self.batch_size,
                       lr=self.lr, limit=data.limit, input_size=data.input_size)
        if self.lr is not None and not math.isfinite(self.lr):
            raise DistillError(f'--lr must be a finite number, got {self.lr!r}; leave it out for its default.')
        if not 0 <= data.val_fraction < 1:
            raise DistillError(f'--val-fraction must be at least 0 and below 1 (the fraction of the train split held '
                               f'out for the per-epoch record; 0: none), got {data.val_fraction!r}.')
        if not 0 <= data.test_fraction < 1:
            raise DistillError(f'--test-fraction must be at least 0 and below 1 (the fraction of the train split '
                               f'carved out as the test set; 0: read --test-split), got {data.test_fraction!r}.')
        if data.test_fraction and data.test_split != 'test':
            raise DistillError(f'--test-fraction carves the test set from --train-split; --test-split '
                               f'{data.test_split!r} would not be read: give one of the two.')
        if data.test_fraction + data.val_fraction * (1 - data.test_fraction) >= 0.95:
            raise DistillError(f'--test-fraction {data.test_fraction} and --val-fraction {data.val_fraction} leave '
                               'less than 5 % of the train split to train on: lower them.')
        if self.workers is not None and self.workers < 0:
            raise DistillError(f'--workers must be 0 or more (0: load in the main process), got {self.workers!r}.')
        if not 0 <= self.seed < 2 ** 32:
            raise DistillError(f'--seed must be a whole number in [0, 2**32), got {self.seed!r}.')


def specs(data, train: Optional[TrainSpec] = None, **options) -> tuple:
    """(DataSpec, TrainSpec) from a source or DataSpec, a TrainSpec, and options named as their fields (the
    keyword form of ``plan_distill``, which the command line fills)."""
    data = data if isinstance(data, DataSpec) else DataSpec(data)
    train = train or TrainSpec()
    names = {spec: {f.name for f in fields(spec)} for spec in (DataSpec, TrainSpec)}
    unknown = sorted(set(options) - names[DataSpec] - names[TrainSpec])
    if unknown:
        raise TypeError(f'Unknown distill option(s) {unknown}; DataSpec and TrainSpec name the options.')
    return (replace(data, **{k: v for k, v in options.items() if k in names[DataSpec]}),
            replace(train, **{k: v for k, v in options.items() if k in names[TrainSpec]}))


def command_line(teacher: str, data: DataSpec, train: TrainSpec, recipe: str, epochs: int,
                 num_classes: Optional[int], out: Path, teacher_weights: Optional[str] = None) -> str:
    """The ``jointrd distill`` command that plans the same run again (what the YAMLs' headers and the model card
    record), from any directory (local folders as absolute paths): the teacher, data, twin epochs, recipe and output
    folder, and every other option given a value other than its default."""
    def where(name: str) -> str:  # a local folder as an absolute path: the command runs from any directory
        prefix = 'local-dir:' if name.startswith('local-dir:') else ''
        local = Path(name[len(prefix):]).expanduser()
        return prefix + str(local.resolve()) if local.exists() else name

    words = ['jointrd', 'distill', where(teacher), '--data', where(data.source), '--epochs', str(epochs),
             '--recipe', recipe]
    for given, default in ((data, DataSpec(data.source)), (train, TrainSpec())):
        for name in (f.name for f in fields(given) if f.name not in ('source', 'epochs')):
            value = getattr(given, name)
            if value != getattr(default, name):
                flag = '--' + name.replace('_', '-')
                words += [flag] if value is True else [flag, str(value)]
    if num_classes is not None:
        words += ['--num-classes', str(num_classes)]
    if teacher_weights is not None:
        words += ['--teacher-weights', where(teacher_weights)]
    return shlex.join(words + ['--output-dir', str(Path(out).expanduser().resolve())])


def check_positive(**options) -> None:
    """Numbers that must be positive when given (None: the default). 0 is refused, never read as "the default"."""
    for name, value in options.items():
        if value is not None and value <= 0:
            flag = '--' + name.replace('_', '-')
            raise DistillError(f'{flag} must be positive, got {value!r}; leave it out for its default.')


def saved_an_epoch(out: Path) -> bool:
    """Whether a run of this distill (teacher or twin) has a checkpoint or has finished: then --resume continues."""
    return any((out / run / name).is_file() for run in ('teacher', 'twin') for name in ('last.safetensors',
                                                                                         'final.json'))


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds another run, unless resuming it or told to overwrite it."""
    if resume and overwrite:
        raise DistillError('--resume continues the run in the output folder, --overwrite replaces it: give one.')
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise DistillError(f'Output folder {out} cannot be created: {blocker} is a file, not a folder; choose '
                           'another --output-dir.')
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    # teacher.yaml alone: a run stopped while its teacher trained
    if resume and not {'distill.yaml', 'teacher.yaml'} & set(entries):
        raise DistillError(f'--resume: {out} holds no distill run (no distill.yaml or teacher.yaml); run without '
                           '--resume to start.')
    if entries and not (resume or overwrite):
        if not saved_an_epoch(out) and {'distill.yaml', 'teacher.yaml'} & set(entries):
            # a process killed outright (SIGKILL, power loss) before its first saved epoch could not clean up
            raise DistillError(f'Output folder {out} holds a distill run stopped before it saved an epoch '
                               f'({", ".join(entries[:5])}): pass --overwrite to start again (nothing trained is '
                               'lost), or choose another --output-dir.')
        if not {'distill.yaml', 'teacher.yaml', 'teacher', 'twin', 'model', 'final.json'} & set(entries):
            raise DistillError(f'Output folder {out} is not empty ({", ".join(entries[:5])}) and holds no distill run: '
                               'choose an empty or new --output-dir, or pass --overwrite to write the run there '
                               'beside those files.')
        raise DistillError(f'Output folder {out} holds another run ({", ".join(entries[:5])}); pass --resume to '
                           'continue it, --overwrite to replace it, or choose another --output-dir.')


def check_twin(arch: str) -> None:
    """Refuse an architecture without a twin, with the reason (token mixers, no shortcut, unknown block)."""
    from ..models.plain_twins import twin_refusal
    why = twin_refusal(arch)
    if why:
        raise DistillError(why)


def check_pair(pair: Dict, input_chw, num_classes: int) -> None:
    """Build the JointRD teacher / twin pair (random weights) and take one training step on a data-shaped batch,
    so that an architecture whose stage split or fading twin fails is refused before any training."""
    from ..integrations.torchdistill import jointrd_model
    kwargs = pair['kwargs']  # no weights named yet: the architectures only
    try:
        with warnings.catch_warnings():  # the trial pair has random weights on purpose: no warning about them
            warnings.filterwarnings('ignore', message=r'The teacher .* is given no weights')
            method = jointrd_model(**kwargs)
        method.set_run_length(1, 1)
        method.train()
        method(torch.randn(2, *input_chw), torch.arange(2) % num_classes)['loss'].backward()
    except (ValueError, RuntimeError, TypeError, StopIteration) as e:
        small = ' The images are too small for this architecture: give a larger --input-size.' \
            if 'input size' in str(e) else ''
        raise DistillError(f'{kwargs["teacher"]["model_name"]}: the teacher / twin pair does not train with JointRD '
                           f'on {tuple(input_chw)} inputs ({type(e).__name__}: {e}).{small}') from e


def check_classes(teacher: 'Teacher', data_classes: int, num_classes: Optional[int], source: str) -> bool:
    """True when the teacher's classifier is re-initialised for the data (``num_classes`` given)."""
    if num_classes is not None and num_classes != data_classes:
        raise DistillError(f'--num-classes {num_classes}: the data {source} has {data_classes} labels; the '
                           "teacher's classifier is re-initialised for the data's labels, so give "
                           f'--num-classes {data_classes}.')
    if teacher.num_classes is None:  # trained here from scratch: its classifier is new anyway
        return False
    if num_classes is not None:  # asked for, also where the teacher has as many classes (another label set)
        return True
    if teacher.num_classes == data_classes:
        return False
    predicts = f'predicts {teacher.num_classes} classes' if teacher.num_classes else 'has no classifier'
    raise DistillError(f'Teacher {teacher.spec} {predicts}, but the data {source} has '
                       f'{data_classes} labels. Pass --num-classes {data_classes} to re-initialise its classifier '
                       'for them: the teacher is then fine-tuned on the data with cross-entropy for '
                       '--teacher-epochs before the twin is distilled.')



# -- data -------------------------------------------------------------------------------------------------------------
def dataset_kwargs(source: str, channels: int, input_size: int, transform: str, image_column: str,
                   label_column: str, train_split: str, test_split: str, val_fraction: float,
                   limit: Optional[int], test_fraction: float = 0.0,
                   reading: Optional[Dict] = None) -> Dict[str, Dict]:
    """``load_image_dataset`` kwargs of the train / val / test sets (the YAML's datasets section); with
    ``test_fraction`` the test set is carved from the train split (``test_split`` is not read). ``reading``: how the
    teacher's weights expect images (``Teacher.data_cfg``): its mean and std for every set, and with the ``imagenet``
    transform its evaluation crop and interpolation for the test and held-out sets."""
    local = Path(source).expanduser()
    common = dict(source=str(local.resolve()) if local.exists() else source, transform=transform,
                  input_size=input_size, channels=channels, image_column=image_column, label_column=label_column)
    if reading:
        common.update(mean=list(reading['mean']), std=list(reading['std']))
    sets = dict(train=dict(common, split=train_split), test=dict(common, split=test_split))
    # augmented or not by role, whatever the splits are called (load_image_dataset goes by the name 'train')
    if train_split != 'train':
        sets['train']['train'] = True
    if test_split == 'train':
        sets['test']['train'] = False
    if test_fraction:
        sets['test'] = dict(common, split=train_split, train=False, test_fraction=test_fraction, part='test')
        sets['train'].update(test_fraction=test_fraction, part='train')
    if val_fraction:
        sets['train'].update(validation_fraction=val_fraction, part='train')
        sets['val'] = dict(common, split=train_split, train=False, validation_fraction=val_fraction, part='val',
                           **({'test_fraction': test_fraction} if test_fraction else {}))
    if reading and transform == 'imagenet':  # evaluated as timm evaluates the teacher's weights, at input_size
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in reading.items()}
        for role in ('test', 'val'):
            if role in sets:
                sets[role]['data_cfg'] = dict(cfg, input_size=[channels, input_size, input_size])
    if limit:
        sets['train']['limit'] = limit
    return sets


def load_datasets(kwargs: Dict[str, Dict]) -> Dict:
    from .data import DatasetColumnError, load_image_dataset
    try:
        loaded = {name: load_image_dataset(**kw) for name, kw in kwargs.items()}
    except DatasetColumnError as e:
        raise DistillError(f'{e} (jointrd distill: --image-column / --label-column)') from e
    except Exception as e:  # a missing folder, an unknown Hub id, a split that does not exist
        raise DistillError(f'Cannot load the data {kwargs["train"]["source"]!r}: {type(e).__name__}: {e}') from e
    for name, dataset in loaded.items():  # the columns found, named in the YAML and the card
        kwargs[name].update(image_column=dataset.image_column, label_column=dataset.label_column)
    return loaded


def check_splits_agree(loaded: Dict) -> None:
    """The test (and held-out) labels index the train split's classes: the same class names where both name them
    (a ClassLabel encoded per split numbers the classes of each split on its own), and no label beyond the train
    split's classes. Otherwise accuracy compares predictions with labels of other classes, without an error."""
    train = loaded['train']

    def names(dataset):
        return getattr(dataset.data.features[dataset.label_column], 'names', None)
    for part in [p for p in ('test', 'val') if p in loaded]:
        other = loaded[part]
        if names(train) and names(other) and names(train) != names(other):
            raise DistillError(f'The {part} split names its classes {names(other)[:6]}..., the train split '
                               f'{names(train)[:6]}...: one label means another class in each. Encode the label '
                               'column once over all splits (datasets.DatasetDict.class_encode_column gives each '
                               'split its own numbering; cast every split to one ClassLabel instead).')
        if other.num_classes > train.num_classes:
            raise DistillError(f'The {part} split has labels up to {other.num_classes - 1}, beyond the train split\'s '
                               f'{train.num_classes} classes; its images of those classes cannot be predicted. Give '
                               'splits with the same classes.')


def setting_schedule(source: str, input_size: int) -> Schedule:
    """The schedule of the data's setting: the demo's for the digits, ImageNet's above 64 px, else CIFAR's."""
    if source == 'sklearn:digits':
        return SCHEDULES['demo']
    return SCHEDULES['imagenet' if input_size > 64 else 'cifar']
