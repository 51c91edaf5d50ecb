"""Trained models in timm's Hugging Face Hub format: config.json + model.safetensors (+ README.md model card).

Saving folds what only exists for training (Dirac parametrisation) so the files hold a plain, deployable twin
that ``timm.create_model('local-dir:<folder>', pretrained=True)`` or ``'hf-hub:org/name'`` loads back.
"""
import copy
import json
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                   OfflineModeIsEnabled)
from torch import nn

from ..errors import InputError, JointRDError
from ..io import CheckpointError, input_channels, with_reading
from ..models.torchvision_models import (is_torchvision_folder, load_torchvision_folder, save_torchvision_model,
                                         torchvision_name)
from ..twins.fade import deployable

__all__ = ['save_trained_model', 'load_model', 'model_card', 'push_model', 'model_label_names']


def _tensors(model: nn.Module) -> tuple:
    return (*model.parameters(), *model.buffers())


def save_trained_model(model: nn.Module, folder, metrics: Optional[Dict] = None, model_card: Optional[str] = None,
                       tag: Optional[str] = None, data_cfg: Optional[Dict] = None,
                       label_names: Optional[Sequence[str]] = None) -> Path:
    """Write ``model`` to ``folder`` in timm's Hub format (never pickle); a torchvision model built by name
    (:mod:`jointrd_timm.models.torchvision_models`) in the same files, its config.json naming it. Returns the
    folder. ``tag``: the pretrained tag the weights are published under (``arch.tag``), written into config.json's
    ``pretrained_cfg`` in place of the one the model was built with; ``data_cfg``: how its inputs were read
    (``mean``, ``std``, ``input_size``, ``crop_pct``, ``interpolation``), written there too, in place of its
    architecture's defaults; ``label_names``: the classes its outputs stand for, in order (the training data's class
    names), written as timm's ``label_names`` in place of the ones the model was built with (an empty list: its
    data names none, so any names it came with are dropped; None: left as they are)."""
    folder = Path(folder).expanduser().resolve()  # '.', 'run/..': the folder's real name
    _check_replaceable(folder)
    _check_labelled(model)
    trained, model = model, deployable(model)  # a copy with the shortcut fade finished and Dirac folded: plain convs
    if any(not t.is_contiguous() for t in _tensors(model)):
        # e.g. trained in channels_last: safetensors stores contiguous tensors only (same values); the caller's
        # model keeps its layout
        if model is trained:
            model = copy.deepcopy(trained)
        for t in _tensors(model):
            t.data = t.data.contiguous()
    tmp = folder.with_name(f'.{folder.name}.tmp')
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if torchvision_name((getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or '') is not None:
            _save_torchvision(model, tmp, tag, data_cfg, label_names)
        else:
            _save_timm(model, tmp, tag, data_cfg, label_names)
        return _finish_save(tmp, folder, metrics, model_card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left beside the folder
        raise


def _save_timm(model: nn.Module, tmp: Path, tag: Optional[str], data_cfg: Optional[Dict],
               label_names: Optional[Sequence[str]]) -> None:
    """A timm model (deployable) into ``tmp`` in timm's Hub format, the reading and labels written into config.json."""
    from timm.models import save_for_hf
    model_args = dict(getattr(model, 'pretrained_model_args', None) or {})
    for folded in ('dirac', 'shortcut_fade'):
        if folded in model_args:
            model_args[folded] = False
    # the start of a parametrisation that is folded builds nothing now (and plain_<arch> refuses it without dirac);
    # timm's save_for_hf reads the factory's record of the arguments too
    model_args.pop('dirac_init', None)
    if not hasattr(model, 'num_classes'):
        raise InputError(f'{type(model).__name__} has no classifier (num_classes; a features_only feature '
                         "extractor?): timm's Hub format saves a classifier model. Save the model it was built from "
                         '(its state_dict holds the same backbone weights). A torchvision model saves when built by '
                         "name: create_torchvision_model('plain_torchvision:<name>') (jointrd_timm.models."
                         'torchvision_models), then its weights loaded.')
    model_args['num_classes'] = getattr(model, 'num_classes', None)
    in_chans = model.pretrained_cfg.get('input_size', (3,))[0] if hasattr(model, 'pretrained_cfg') else 3
    channels = input_channels(model)
    if channels is not None and channels != in_chans:
        model_args['in_chans'] = channels
    save_for_hf(model, str(tmp), model_args={k: v for k, v in model_args.items() if v is not None},
                safe_serialization=True)
    if tag is not None or data_cfg or label_names is not None:
        config = json.loads((tmp / 'config.json').read_text())
        # the run's reading of its images replaces the architecture's, test-time size included
        cfg = config['pretrained_cfg'] = with_reading(config.get('pretrained_cfg', {}), data_cfg)
        if tag is not None:
            cfg['tag'] = tag
        if label_names is not None:
            _write_label_names(config, list(label_names), model_args['num_classes'])
        (tmp / 'config.json').write_text(json.dumps(config, indent=2) + '\n')


def _finish_save(tmp: Path, folder: Path, metrics: Optional[Dict], model_card: Optional[str]) -> Path:
    """The metrics and the card beside the weights in ``tmp``, then ``tmp`` moved into place as ``folder``."""
    if metrics:
        (tmp / 'metrics.json').write_text(json.dumps(metrics, indent=1))
    if model_card:
        (tmp / 'README.md').write_text(model_card)
    _replace_folder(tmp, folder)
    return folder


def _save_torchvision(model: nn.Module, tmp: Path, tag: Optional[str], data_cfg: Optional[Dict],
                      label_names: Optional[Sequence[str]]) -> None:
    """A torchvision model (or twin) of :mod:`jointrd_timm.models.torchvision_models` in its own format: the
    same files, a config.json that names it for :func:`load_model`, the reading and labels as for a timm model."""
    cfg = with_reading(model.pretrained_cfg, data_cfg)
    if tag is not None:
        cfg['tag'] = tag
    config = dict(pretrained_cfg=cfg)
    if label_names is not None:
        _write_label_names(config, list(label_names), model.num_classes)
    save_torchvision_model(model, tmp, config)


def _write_label_names(config: Dict, names: List[str], num_classes: int) -> None:
    """``names`` as timm's ``label_names`` of ``config`` (config.json's root, which timm reads into pretrained_cfg),
    in place of any the model came with (a teacher's, for other classes); a list where they name every output, else
    ``{index: name}`` (timm's form for outputs without a name)."""
    for key in ('label_names', 'label_descriptions'):
        config.pop(key, None)
        config['pretrained_cfg'].pop(key, None)
    if names:
        if len(names) > num_classes:
            raise InputError(f'{len(names)} class names for a model with {num_classes} outputs: the names must be '
                             'those of its outputs, in order.')
        config['label_names'] = names if len(names) == num_classes else {str(i): n for i, n in enumerate(names)}


def model_label_names(model: nn.Module) -> Optional[Dict[int, str]]:
    """The classes ``model``'s outputs stand for, as config.json's timm ``label_names`` said them (a list, or
    ``{index: name}``), by output index; None where its config names none."""
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')
    if isinstance(names, dict):
        return {int(i): str(n) for i, n in names.items()}
    if isinstance(names, (list, tuple)) and names:
        return {i: str(n) for i, n in enumerate(names)}
    return None


def _check_labelled(model: nn.Module) -> None:
    """Refuse a twin made in place (make_plain / make_fading on an instance) whose config would name the residual
    architecture: a reload would build the residual net and miss the twin's keys."""
    from ..twins import PlainReport
    from ..twins.derive import TWIN_PREFIX
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if isinstance(getattr(model, 'plain_report', None), PlainReport) and isinstance(arch, str) \
            and not arch.startswith(TWIN_PREFIX):
        if torchvision_name(arch) is not None:
            raise InputError(f'this model is the shortcut-free twin of {arch} (made in place by make_plain or '
                             f'make_fading), and its config would name the residual {arch}. Build the twin as '
                             f'create_torchvision_model("{TWIN_PREFIX}{arch}") (jointrd_timm.models.'
                             'torchvision_models; in a YAML, that model_name) and load its weights into it.')
        raise InputError(f'this model is the shortcut-free twin of {arch} (made in place by make_plain or '
                         f'make_fading), and timm knows no {TWIN_PREFIX}{arch} to rebuild it from config.json: a '
                         f'reload would build the residual {arch}. Save its state_dict with safetensors instead, or '
                         f'build the twin as timm.create_model("{TWIN_PREFIX}{arch}") where it derives.')


# what save_trained_model writes: a folder holding only these is a saved model, which a new save replaces
SAVED_FILES = frozenset({'config.json', 'model.safetensors', 'metrics.json', 'README.md'})


def _check_replaceable(folder: Path) -> None:
    """Refuse to write a model over a file, or over a folder holding anything but a saved model (a run, a
    dataset, the user's notes): the save replaces the whole folder."""
    if folder.is_file():
        raise InputError(f'{folder} is a file: give a folder to save the model into.')
    others = sorted(p.name for p in folder.iterdir() if p.name not in SAVED_FILES) if folder.is_dir() else []
    if others:
        raise InputError(f'{folder} holds other files ({", ".join(others[:5])}{", ..." if len(others) > 5 else ""}): '
                         'saving replaces the whole folder, so give a new or empty folder (or one holding only a '
                         'saved model).')


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Swap a fully written folder into place: the old one renamed aside, the new one renamed in (each rename is
    atomic), the old one removed after. A save stopped between the two renames left the old folder aside and none
    in place: it is put back first, never deleted as a leftover."""
    old = folder.with_name(f'.{folder.name}.old')
    if old.exists() and not folder.exists():
        old.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def _check_folder(folder: Path) -> None:
    """A Hub-format folder we load: config.json + a readable model.safetensors (pickles are refused)."""
    from ..io import PICKLE_SUFFIXES, read_state_dict
    if not (folder / 'config.json').is_file():
        raise FileNotFoundError(f'{folder} holds no config.json: not a Hub-format folder (nor a runner output folder '
                                'with model/).')
    if not (folder / 'model.safetensors').is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        raise FileNotFoundError(f'{folder} has no model.safetensors' + (
            f'; its {pickles} are pickle files, which jointrd_timm refuses to load (they can run arbitrary code).'
            if pickles else '.'))
    read_state_dict(folder / 'model.safetensors')  # truncated / corrupt files fail here with a clear message


_SOURCE_PREFIXES = ('hf-hub', 'local-dir')  # timm's sources; it also reads hf_hub: and any case


def _model_folder(path: Path) -> Path:
    """The Hub-format folder of a folder given as a model: a runner output folder's ``model/``, else itself."""
    return path / 'model' if (path / 'model' / 'config.json').is_file() else path


def _local_path(spec: str) -> Path:
    """The path a model spec names: ``local-dir:<path>``'s path, else the spec itself as a path (which may not
    exist: a model name, a Hub id)."""
    return Path(spec.split(':', 1)[1] if spec.lower().startswith('local-dir:') else spec).expanduser()


# what fetching from the Hub raises, through timm unchanged: offline (or unreachable) and not in the cache is a
# LocalEntryNotFoundError, an EntryNotFoundError; unknown, gated and private repositories are HfHubHTTPErrors
HUB_DOWNLOAD_ERRORS = (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled)


def hub_repo(spec: str) -> Tuple[str, Optional[str]]:
    """``hf-hub:org/name[@revision]`` -> ``('org/name', revision or None)``, as timm splits it."""
    repo, _, revision = spec[len('hf-hub:'):].partition('@')
    return repo, revision or None


def missing_weights_message(spec: str, error: Exception, role: str = 'model') -> str:
    """What a user reads when the files of a model (``role``: the teacher of ``jointrd distill``; 'model' for the
    commands that load any model, eval / save / export) cannot be fetched from the Hub: which repository and files
    were looked for, where, and the ways to provide them."""
    import timm
    from huggingface_hub import constants
    revision = None
    if spec.startswith('hf-hub:'):
        (repo, revision), files = hub_repo(spec), 'config.json model.safetensors'
    else:  # a timm tag: timm reads model.safetensors (else pytorch_model.bin) of the tag's hf_hub_id
        cfg = timm.get_pretrained_cfg(spec)
        repo, files = cfg.hf_hub_id, cfg.hf_hub_filename or 'model.safetensors'
    at = f' --revision {revision}' if revision else ''
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = (f'they are not in the Hugging Face cache {constants.HF_HUB_CACHE}, and '
               + ('HF_HUB_OFFLINE is set' if constants.HF_HUB_OFFLINE else 'the Hub could not be reached'))
    else:
        why = f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'
    folder = ('as TEACHER: `jointrd distill DIR --data ...`; or (3) give a run of ours (a runner output folder with '
              'model/, or a Hub-format folder written by `jointrd save`) as TEACHER.' if role == 'teacher' else
              f'in place of {spec} (the same command with DIR).')
    return (
        f'The weights of {role} {spec} are not available: looked for {files} of the Hub repository {repo}'
        + (f' at revision {revision}' if revision else '') + f', and {why}. Nothing was written. Provide them, then '
        f'run the same command again: (1) on a connected machine, `hf download {repo} {files}{at}` (huggingface_hub\'s '
        'CLI) fills its cache (HF_HOME, default ~/.cache/huggingface): copy that cache here, point HF_HOME (or '
        f'HF_HUB_CACHE) at it and set HF_HUB_OFFLINE=1; or (2) `hf download {repo}{at} --local-dir DIR` and give '
        f'that Hub-format folder (config.json + model.safetensors) {folder}')


def load_model(spec: str, require_weights: bool = False, **kwargs) -> nn.Module:
    """A model from wherever a user has one: a timm / plain_* name (``name.tag`` loads that tag's weights),
    ``hf-hub:org/name``, ``local-dir:path``, a Hub-format folder, or a runner output folder (its ``model/``).
    ``num_classes`` different from the weights' drops the classifier, as timm does. ``require_weights``: refuse a
    bare architecture name (randomly initialised weights), for commands whose output would then mean nothing."""
    import timm
    import jointrd_timm  # noqa: F401  (plain_* names)
    from ..models.plain_twins import name_problem
    prefix = spec.split(':', 1)[0].lower() if ':' in spec else None
    prefix = 'hf-hub' if prefix == 'hf_hub' else prefix
    source = prefix in _SOURCE_PREFIXES
    path = _local_path(spec)
    if path.is_file():
        raise InputError(f'{spec!r} is a file: give the folder that holds a model (config.json and '
                         'model.safetensors, as `jointrd save` writes it), or a runner output folder.')
    looks_like_path = prefix == 'local-dir' or (
        not source and ('/' in spec or '\\' in spec or spec.startswith(('.', '~'))))
    if looks_like_path and not path.is_dir():
        raise InputError(f'No folder {str(path)!r}: give a runner output folder, a Hub-format folder, a model name '
                         '(name.tag) or hf-hub:org/name.')
    if path.is_dir():
        folder = _model_folder(path)
        _check_folder(folder)
        if is_torchvision_folder(folder):
            return load_torchvision_folder(folder, kwargs.get('num_classes'))
        spec, source = f'local-dir:{folder}', True
    pretrained = source or '.' in spec
    problem = None if source else name_problem(spec)
    if problem:
        raise InputError(problem + (' Nor is it a folder here.' if problem.startswith('Unknown model') else ''))
    if pretrained and not source and not timm.list_pretrained(spec):
        from ..models.catalogue import register_timm_tags
        register_timm_tags()  # an architecture registered after import: its registry entries, if any
        if not timm.list_pretrained(spec):
            base, tag = spec.split('.', 1)
            tags = [t.split('.', 1)[1] for t in timm.list_pretrained(f'{base}.*')]
            raise InputError(f'{base} has no pretrained tag {tag!r}; its tags: {", ".join(tags) or "none"} (or give '
                             'a folder, hf-hub:org/name, local-dir:path).')
    if prefix == 'hf-hub':
        torchvision_folder = _hub_torchvision_folder(spec)
        if torchvision_folder is not None:
            return load_torchvision_folder(torchvision_folder, kwargs.get('num_classes'))
    if require_weights and not pretrained:
        raise InputError(f'{spec!r} names an architecture without weights: its result would be that of a randomly '
                         'initialised model. Give trained weights (a runner output folder, a Hub-format folder, '
                         'name.tag, hf-hub:org/name), or --random-weights to use random weights on purpose.')
    try:
        return timm.create_model(spec, pretrained=pretrained, **kwargs)
    except HUB_DOWNLOAD_ERRORS as e:  # an hf-hub: id or a tag whose files are neither cached nor reachable
        if not pretrained or spec.startswith('local-dir:'):
            raise
        raise InputError(missing_weights_message(spec, e)) from e
    except RuntimeError as e:
        if 'state_dict' in str(e) or 'size mismatch' in str(e):
            raise CheckpointError(f'The weights of {spec} do not fit the architecture its config names: {str(e)[:300]}') from e
        raise


def _hub_torchvision_folder(spec: str) -> Optional[Path]:
    """The local snapshot of an ``hf-hub:`` repo holding a torchvision model saved by jointrd_timm (its config.json
    says ``library: torchvision``), its weights fetched through huggingface_hub's cache; None for any other repo
    (timm then loads it, or says why not)."""
    from huggingface_hub import hf_hub_download
    repo, revision = hub_repo(spec)
    try:
        config = Path(hf_hub_download(repo, 'config.json', revision=revision))
    except HUB_DOWNLOAD_ERRORS:
        return None  # timm's own load says what is missing
    if not is_torchvision_folder(config.parent):
        return None
    try:
        hf_hub_download(repo, 'model.safetensors', revision=revision)
    except HUB_DOWNLOAD_ERRORS as e:
        raise InputError(missing_weights_message(spec, e)) from e
    return config.parent


def saved_beside(spec: str) -> Dict:
    """The model card and metrics saved with a model given as a folder (a Hub-format folder, a runner output folder,
    ``local-dir:``), as :func:`save_trained_model` keywords: saving or pushing it again keeps them. Empty for a name or
    a Hub id."""
    path = _local_path(spec)
    if not path.is_dir():
        return {}
    folder = _model_folder(path)
    found = {}
    if (folder / 'README.md').is_file():
        found['model_card'] = (folder / 'README.md').read_text()
    if (folder / 'metrics.json').is_file():
        found['metrics'] = json.loads((folder / 'metrics.json').read_text())
    return found


def model_card(entry: Dict) -> str:
    """README.md for the Hub, from a registry entry (method, data, recipe, measured results). Without
    ``hf_hub_id`` the card says how to load the model from ``local_dir``."""
    metrics = entry['metrics']
    torchvision = torchvision_name(entry['architecture']) is not None  # loaded by load_model, not timm
    # the data it was measured on: hf_dataset, else the entry's eval dataset (no CIFAR-10 default for other data)
    dataset = entry.get('hf_dataset') or (entry.get('eval') or {}).get('dataset')
    training = entry['training']
    lines = [
        '---', f'library_name: {"pytorch" if torchvision else "timm"}',
        *([f'license: {entry["license"]}'] if entry.get('license') else []),
        f'tags: [image-classification, {"torchvision" if torchvision else "timm"}, jointrd-timm, '
        'residual-distillation]',
        *([f'datasets: [{dataset}]'] if dataset else []), '---', '',
        f'# {entry["name"]}', '',
        f'{entry.get("description", "")}', '',
        f'- **Architecture**: `{entry["architecture"]}` ' + (
            '(torchvision, built by jointrd_timm.models.torchvision_models)' if torchvision else
            '(timm, registered by `import jointrd_timm`)'),
        f'- **Method**: {entry["method"]}',
        *([f'- **Teacher**: `{entry["teacher"]}`'] if entry.get('teacher') else []),
        f'- **Data**: {entry["dataset"]}',
        f'- **Training**: {training.get("budget", "")}'
        + (f'; command `{training["command"]}`' if training.get('command') else '')
        + (f'; config `{training["yaml"]}`' if training.get('yaml') else ''),
        '', f'## {entry.get("results_title", "Results (measured, recorded in the jointrd-timm repository)")}', '',
        '| metric | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in metrics.items() if not isinstance(v, (dict, list))]
    lines += [line for warning in entry.get('warnings') or () for line in ('', f'**Warning:** {warning}')]
    # a published twin loads from the Hub; one not (yet) pushed, e.g. from `jointrd distill`, from its folder
    source = f'hf-hub:{entry["hf_hub_id"]}' if entry.get('hf_hub_id') else f'local-dir:{entry["local_dir"]}'
    load = ['from jointrd_timm.integrations.hub import load_model', f"model = load_model('{source}')"] if torchvision \
        else ['import timm, jointrd_timm', f"model = timm.create_model('{source}', pretrained=True)"]
    lines += ['', '## Use', '', '```python', *load, '```', '',
              f'Evaluate: `jointrd eval {source} --dataset {dataset or "PATH_TO_TEST_DATA"}'
              + (f' {entry["eval_args"]}' if entry.get('eval_args') else '') + '`.', '']
    lines += _timm_validate_lines(source, dataset, entry.get('eval') or {}) if dataset and not torchvision else []
    return '\n'.join(lines)


def _timm_validate_lines(source: str, dataset: str, evaluation: Dict) -> list:
    """How timm's own validate.py gives the top-1, through ``python -m jointrd_timm.timm_script`` (timm does not
    know plain_* models otherwise); it preprocesses as the model's config.json says (``save_trained_model``'s
    ``data_cfg``). ``evaluation``: the entry's ``eval`` (split, image_column, label_column, and ``validate_args``:
    False when validate.py cannot reproduce the evaluation, e.g. on images read in grey). Nothing either for data
    that timm's ``hfds/`` reader (``datasets.load_dataset``) cannot read, such as the embedded digits."""
    if dataset.startswith('sklearn:') or evaluation.get('validate_args') is False:
        return []
    args = f'--split {evaluation.get("split", "test")} --input-key {evaluation.get("image_column", "img")}'
    if evaluation.get('label_column', 'label') != 'label':
        args += f' --target-key {evaluation["label_column"]}'
    return ["Top-1 with timm's own `validate.py`, unchanged (from a checkout of "
            '[pytorch-image-models](https://github.com/huggingface/pytorch-image-models) at your timm version; '
            '`jointrd_timm.timm_script` registers this model in timm, then runs the script):', '',
            '```bash',
            f'python -m jointrd_timm.timm_script path/to/pytorch-image-models/validate.py --model {source} '
            f'--pretrained --dataset hfds/{dataset} {args}',
            '```', '',
            "validate.py preprocesses as this model's `pretrained_cfg` (config.json) says: input size, crop, mean / "
            'std, those of the evaluation above. Add `--device cpu` without a GPU, `--data-dir DIR` for the datasets '
            'cache.', '']


def push_model(model: nn.Module, repo_id: str, card: Optional[str] = None, private: bool = False,
               revision: Optional[str] = None, token: Optional[str] = None, commit_message: str = 'Add model',
               tag: Optional[str] = None, metrics: Optional[Dict] = None):
    """Upload ``model`` in timm's Hub format (safetensors only, never pickle) with ``card`` as README.md (``tag``,
    ``metrics``: as in :func:`save_trained_model`). The token comes from the usual Hugging Face places (HF_TOKEN,
    ``hf auth login``) unless given."""
    import tempfile
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise InputError(f'Repo id {repo_id!r}: {e} Give ORG/NAME (or NAME, in your own namespace).') from None
    api = HfApi(token=token, library_name='jointrd-timm')
    with tempfile.TemporaryDirectory() as tmp:
        # written before any network call
        folder = save_trained_model(model, Path(tmp) / 'model', metrics, card, tag)
        try:
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
            if card:  # the repo's full id is known now (NAME alone: in the token's namespace)
                (folder / 'README.md').write_text(card_for_hub(card, repo_id, revision))
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                     commit_message=commit_message)
        except (HfHubHTTPError, OSError) + _transport_errors() as e:  # OfflineModeIsEnabled is a ConnectionError
            detail = ' '.join(str(e).split())[:300].rstrip('.')
            raise PushError(f'Could not push to {repo_id}: {type(e).__name__}: {detail}. '
                            'Check the network (and that HF_HUB_OFFLINE is not set), your token (HF_TOKEN or `hf '
                            'auth login`) and your write access to the repo.') from e


def card_with_source(card: str, source: str) -> str:
    """``card`` with the model's own source (the ``local-dir:PATH`` its ``create_model`` or ``load_model`` line loads)
    replaced by
    ``source`` wherever its commands name it: the card of a folder saved or pushed elsewhere. A teacher given as a
    folder keeps its own."""
    # the path exactly, spaces too: a timm model's create_model line, a torchvision model's load_model line
    used = re.search(r"create_model\('(local-dir:.+?)', pretrained=True\)", card) or \
        re.search(r"load_model\('(local-dir:.+?)'\)", card)
    if not used:
        return card
    # the whole path only: a teacher's folder whose path starts with the model's (/x/model-v0 beside /x/model) stays
    return re.sub(re.escape(used.group(1)) + r"(?=['`\"\s]|$)", lambda _: source, card, flags=re.MULTILINE)


def card_for_hub(card: str, repo_id: str, revision: Optional[str] = None) -> str:
    """A model card written for a local folder (``jointrd distill``'s: its commands load ``local-dir:PATH``) as
    the Hub copy's: loaded from ``hf-hub:repo_id`` (``@revision`` when pushed to one); a local folder named as the
    front matter's dataset is left out there (the Hub reads ``datasets:`` as Hub dataset ids), the commands keep it
    as the data the model was measured on."""
    card = card_with_source(card, f'hf-hub:{repo_id}' + (f'@{revision}' if revision else ''))
    if not card.startswith('---\n'):
        return card
    head, sep, body = card[4:].partition('\n---\n')
    kept = [line for line in head.split('\n') if not (line.startswith('datasets: [') and _is_local_path(line[11:-1]))]
    return '---\n' + '\n'.join(kept) + sep + body


def _is_local_path(name: str) -> bool:
    return name.startswith(('/', '.', '~', '\\')) or bool(re.match(r'^[A-Za-z]:[\\/]', name))


class PushError(JointRDError, RuntimeError):
    """The Hub refused an upload or could not be reached."""


def _transport_errors() -> tuple:
    """The HTTP client's own errors, which huggingface_hub lets through unwrapped (a refused connection, no DNS):
    httpx's (``httpx2`` in the huggingface_hub releases that vendor it) or requests'."""
    import importlib
    found = []
    for module, name in (('httpx', 'HTTPError'), ('httpx2', 'HTTPError'), ('requests', 'RequestException')):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)
