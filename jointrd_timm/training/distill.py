"""``jointrd distill``: from a residual model to its deployed shortcut-free twin, in one command.

    jointrd distill TEACHER --data SOURCE [--epochs N] [--recipe NAME] [--output-dir DIR]

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
   its model card (``<output>/model``), beside ``comparison.{md,json,png}`` (accuracy, agreement with the
   teacher, latency, activation memory).

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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..recipes import Recipe, Schedule, get_recipe, outcome_warning, recipe_for, short_run_warning
from .configs import build_config, to_yaml
from .data import DatasetColumnError, dataset_data_cfg, find_columns, labelled_as_datasets_labels_it
from .distill_inputs import (DataSpec, DistillError, TrainSpec, check_classes, check_output, check_pair, check_positive,
                             check_splits_agree, check_twin, command_line, dataset_kwargs, load_datasets,
                             saved_an_epoch, setting_schedule, specs)
from .teachers import (Teacher, build_model, extract_run_teacher, load_teacher, resolve_teacher, tag_hint,
                       with_weights_file)
# names that moved to configs.py, distill_inputs.py and teachers.py, still importable from here
from .configs import DATASET_LOADER  # noqa: F401,E402
from .distill_inputs import check_positive  # noqa: F401,E402
from .teachers import (HUB_DOWNLOAD_ERRORS, _from_config_json, _teacher_from_folder,  # noqa: F401,E402
                       missing_weights_error)

__all__ = ['run_distill', 'plan_distill', 'build_configs', 'train_distill', 'report_distill', 'resolve_teacher',
           'load_teacher', 'Teacher', 'DistillPlan', 'DataSpec', 'TrainSpec', 'DistillError', 'ARTEFACTS']

# what `jointrd distill` writes into its output folder (and all that --overwrite removes)
ARTEFACTS = ('teacher', 'teacher.yaml', 'teacher-weights', 'twin', 'distill.yaml', 'model', 'comparison.md',
             'comparison.json', 'comparison.png')
# the former private names of what moved to teachers.py and distill_inputs.py
_build, _tag_hint, _extract_run_teacher, _schedule = build_model, tag_hint, extract_run_teacher, setting_schedule


# -- the YAML and running from it -----------------------------------------------------------------------------------
def write_config(path: Path, config: Dict, datasets: Dict[str, Dict], header: str, resume: bool) -> Path:
    """Write ``config`` (from :func:`build_configs`) as a torchdistill YAML whose datasets section rebuilds the same
    datasets (``!import_call`` of load_image_dataset). Resuming, the folder's YAML must be the same run."""
    body = to_yaml(config, datasets)
    if resume and path.is_file():
        before = '\n'.join(line for line in path.read_text().splitlines() if not line.startswith('#'))
        if before.strip() != body.strip():
            raise DistillError(f'--resume: {path} was written for a run with other settings (other arguments, or '
                               'an earlier version of jointrd-timm that wrote its YAML otherwise); resume with the '
                               'same arguments and version, or pass --overwrite to start again.')
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)
    return path


def _train_from(yaml_path: Path, resume: bool, device: Optional[str]) -> Dict:
    """Train from the written YAML; resuming, a finished run is kept and a started one continues."""
    from .run_folder import RunFolder
    from .runner import load_config, train
    config = load_config(yaml_path)
    folder = RunFolder(config['runner']['output_dir'])
    final = folder.final() if resume else None
    if final is not None:
        print(f'{folder.path}: finished already, kept')
        return dict(final, config=config)
    resume = resume and folder.can_resume()
    # a fresh start writes into a folder that is distill's own (check_output refused any other), so the runner is
    # told it may replace what a run that never checkpointed left there
    return dict(train(config, resume=resume, device=device, overwrite=not resume), config=config)


# -- planning -------------------------------------------------------------------------------------------------------
@dataclass
class DistillPlan:
    """What the checks decided: the teacher, the recipe and schedule, the data, the JointRD model config."""
    out: Path
    teacher: Teacher
    recipe: Recipe
    schedule: Schedule  # the setting's (SCHEDULES); a run's is run_schedule(epochs)
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
    def label_note(self) -> Optional[str]:
        """Integer labels (no ClassLabel) that skip values, e.g. 1..10: the models get an output per index up to the
        largest, and the classes without a training image are never trained; None when every class has images."""
        train = self.datasets['train']
        missing = getattr(train, 'unused_classes', None)  # of the whole train split, before a limit or carve
        if not missing:
            return None
        shown = ', '.join(map(str, missing[:8])) + (', ...' if len(missing) > 8 else '')
        return (f'the labels are integers up to {train.num_classes - 1}, so the models get {train.num_classes} '
                f'outputs, but {len(missing)} of those classes have no image in the train split ({shown}): labels '
                'that skip values (e.g. numbered from 1) leave outputs that are never trained. Renumber them from 0 '
                '(or encode the column as a ClassLabel) if they are not meant as class indices.')

    @property
    def teacher_trained_here(self) -> bool:
        return self.teacher.num_classes is None or self.reinit_head

    def run_schedule(self, epochs: int, twin: bool = False) -> Schedule:
        """The schedule of a run of ``epochs`` here: the setting's (:meth:`Schedule.for_run`) at this batch and lr;
        ``twin``: the twin's run, at the recipe's :meth:`~jointrd_timm.recipes.Recipe.conversion_lr` of that lr."""
        schedule = self.schedule.for_run(epochs, self.budget['lr']).replace(batch_size=self.budget['batch_size'])
        return self.recipe.twin_schedule(schedule) if twin else schedule

    @property
    def input_chw(self):
        size = self.data['train']['input_size']
        return self.common['in_chans'], size, size


def plan_distill(teacher: str, data, output_dir: str = 'runs/distill', train: Optional[TrainSpec] = None,
                 recipe: Optional[str] = None, num_classes: Optional[int] = None, resume: bool = False,
                 overwrite: bool = False, teacher_weights: Optional[str] = None, **options) -> DistillPlan:
    """Every check of ``jointrd distill``, before anything is written or trained; raises :class:`DistillError`.

    ``data``: a source or a :class:`DataSpec`; ``train``: a :class:`TrainSpec`; ``options``: their fields by name
    (``epochs=3, limit=128``, the command line's form). ``recipe``: a name of ``RECIPES`` (default: the one
    recommended for the teacher's architecture); ``num_classes``: the data's label count, to re-initialise the
    classifier of a teacher trained for other classes; ``teacher_weights``: a .safetensors state dict of the
    architecture ``teacher`` names (:func:`~jointrd_timm.training.teachers.with_weights_file`)."""
    data, train = specs(data, train, **options)
    train.check(data)
    try:
        chosen = get_recipe(recipe) if recipe else None
    except ValueError as e:
        raise DistillError(f'--recipe {recipe!r}: {e}') from None
    out = Path(output_dir)
    check_output(out, resume, overwrite)
    resolved = resolve_teacher(teacher)
    check_twin(resolved.arch)
    if teacher_weights is not None:
        resolved = with_weights_file(resolved, teacher_weights)
    twin_recipe = chosen or recipe_for(resolved.arch)
    digits = data.source == 'sklearn:digits'
    input_size = data.input_size or (8 if digits else resolved.input_size)
    transform = data.transform or ('tensor' if digits else 'cifar' if input_size <= 64 else 'imagenet')
    # a teacher with weights fixes the input channels, as a torchvision model does (RGB); one trained here takes the
    # data's
    channels = resolved.in_chans if resolved.num_classes is not None or resolved.torchvision else (1 if digits else 3)
    sets = dataset_kwargs(data.source, channels, input_size, transform, data.image_column, data.label_column,
                          data.train_split, data.test_split, data.val_fraction, data.limit, data.test_fraction,
                          # the teacher's weights expect their own mean / std, whatever the augmentation and crop
                          reading=resolved.data_cfg if len((resolved.data_cfg or {}).get('mean', ())) == channels
                          else None)
    datasets = load_datasets(sets)
    check_splits_agree(datasets)
    data_classes = datasets['train'].num_classes
    reinit = check_classes(resolved, data_classes, num_classes, data.source)
    schedule = setting_schedule(data.source, input_size)
    epochs = train.epochs if train.epochs is not None else schedule.epochs
    common = dict(num_classes=data_classes, in_chans=channels, **resolved.model_args)
    budget = dict(batch_size=train.batch_size or schedule.batch_size, lr=train.lr or schedule.lr,
                  weight_decay=schedule.weight_decay, seed=train.seed,
                  num_workers=train.workers if train.workers is not None else (0 if digits else 2))
    twin_schedule = twin_recipe.twin_schedule(schedule.for_run(epochs, budget['lr']))
    pair = twin_recipe.jointrd_model(resolved.arch, None, twin_schedule, **common)
    check_pair(pair, (channels, input_size, input_size), data_classes)
    load_teacher(resolved)  # its weights are there and load: a run never starts only to fail fetching them
    command = command_line(teacher, data, train, twin_recipe.id, epochs, num_classes, out, teacher_weights)
    return DistillPlan(out, resolved, twin_recipe, schedule, sets, datasets, common, pair, reinit, epochs,
                       train.teacher_epochs if train.teacher_epochs is not None else epochs, budget, command,
                       runner=dict(mixed_precision=train.mixed_precision, channels_last=train.channels_last,
                                   compile=train.compile or False))


def build_configs(plan: DistillPlan, teacher_model: Dict) -> Dict[str, Dict]:
    """The runs' configs (:func:`~jointrd_timm.training.configs.build_config`), in training order: ``teacher`` when
    the teacher is trained here, then ``distill`` (the twin with JointRD). ``teacher_model``: timm_model kwargs of
    the teacher's weights."""
    out, common = plan.out, plan.common

    def config(model: Dict, method: str, epochs: int, folder: str) -> Dict:
        # the per-epoch record reads the held-out part of the train split when there is one, else the test set
        schedule = plan.run_schedule(epochs, twin=folder == 'twin')
        return build_config(plan.datasets, model, schedule, method, seed=plan.budget['seed'],
                            output_dir=str((out / folder).resolve()), num_workers=plan.budget['num_workers'],
                            runner=plan.runner)

    configs = {}
    pair = copy.deepcopy(plan.pair)
    if plan.teacher_trained_here:
        # a teacher with as many classes as the data keeps its classifier through timm's loader: reset it here
        # (a weights file's classifier is never loaded into one for other classes: reset it there too)
        reset = dict(reset_head=True) if plan.reinit_head and (plan.teacher.num_classes == common['num_classes']
                                                               or 'checkpoint' in teacher_model) else {}
        configs['teacher'] = config(dict(key='timm_model', kwargs=dict(teacher_model, **common, **reset)), 'ce',
                                    plan.teacher_epochs, 'teacher')
        pair['kwargs']['teacher'] = dict(model_name=plan.teacher.arch, **common,
                                         checkpoint=str((out / 'teacher' / 'model').resolve()))
    else:
        pair['kwargs']['teacher'] = dict(teacher_model, **common)
    configs['distill'] = config(pair, 'jointrd', plan.epochs, 'twin')
    return configs


# -- training and the report -------------------------------------------------------------------------------------------
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
            teacher_model = extract_run_teacher(teacher, out / 'teacher-weights')
        configs = build_configs(plan, teacher_model)
        what = dict(teacher='the teacher, cross-entropy',
                    distill=f'the twin with JointRD, recipe `{plan.recipe.id}` ({plan.recipe.record})')
        note = plan.label_note
        if note:
            print(f'NOTE: {note}')
        for name, config in configs.items():
            path = write_config(out / f'{name}.yaml', config, plan.data, _header(plan.command, what[name]), resume)
            if name == 'teacher':
                print(f'NOTE: teacher {teacher.spec}: {_teacher_origin(plan)}, with cross-entropy.'
                      + tag_hint(teacher))
            else:
                print(f'twin plain_{teacher.arch}: JointRD from the teacher, recipe `{plan.recipe.id}`, '
                      f'{plan.epochs} epochs')
                if plan.short_run_warning:
                    print(f'WARNING: {plan.short_run_warning}')
            final = _train_from(path, resume, device)
    except BaseException:
        if not resume and not saved_an_epoch(out):
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


def report_distill(plan: DistillPlan, final: Dict, train_seconds: float, latency_repeats: int = 30) -> Dict:
    """Evaluate teacher and deployed twin on the same test split; write model/ (with its card) and comparison.*."""
    from ..integrations.hub import load_model, model_card, save_trained_model
    from ..io import top1_agreement, top1_predictions
    from .compare import measure_models, plot_comparison
    out, arch = plan.out, plan.teacher.arch
    config = final['config']
    test_set = config['datasets']['test']
    models = dict(teacher=build_model(config['models']['model']['kwargs']['teacher']),
                  twin=load_model(str(out / 'twin' / 'model')))
    predicted = {name: top1_predictions(model, test_set) for name, model in models.items()}
    accuracy = {name: top1_agreement(*predicted[name]) for name in models}  # the same class as the label
    # how often the deployed twin gives the teacher's class: what a user replacing the teacher sees change
    agreement = top1_agreement(predicted['twin'][0], predicted['teacher'][0])
    measured = measure_models(models, plan.input_chw, latency_repeats=latency_repeats)
    labels = dict(teacher=f'teacher `{plan.teacher.spec}` (residual)', twin=f'twin `plain_{arch}` (shortcut-free)')
    lines = [f'# jointrd distill: {plan.teacher.spec} -> plain_{arch} on {plan.data["train"]["source"]}', '',
             f'Teacher: {_teacher_origin(plan)}. Twin: recipe `{plan.recipe.id}` ({plan.recipe.description}), '
             f'{plan.epochs} epochs. {_test_set_words(plan.data["test"])} ({len(test_set)} images), deployed '
             'twin (fade finished, folded).', '',
             '| model | test acc % | same class as the teacher % | params | latency b1 ms | latency b16 ms | '
             'activation memory b1 MB |',
             '|---|---|---|---|---|---|---|']
    for name, label in labels.items():
        same = f'{agreement:.2f}' if name == 'twin' else ''
        lines.append(f'| {label} | {accuracy[name]:.2f} | {same} | {measured["params"][name] / 1e6:.3f} M | '
                     f'{measured["latency_ms"][1][name]:.2f} | {measured["latency_ms"][16][name]:.2f} | '
                     f'{measured["activation_memory_mb"][name]:.3f} |')
    speedup = measured['speedup']
    lines += ['', f'Twin vs teacher latency (eager PyTorch, {measured["threads"]} threads, medians of '
                  f'{latency_repeats} interleaved runs): {speedup[1]:.2f}x at batch 1, {speedup[16]:.2f}x at '
                  f'batch 16. Training took {train_seconds:.0f} s.']
    teacher_epochs = plan.teacher_epochs if plan.teacher_trained_here else 0
    warnings = [w for w in (plan.short_run_warning,
                            outcome_warning(accuracy['teacher'], accuracy['twin'], plan.common['num_classes'],
                                            plan.epochs, teacher_epochs)) if w]
    lines += [line for w in warnings for line in ('', f'**Warning:** {w}')]
    table = '\n'.join(lines)
    summary = dict(teacher=plan.teacher.spec, teacher_origin=_teacher_origin(plan), twin=f'plain_{arch}',
                   data=plan.data, recipe=plan.recipe.id, epochs=plan.epochs,
                   teacher_epochs=teacher_epochs, test_acc=accuracy, teacher_agreement=agreement, warnings=warnings,
                   twin_run={k: v for k, v in final.items() if k != 'config'}, train_seconds=train_seconds,
                   **{k: v for k, v in measured.items() if k != 'threads'})
    reading = dataset_data_cfg(plan.datasets['test'], plan.common['in_chans'])  # None: config.json cannot say it
    card = model_card(dict(
        name=f'plain_{arch}', architecture=f'plain_{arch}', teacher=plan.teacher.spec, license=plan.teacher.license,
        description=f'Shortcut-free twin of `{plan.teacher.spec}`, written by `jointrd distill`. Teacher: '
                    f'{_teacher_origin(plan)}.', results_title='Results (measured by `jointrd distill`)',
        method=f'JointRD (Li et al., NeurIPS 2020), recipe `{plan.recipe.id}`: {plan.recipe.description}',
        dataset=f'{plan.data["train"]["source"]} (train split `{plan.data["train"]["split"]}`, '
                f'{_test_set_words(plan.data["test"], lower=True)})', hf_dataset=plan.data['train']['source'],
        training=dict(budget=f'{plan.epochs} epochs, batch {plan.budget["batch_size"]}, lr {plan.budget["lr"]}',
                      command=plan.command, yaml='distill.yaml'),
        metrics=dict(top1_test=round(accuracy['twin'], 2), teacher_top1_test=round(accuracy['teacher'], 2),
                     teacher_agreement_test=round(agreement, 2), latency_speedup_b1=round(speedup[1], 2)),
        warnings=warnings,
        eval_args=_eval_args(plan.data['test'], _columns_found(plan.datasets['test'].data), reading is not None),
        eval=dict(split=plan.data['test']['split'], image_column=plan.data['test']['image_column'],
                  label_column=plan.data['test']['label_column'],
                  # timm's validate.py reads whole splits: it cannot read a carved test set (nor grey images, nor
                  # class folders with subfolders, which datasets labels by their innermost folder)
                  validate_args=plan.common['in_chans'] == 3 and not plan.data['test'].get('test_fraction')
                  and labelled_as_datasets_labels_it(plan.datasets['test'].data)),
        local_dir=str((out / 'model').resolve())))
    # config.json says how the test images were read: timm's validate.py and `jointrd eval` read them so (validate.py
    # cannot read them in grey: no validate.py line on a 1-channel card)
    save_trained_model(models['twin'], out / 'model', metrics=summary['test_acc'], model_card=card, tag='distill',
                       data_cfg=reading, label_names=plan.datasets['train'].label_names or [])
    (out / 'comparison.json').write_text(json.dumps(summary, indent=1))
    (out / 'comparison.md').write_text(table + '\n')
    plot_comparison([('teacher', accuracy['teacher']), ('twin', accuracy['twin'])], speedup,
                    out / 'comparison.png', f'{plan.teacher.spec} -> plain_{arch}',
                    memory=measured['activation_memory_mb'])
    print(table)
    for warning in warnings:  # after the table too, where a user reading the end of the output sees it
        print(f'\nWARNING: {warning}')
    print(f'\nwrote {out / "model"} (the deployed twin, with README.md), {out / "distill.yaml"}, '
          f'{out / "comparison.md"}, {out / "comparison.png"}')
    return summary


def _columns_found(data) -> Tuple[Optional[str], Optional[str]]:
    """The (image, label) columns ``jointrd eval`` finds in ``data`` (a ``datasets.Dataset``) with no column option;
    (None, None) where its search refuses the data."""
    try:
        return find_columns(data, None, None, 'the test split')
    except DatasetColumnError:
        return None, None


def _test_set_words(test: Dict, lower: bool = False) -> str:
    """What the test set is: a split, or the fraction --test-fraction carved from one."""
    words = (f'Test set: {test["test_fraction"]:g} of split `{test["split"]}` carved out (--test-fraction)'
             if test.get('test_fraction') else f'Test split `{test["split"]}`')
    return 't' + words[1:] if lower else words


def _eval_args(test: Dict, found: Tuple[Optional[str], Optional[str]], reading_saved: bool = False) -> str:
    """The ``jointrd eval`` options for the model card's command: the split, the columns where eval would not find
    them by itself (``found``: :func:`_columns_found` of the test split), and the reading (transform, input size)
    where it is not CIFAR's at 32 px or the digits', unless the twin's config.json says it (``reading_saved``):
    eval then reads the images as config.json says, and a ``--transform`` would override that with its own."""
    digits = test['source'] == 'sklearn:digits'
    defaults = dict(split='test', test_fraction=None, image_column=found[0], label_column=found[1])
    if not reading_saved or digits:
        defaults.update(transform='tensor' if digits else 'cifar', input_size=8 if digits else 32)
    return ' '.join(f'--{key.replace("_", "-")} {test.get(key)}' for key, default in defaults.items()
                    if test.get(key) is not None and test.get(key) != default)


def run_distill(teacher: str, data: str, output_dir: str = 'runs/distill', device: Optional[str] = None,
                resume: bool = False, overwrite: bool = False, latency_repeats: int = 30, **options) -> Dict:
    """TEACHER -> its deployed twin: :func:`plan_distill` (``options``: its arguments), :func:`train_distill`,
    :func:`report_distill`. Returns the comparison (also ``comparison.json``)."""
    import time
    from .runner import check_device
    check_device(device)
    check_positive(latency_repeats=latency_repeats)
    plan = plan_distill(teacher, data, output_dir, resume=resume, overwrite=overwrite, **options)
    start = time.time()
    final = train_distill(plan, resume, overwrite, device)
    return report_distill(plan, final, time.time() - start, latency_repeats)


def _teacher_origin(plan: DistillPlan) -> str:
    if plan.teacher.num_classes is None:
        return f'trained here from scratch ({plan.teacher_epochs} epochs; no weights were given)'
    if plan.reinit_head:
        return (f'{plan.teacher.spec}{_weights_words(plan.teacher)} with its classifier re-initialised for '
                f'{plan.common["num_classes"]} classes, fine-tuned here ({plan.teacher_epochs} epochs)')
    if plan.teacher.weights_file is not None:
        return f'{plan.teacher.arch} loaded from {plan.teacher.weights_file}'
    return f'loaded from {plan.teacher.spec}'


def _weights_words(teacher: Teacher) -> str:
    return f' (the weights of {teacher.weights_file})' if teacher.weights_file is not None else ''


def _header(command: str, what: str) -> str:
    return (f'# Written by `{command}`: {what}.\n'
            '# Repeat the run: jointrd train --config <this file>. A YAML is code: torchdistill runs its\n'
            '# !import_call tags when it loads. Run only YAMLs you trust.\n')
