"""``jointrd distill``: from a residual model to its deployed shortcut-free twin, in one command.

    jointrd distill TEACHER --data SOURCE [--epochs N] [--recipe NAME] [--output DIR]

1. Everything is checked before anything is written or trained: the teacher resolves and its weights load (from
   the Hub cache when offline; missing files are named with the ways to provide them), its architecture has a twin
   that trains with JointRD (the teacher / twin pair is built once and takes one training step on a batch shaped
   like the data), the data and its columns load, the teacher's classes match the data's labels, the output folder
   holds no other run. A run that fails before its first epoch is saved leaves the output folder as it found it.
2. The torchdistill YAML of the run is written to the output folder (``distill.yaml``; ``teacher.yaml`` too when the
   teacher is trained here) and the run is trained FROM that file by the runner (resume, progress bar, atomic
   checkpoints), so ``jointrd train --config <output>/distill.yaml`` repeats it. The twin is trained with the
   recipe :func:`~jointrd_timm.recipes.recipe_for` recommends for the architecture, unless ``recipe`` names one.
3. Teacher and twin are evaluated on the same test split; the deployed twin is written in timm's Hub format with
   its model card (``<output>/model``), beside ``comparison.{md,json,png}`` (accuracy, latency, activation memory).

TEACHER: a timm name with a pretrained tag (``resnet50.a1_in1k``; timm's own pretrained loading, so a Hub cache
works offline), ``hf-hub:org/name``, a Hub-format folder (config.json + model.safetensors, as ``jointrd save``
writes) or a runner output folder (its ``model/``; for a JointRD run, the teacher part of its checkpoint).

DECISION (a teacher without weights): a bare architecture name (``resnet20_cifar``, or ``resnet50`` without a tag)
names no weights, so the teacher is first trained HERE, from scratch, with cross-entropy on the same data for
``teacher_epochs`` (default: ``epochs``); the output, the table and the model card say so. This is ``jointrd
demo``'s path; to start from timm's weights, give the tag.

DECISION (a teacher whose classes differ from the data's labels): refused, unless ``num_classes`` (the data's label
count) is given; then timm re-initialises the teacher's classifier for that many classes, and the teacher is
fine-tuned here with cross-entropy for ``teacher_epochs`` before the twin is distilled from it.

Output folder: ``teacher/`` (+ ``teacher.yaml``) when the teacher is trained here, ``teacher-weights/`` when it is
taken from a JointRD run, ``twin/`` (the JointRD run), ``distill.yaml``, ``model/``, ``comparison.*``.
"""
import copy
import difflib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

from ..errors import JointRDError
from ..recipes import SCHEDULES, Recipe, Schedule, get_recipe, recipe_for, short_run_warning

__all__ = ['run_distill', 'plan_distill', 'build_configs', 'train_distill', 'report_distill', 'resolve_teacher',
           'load_teacher', 'Teacher', 'DistillPlan', 'DistillError', 'ARTEFACTS']

# what `jointrd distill` writes into its output folder (and all that --overwrite removes)
ARTEFACTS = ('teacher', 'teacher.yaml', 'teacher-weights', 'twin', 'distill.yaml', 'model', 'comparison.md',
             'comparison.json', 'comparison.png')
DATASET_LOADER = 'jointrd_timm.training.data.load_image_dataset'
# what fetching from the Hub raises, through timm unchanged: offline (or unreachable) and not in the cache is a
# LocalEntryNotFoundError, an EntryNotFoundError; unknown, gated and private repositories are HfHubHTTPErrors
HUB_DOWNLOAD_ERRORS = (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled)


class DistillError(JointRDError, ValueError):
    """Bad input to ``jointrd distill``, found before any training starts."""


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


# -- resolving the teacher ----------------------------------------------------------------------------------------
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
                   model_args.get('in_chans', input_size[0]), input_size[-1], pretrained_cfg.get('license') or 'other')


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
    if config['architecture'].startswith('plain_') and (path / 'last.safetensors').is_file():
        # a JointRD run: model/ is its twin, the teacher is the `teacher.` part of its checkpoint
        teacher = _from_config_json(spec, {}, config, teacher_of(config['architecture']))
        teacher.run_checkpoint = path / 'last.safetensors'
        return teacher
    return _from_config_json(spec, dict(model_name=f'local-dir:{folder.resolve()}', pretrained=True), config)


def resolve_teacher(spec: str) -> Teacher:
    """What TEACHER names (see the module docstring); no weights are loaded yet."""
    import timm
    import jointrd_timm  # noqa: F401  (the CIFAR teachers and plain_* names)
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec).expanduser()
    if path.is_dir():
        return _teacher_from_folder(spec, path)
    if spec.startswith('local-dir:') or spec.startswith(('.', '/', '~')):
        raise DistillError(f'Teacher folder {path} does not exist.')
    if spec.startswith('hf-hub:'):
        from huggingface_hub import hf_hub_download
        try:
            config = json.loads(Path(hf_hub_download(spec[len('hf-hub:'):], 'config.json')).read_text())
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
                   cfg.input_size[-1], license_)


def missing_weights_error(spec: str, error: Exception) -> DistillError:
    """What a user reads when the teacher's files cannot be fetched from the Hub: which repository and files were
    looked for, where, and the three ways to provide them."""
    import timm
    from huggingface_hub import constants
    if spec.startswith('hf-hub:'):
        repo, files = spec[len('hf-hub:'):], 'config.json model.safetensors'
    else:  # a timm tag: timm reads model.safetensors (else pytorch_model.bin) of the tag's hf_hub_id
        cfg = timm.get_pretrained_cfg(spec)
        repo, files = cfg.hf_hub_id, cfg.hf_hub_filename or 'model.safetensors'
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = (f'they are not in the Hugging Face cache {constants.HF_HUB_CACHE}, and '
               + ('HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'the Hub could not be reached'))
    else:
        why = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
    return DistillError(
        f'The weights of teacher {spec} are not available: looked for {files} of the Hub repository {repo}, and '
        f'{why}. Nothing was written. Provide them, then run the same command again: (1) on a connected machine, '
        f'`hf download {repo} {files}` (huggingface_hub\'s CLI) fills its cache (HF_HOME, default '
        '~/.cache/huggingface): copy that cache here, point HF_HOME (or HF_HUB_CACHE) at it and set '
        f'HF_HUB_OFFLINE=1; or (2) `hf download {repo} --local-dir DIR` and give that Hub-format folder (config.json '
        '+ model.safetensors) as TEACHER: `jointrd distill DIR --data ...`; or (3) give a run of ours (a runner '
        'output folder with model/, or a Hub-format folder written by `jointrd save`) as TEACHER.')


def load_teacher(teacher: Teacher) -> Optional[torch.nn.Module]:
    """The teacher with its weights, as they were saved (their classes and input channels); None for a teacher
    without weights (trained here). Weights the Hub cannot provide raise :func:`missing_weights_error`."""
    if teacher.num_classes is None:
        return None
    if teacher.run_checkpoint is not None:
        import timm
        from ..io import load_weights
        model = timm.create_model(teacher.arch, num_classes=teacher.num_classes, in_chans=teacher.in_chans)
        load_weights(model, teacher.run_checkpoint, part='teacher')
        return model
    try:
        return _build(teacher.model)
    except HUB_DOWNLOAD_ERRORS as e:
        raise missing_weights_error(teacher.spec, e) from e


# -- checks before training -----------------------------------------------------------------------------------------
def check_positive(**options) -> None:
    """Numbers that must be positive when given (None: the default). 0 is refused, never read as "the default"."""
    for name, value in options.items():
        if value is not None and value <= 0:
            flag = '--' + name.replace('_', '-')
            raise DistillError(f'{flag} must be positive, got {value!r}; leave it out for its default.')


def check_output(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds another run, unless resuming it or told to overwrite it."""
    if resume and overwrite:
        raise DistillError('--resume continues the run in the output folder, --overwrite replaces it: give one.')
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if resume and 'distill.yaml' not in entries:
        raise DistillError(f'--resume: {out} holds no distill run (no distill.yaml); run without --resume to start.')
    if entries and not (resume or overwrite):
        raise DistillError(f'Output folder {out} holds another run ({", ".join(entries[:5])}); pass --resume to '
                           'continue it, --overwrite to replace it, or choose another --output.')


def check_twin(arch: str) -> None:
    """Refuse an architecture without a twin, with the reason (token mixers, no shortcut, unknown block)."""
    import timm
    from ..models.plain_twins import twin_name
    from ..twins.derive import NotResidualError, UnsupportedBlockError, make_plain, token_mixers
    if timm.is_model(twin_name(arch)):
        return
    model = timm.create_model(arch)
    mixers = token_mixers(model)
    if mixers:
        raise DistillError(f'{arch} is a transformer (or hybrid): it mixes tokens with {", ".join(mixers)}. Such '
                           'networks are refused by design: their shortcuts carry the token stream, and without them '
                           'they do not train. Choose a residual CNN teacher (`jointrd derive --list`).')
    try:
        make_plain(model)
    except (NotResidualError, UnsupportedBlockError) as e:
        raise DistillError(f'{arch} has no shortcut-free twin: {e}') from e
    raise DistillError(f'{arch} has no registered twin {twin_name(arch)} (its timm module is not one that '
                       'jointrd_timm derives); `jointrd derive --list` lists those that have one.')


def check_pair(pair: Dict, input_chw, num_classes: int) -> None:
    """Build the JointRD teacher / twin pair (random weights) and take one training step on a data-shaped batch,
    so that an architecture whose stage split or fading twin fails is refused before any training."""
    from ..integrations.torchdistill import jointrd_model
    kwargs = pair['kwargs']  # no weights named yet: the architectures only
    try:
        method = jointrd_model(**kwargs)
        method.set_run_length(1, 1)
        method.train()
        method(torch.randn(2, *input_chw), torch.arange(2) % num_classes)['loss'].backward()
    except (ValueError, RuntimeError, TypeError, StopIteration) as e:
        small = ' The images are too small for this architecture: give a larger --input-size.' \
            if 'input size' in str(e) else ''
        raise DistillError(f'{kwargs["teacher"]["model_name"]}: the teacher / twin pair does not train with JointRD '
                           f'on {tuple(input_chw)} inputs ({type(e).__name__}: {e}).{small}') from e


def check_classes(teacher: Teacher, data_classes: int, num_classes: Optional[int], source: str) -> bool:
    """True when the teacher's classifier is re-initialised for the data (``num_classes`` given)."""
    if num_classes is not None and num_classes != data_classes:
        raise DistillError(f'--num-classes {num_classes}: the data {source} has {data_classes} labels; the '
                           "teacher's classifier is re-initialised for the data's labels, so give "
                           f'--num-classes {data_classes}.')
    if teacher.num_classes is None or teacher.num_classes == data_classes:
        return False
    if num_classes is None:
        raise DistillError(f'Teacher {teacher.spec} predicts {teacher.num_classes} classes, but the data {source} has '
                           f'{data_classes} labels. Pass --num-classes {data_classes} to re-initialise its classifier '
                           'for them: the teacher is then fine-tuned on the data with cross-entropy for '
                           '--teacher-epochs before the twin is distilled.')
    return True


# -- data -------------------------------------------------------------------------------------------------------------
def dataset_kwargs(source: str, channels: int, input_size: int, transform: str, image_column: str,
                   label_column: str, train_split: str, test_split: str, val_fraction: float,
                   limit: Optional[int]) -> Dict[str, Dict]:
    """``load_image_dataset`` kwargs of the train / val / test sets (the YAML's datasets section)."""
    local = Path(source).expanduser()
    common = dict(source=str(local.resolve()) if local.exists() else source, transform=transform,
                  input_size=input_size, channels=channels, image_column=image_column, label_column=label_column)
    sets = dict(train=dict(common, split=train_split), test=dict(common, split=test_split))
    if val_fraction:
        sets['train'].update(validation_fraction=val_fraction, part='train')
        sets['val'] = dict(common, split=train_split, train=False, validation_fraction=val_fraction, part='val')
    if limit:
        sets['train']['limit'] = limit
    return sets


def load_datasets(kwargs: Dict[str, Dict]) -> Dict:
    from .data import DatasetColumnError, load_image_dataset
    try:
        return {name: load_image_dataset(**kw) for name, kw in kwargs.items()}
    except DatasetColumnError as e:
        raise DistillError(f'{e} (jointrd distill: --image-column / --label-column)') from e
    except Exception as e:  # a missing folder, an unknown Hub id, a split that does not exist
        raise DistillError(f'Cannot load the data {kwargs["train"]["source"]!r}: {type(e).__name__}: {e}') from e


def _schedule(source: str, input_size: int) -> Schedule:
    if source == 'sklearn:digits':
        return SCHEDULES['demo']
    return SCHEDULES['imagenet' if input_size > 64 else 'cifar']


# -- the YAML -------------------------------------------------------------------------------------------------------
class _Tagged:
    def __init__(self, tag: str, value: Dict):
        self.tag, self.value = tag, value


def _yaml_ready(node):
    """Plain YAML types, with the datasets' and samplers' Python objects as torchdistill's import tags."""
    if isinstance(node, type):
        return _Tagged('!import_get', dict(key=f'{node.__module__}.{node.__qualname__}'))
    if isinstance(node, dict):
        return {k: _yaml_ready(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_yaml_ready(v) for v in node]
    return node


def write_config(path: Path, config: Dict, datasets: Dict[str, Dict], header: str, resume: bool) -> Path:
    """Write ``config`` (from :func:`make_config`) as a torchdistill YAML whose datasets section rebuilds the same
    datasets (``!import_call`` of load_image_dataset). Resuming, the folder's YAML must be the same run."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Tagged, lambda dumper, t: dumper.represent_mapping(t.tag, t.value))
    document = dict(dependencies=[dict(name='jointrd_timm')],
                    datasets={name: _Tagged('!import_call', dict(key=DATASET_LOADER, init=dict(kwargs=kw)))
                              for name, kw in datasets.items()},
                    **_yaml_ready({k: v for k, v in config.items() if k != 'datasets'}))
    body = yaml.dump(document, Dumper=Dumper, sort_keys=False, width=120)
    if resume and path.is_file():
        before = '\n'.join(line for line in path.read_text().splitlines() if not line.startswith('#'))
        if before.strip() != body.strip():
            raise DistillError(f'--resume: {path} was written for a run with other settings; resume with the same '
                               'arguments, or pass --overwrite to start again.')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)
    return path


# -- running --------------------------------------------------------------------------------------------------------
def _train_from(yaml_path: Path, resume: bool, device: Optional[str]) -> Dict:
    """Train from the written YAML; resuming, a finished run is kept and a started one continues."""
    from .runner import load_config, train
    config = load_config(yaml_path)
    out = Path(config['runner']['output_dir'])
    if resume and (out / 'final.json').is_file():
        print(f'{out}: finished already, kept')
        return dict(json.loads((out / 'final.json').read_text()), config=config)
    resume = resume and (out / 'last.safetensors').is_file()
    # a fresh start writes into a folder that is distill's own (check_output refused any other), so a runner that
    # guards its output folder is told it may replace what a run that never checkpointed left there
    kwargs = dict(overwrite=not resume) if 'overwrite' in inspect.signature(train).parameters else {}
    final = train(config, resume=resume, device=device, **kwargs)
    return dict(final, config=config)


@dataclass
class DistillPlan:
    """What the checks decided: the teacher, the recipe and schedule, the data, the JointRD model config."""
    out: Path
    teacher: Teacher
    recipe: Recipe
    schedule: Schedule
    data: Dict[str, Dict]  # load_image_dataset kwargs per dataset id
    datasets: Dict
    common: Dict  # num_classes and in_chans of both models
    pair: Dict
    reinit_head: bool
    epochs: int
    teacher_epochs: int
    budget: Dict
    command: str
    runner: Dict = field(default_factory=dict)  # the runs' runner options (mixed_precision, channels_last)

    @property
    def short_run_warning(self) -> Optional[str]:
        steps_per_epoch = -(-len(self.datasets['train']) // self.budget['batch_size'])
        return short_run_warning(self.recipe, self.epochs, steps_per_epoch)

    @property
    def teacher_trained_here(self) -> bool:
        return self.teacher.num_classes is None or self.reinit_head

    @property
    def input_chw(self):
        size = self.data['train']['input_size']
        return self.common['in_chans'], size, size


def plan_distill(teacher: str, data: str, output_dir: str = 'runs/distill', epochs: Optional[int] = None,
                 recipe: Optional[str] = None, teacher_epochs: Optional[int] = None,
                 num_classes: Optional[int] = None, image_column: str = 'img', label_column: str = 'label',
                 train_split: str = 'train', test_split: str = 'test', val_fraction: float = 0.0,
                 limit: Optional[int] = None, transform: Optional[str] = None, input_size: Optional[int] = None,
                 batch_size: Optional[int] = None, lr: Optional[float] = None, workers: Optional[int] = None,
                 seed: int = 0, resume: bool = False, overwrite: bool = False, mixed_precision: str = 'no',
                 channels_last: bool = False, compile: Optional[str] = None) -> DistillPlan:
    """Every check of ``jointrd distill``, before anything is written or trained; raises :class:`DistillError`.
    ``mixed_precision``, ``channels_last`` and ``compile`` (a torch.compile backend, None: off) go to every run's
    ``runner`` section (docs/jointrd.md)."""
    from .runner import MIXED_PRECISION
    if mixed_precision not in MIXED_PRECISION:
        raise DistillError(f'mixed_precision must be one of {", ".join(MIXED_PRECISION)}, got {mixed_precision!r}.')
    check_positive(epochs=epochs, teacher_epochs=teacher_epochs, batch_size=batch_size, lr=lr, limit=limit,
                   input_size=input_size)
    out = Path(output_dir)
    check_output(out, resume, overwrite)
    resolved = resolve_teacher(teacher)
    check_twin(resolved.arch)
    twin_recipe = get_recipe(recipe) if recipe else recipe_for(resolved.arch)
    digits = data == 'sklearn:digits'
    input_size = input_size or (8 if digits else resolved.input_size)
    transform = transform or ('tensor' if digits else 'cifar' if input_size <= 64 else 'imagenet')
    # a teacher with weights fixes the input channels; one trained here takes the data's
    channels = resolved.in_chans if resolved.num_classes is not None else (1 if digits else 3)
    sets = dataset_kwargs(data, channels, input_size, transform, image_column, label_column, train_split,
                          test_split, val_fraction, limit)
    datasets = load_datasets(sets)
    data_classes = datasets['train'].num_classes
    reinit = check_classes(resolved, data_classes, num_classes, data)
    schedule = _schedule(data, input_size)
    epochs = epochs if epochs is not None else schedule.epochs
    common = dict(num_classes=data_classes, in_chans=channels)
    pair = twin_recipe.jointrd_model(resolved.arch, None, schedule.replace(epochs=epochs, lr=lr or schedule.lr),
                                     **common)
    check_pair(pair, (channels, input_size, input_size), data_classes)
    load_teacher(resolved)  # its weights are there and load: a run never starts only to fail fetching them
    budget = dict(batch_size=batch_size or schedule.batch_size, lr=lr or schedule.lr,
                  weight_decay=schedule.weight_decay, seed=seed,
                  num_workers=workers if workers is not None else (0 if digits else 2))
    command = f'jointrd distill {teacher} --data {data} --epochs {epochs} --recipe {twin_recipe.id} --output {out}' \
        + (f' --mixed-precision {mixed_precision}' if mixed_precision != 'no' else '') \
        + (' --channels-last' if channels_last else '') + (f' --compile {compile}' if compile else '')
    return DistillPlan(out, resolved, twin_recipe, schedule, sets, datasets, common, pair, reinit, epochs,
                       teacher_epochs if teacher_epochs is not None else epochs, budget, command,
                       runner=dict(mixed_precision=mixed_precision, channels_last=channels_last,
                                   compile=compile or False))


def build_configs(plan: DistillPlan, teacher_model: Dict) -> Dict[str, Dict]:
    """The runs' configs (:func:`make_config`), in training order: ``teacher`` when the teacher is trained here,
    then ``distill`` (the twin with JointRD). ``teacher_model``: timm_model kwargs of the teacher's weights."""
    from .configs import make_config
    out, common = plan.out, plan.common
    datasets = dict(train_set=plan.datasets['train'], test_set=plan.datasets['test'],
                    val_set=plan.datasets.get('val'))
    configs = {}

    def config(model: Dict, method: str, epochs: int, folder: str) -> Dict:
        run = make_config(**datasets, model=model, method=method, epochs=epochs,
                          output_dir=str((out / folder).resolve()), **plan.budget)
        run['runner'].update(plan.runner)
        run['train']['scheduler'] = plan.schedule.scheduler() if epochs == plan.schedule.epochs else \
            dict(key='CosineAnnealingLR', kwargs=dict(T_max=epochs))  # the setting's decay at its own length only
        if 'val' not in plan.data:  # the per-epoch record reads the test set, as make_config's default does
            run['train']['val_data_loader']['dataset_id'] = 'test'
            del run['datasets']['val']
        return run

    pair = copy.deepcopy(plan.pair)
    if plan.teacher_trained_here:
        configs['teacher'] = config(dict(key='timm_model', kwargs=dict(teacher_model, **common)), 'ce',
                                    plan.teacher_epochs, 'teacher')
        pair['kwargs']['teacher'] = dict(model_name=plan.teacher.arch, **common,
                                         checkpoint=str((out / 'teacher' / 'model').resolve()))
    else:
        pair['kwargs']['teacher'] = dict(teacher_model, **common)
    configs['distill'] = config(pair, 'jointrd', plan.epochs, 'twin')
    return configs


def train_distill(plan: DistillPlan, resume: bool = False, overwrite: bool = False,
                  device: Optional[str] = None) -> Dict:
    """Write the YAML(s) and train from them: the teacher first when it is trained here, then the twin."""
    out, teacher = plan.out, plan.teacher
    if overwrite:
        _remove_artefacts(out)
    existed = out.exists()
    try:
        teacher_model = teacher.model
        if teacher.run_checkpoint is not None:
            teacher_model = _extract_run_teacher(teacher, out / 'teacher-weights')
        configs = build_configs(plan, teacher_model)
        what = dict(teacher='the teacher, cross-entropy',
                    distill=f'the twin with JointRD, recipe `{plan.recipe.id}` ({plan.recipe.record})')
        for name, config in configs.items():
            path = write_config(out / f'{name}.yaml', config, plan.data, _header(plan.command, what[name]), resume)
            if name == 'teacher':
                print(f'NOTE: teacher {teacher.spec}: {_teacher_origin(plan)}, with cross-entropy.'
                      + _tag_hint(teacher))
            else:
                print(f'twin plain_{teacher.arch}: JointRD from the teacher, recipe `{plan.recipe.id}`, '
                      f'{plan.epochs} epochs')
                if plan.short_run_warning:
                    print(f'WARNING: {plan.short_run_warning}')
            final = _train_from(path, resume, device)
    except BaseException:
        if not resume and not _saved_an_epoch(out):
            # nothing trained yet: leave the folder as this call found it, so that the same command runs again
            # once the cause is fixed (instead of being refused as "another run")
            _remove_artefacts(out)
            if not existed and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    return final


def _remove_artefacts(out: Path) -> None:
    import shutil
    for name in ARTEFACTS:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def _saved_an_epoch(out: Path) -> bool:
    """Whether a run of this distill (teacher or twin) has a checkpoint or has finished: then --resume continues."""
    return any((out / run / name).is_file() for run in ('teacher', 'twin') for name in ('last.safetensors',
                                                                                         'final.json'))


def report_distill(plan: DistillPlan, final: Dict, train_seconds: float, latency_repeats: int = 30) -> Dict:
    """Evaluate teacher and deployed twin on the same test split; write model/ (with its card) and comparison.*."""
    from ..integrations.hub import load_model, model_card, save_trained_model
    from ..io import top1_accuracy
    from .compare import measure_models, plot_comparison
    out, arch = plan.out, plan.teacher.arch
    config = final['config']
    test_set = config['datasets']['test']
    models = dict(teacher=_build(config['models']['model']['kwargs']['teacher']),
                  twin=load_model(str(out / 'twin' / 'model')))
    accuracy = {name: top1_accuracy(model, test_set) for name, model in models.items()}
    measured = measure_models(models, plan.input_chw, latency_repeats=latency_repeats)
    labels = dict(teacher=f'teacher `{plan.teacher.spec}` (residual)', twin=f'twin `plain_{arch}` (shortcut-free)')
    lines = [f'# jointrd distill: {plan.teacher.spec} -> plain_{arch} on {plan.data["train"]["source"]}', '',
             f'Teacher: {_teacher_origin(plan)}. Twin: recipe `{plan.recipe.id}` ({plan.recipe.description}), '
             f'{plan.epochs} epochs. Test split `{plan.data["test"]["split"]}` ({len(test_set)} images), deployed '
             'twin (fade finished, folded).', '',
             '| model | test acc % | params | latency b1 ms | latency b16 ms | activation memory b1 MB |',
             '|---|---|---|---|---|---|']
    for name, label in labels.items():
        lines.append(f'| {label} | {accuracy[name]:.2f} | {measured["params"][name] / 1e6:.3f} M | '
                     f'{measured["latency_ms"][1][name]:.2f} | {measured["latency_ms"][16][name]:.2f} | '
                     f'{measured["activation_memory_mb"][name]:.3f} |')
    speedup = measured['speedup']
    lines += ['', f'Twin vs teacher latency (eager PyTorch, {measured["threads"]} threads, medians of '
                  f'{latency_repeats} interleaved runs): {speedup[1]:.2f}x at batch 1, {speedup[16]:.2f}x at '
                  f'batch 16. Training took {train_seconds:.0f} s.']
    if plan.short_run_warning:
        lines += ['', f'**Warning:** {plan.short_run_warning}']
    table = '\n'.join(lines)
    summary = dict(teacher=plan.teacher.spec, teacher_origin=_teacher_origin(plan), twin=f'plain_{arch}',
                   data=plan.data, recipe=plan.recipe.id, epochs=plan.epochs,
                   teacher_epochs=plan.teacher_epochs if plan.teacher_trained_here else 0, test_acc=accuracy,
                   twin_run={k: v for k, v in final.items() if k != 'config'}, train_seconds=train_seconds,
                   **{k: v for k, v in measured.items() if k != 'threads'})
    card = model_card(dict(
        name=f'plain_{arch}', architecture=f'plain_{arch}', teacher=plan.teacher.spec, license=plan.teacher.license,
        description=f'Shortcut-free twin of `{plan.teacher.spec}`, written by `jointrd distill`. Teacher: '
                    f'{_teacher_origin(plan)}.', results_title='Results (measured by `jointrd distill`)',
        method=f'JointRD (Li et al., NeurIPS 2020), recipe `{plan.recipe.id}`: {plan.recipe.description}',
        dataset=f'{plan.data["train"]["source"]} (train split `{plan.data["train"]["split"]}`, test split '
                f'`{plan.data["test"]["split"]}`)', hf_dataset=plan.data['train']['source'],
        training=dict(budget=f'{plan.epochs} epochs, batch {plan.budget["batch_size"]}, lr {plan.budget["lr"]}',
                      command=plan.command, yaml='distill.yaml'),
        metrics=dict(top1_test=round(accuracy['twin'], 2), teacher_top1_test=round(accuracy['teacher'], 2),
                     latency_speedup_b1=round(speedup[1], 2)),
        eval=dict(split=plan.data['test']['split'], image_column=plan.data['test']['image_column'],
                  label_column=plan.data['test']['label_column'], validate_args=_timm_validate_args(plan)),
        local_dir=str((out / 'model').resolve())))
    save_trained_model(models['twin'], out / 'model', metrics=summary['test_acc'], model_card=card)
    (out / 'comparison.json').write_text(json.dumps(summary, indent=1))
    (out / 'comparison.md').write_text(table + '\n')
    plot_comparison([('teacher', accuracy['teacher']), ('twin', accuracy['twin'])], speedup,
                    out / 'comparison.png', f'{plan.teacher.spec} -> plain_{arch}',
                    memory=measured['activation_memory_mb'])
    print(table)
    print(f'\nwrote {out / "model"} (the deployed twin, with README.md), {out / "distill.yaml"}, '
          f'{out / "comparison.md"}, {out / "comparison.png"}')
    return summary


def run_distill(teacher: str, data: str, output_dir: str = 'runs/distill', device: Optional[str] = None,
                resume: bool = False, overwrite: bool = False, latency_repeats: int = 30, **options) -> Dict:
    """TEACHER -> its deployed twin: :func:`plan_distill` (``options``: its arguments), :func:`train_distill`,
    :func:`report_distill`. Returns the comparison (also ``comparison.json``)."""
    import time
    plan = plan_distill(teacher, data, output_dir, resume=resume, overwrite=overwrite, **options)
    start = time.time()
    final = train_distill(plan, resume, overwrite, device)
    return report_distill(plan, final, time.time() - start, latency_repeats)


def _timm_validate_args(plan: DistillPlan):
    """timm validate.py options that preprocess the test images as this evaluation did (validate.py otherwise follows
    the twin's pretrained_cfg, which is its architecture's, not this data's); False (no validate.py line on the
    card) for single-channel data."""
    from torchvision.transforms import Normalize
    if plan.common['in_chans'] != 3:
        return False
    normalize = next(t for t in plan.datasets['test'].transform.transforms if isinstance(t, Normalize))
    crop_pct = 0.875 if plan.data['test']['transform'] == 'imagenet' else 1.0
    mean, std = (' '.join(f'{float(v):.4g}' for v in values) for values in (normalize.mean, normalize.std))
    return (f'--img-size {plan.data["test"]["input_size"]} --crop-pct {crop_pct} --interpolation bilinear '
            f'--mean {mean} --std {std}')


def _build(model_kwargs: Dict):
    from ..integrations.torchdistill import timm_model
    return timm_model(**model_kwargs).eval()


def _teacher_origin(plan: DistillPlan) -> str:
    if plan.teacher.num_classes is None:
        return f'trained here from scratch ({plan.teacher_epochs} epochs; no weights were given)'
    if plan.reinit_head:
        return (f'{plan.teacher.spec} with its classifier re-initialised for {plan.common["num_classes"]} classes, '
                f'fine-tuned here ({plan.teacher_epochs} epochs)')
    return f'loaded from {plan.teacher.spec}'


def _tag_hint(teacher: Teacher) -> str:
    import timm
    tags = timm.list_pretrained(teacher.arch + '.*') if teacher.num_classes is None else []
    return f' To start from pretrained weights give a tag, e.g. {", ".join(tags[:3])}.' if tags else ''


def _extract_run_teacher(teacher: Teacher, folder: Path) -> Dict:
    """The teacher part of a JointRD run's checkpoint, written in Hub format; its timm_model kwargs."""
    from ..integrations.hub import save_trained_model
    save_trained_model(load_teacher(teacher), folder)
    return dict(model_name=f'local-dir:{folder.resolve()}', pretrained=True)


def _header(command: str, what: str) -> str:
    return (f'# Written by `{command}`: {what}.\n'
            '# Repeat the run: jointrd train --config <this file>. A YAML is code: torchdistill runs its\n'
            '# !import_call tags when it loads. Run only YAMLs you trust.\n')
