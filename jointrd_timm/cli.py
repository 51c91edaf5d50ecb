"""The ``jointrd`` command: thin, every subcommand calls the library."""
import argparse
import contextlib
import json
import math
import sys
import warnings
from pathlib import Path

from .errors import InputError, JointRDError


def _architecture(name: str) -> str:
    """The residual architecture that ``name`` names: a timm one (``arch``, ``plain_<arch>``, either with a pretrained
    tag) or a torchvision one (``[plain_]torchvision:<name>``, with or without a weights name: these commands build it
    with random weights), refused as an :class:`InputError` when neither library knows it or it has no twin (the
    reason said)."""
    import jointrd_timm  # noqa: F401
    from .models.plain_twins import name_problem, residual_arch, twin_refusal
    from .models.torchvision_models import TORCHVISION_PREFIX, torchvision_name, torchvision_weights
    base, _, weights = name.partition('.')
    torchvision = torchvision_name(base)
    if torchvision is not None:
        arch = TORCHVISION_PREFIX + torchvision
        why = twin_refusal(arch)  # an unknown name too, with the close ones
        if not why and weights:
            try:
                torchvision_weights(torchvision, weights)  # the name only: these commands use random weights
            except ValueError as e:
                why = str(e)
        if why:
            raise InputError(f'{name}: {why}' if name not in why else why)
        return arch
    why = name_problem(name, need_twin=True)
    if why and Path(name).expanduser().exists():  # a saved model or a run folder: these commands build by name
        raise InputError(f'{name} is a folder or file; this command takes a timm architecture name (e.g. resnet50 '
                         'or plain_resnet50) or a torchvision one (torchvision:resnet50) and builds it. For a saved '
                         f'model: jointrd export {name} (folded model, exports), jointrd eval {name} --dataset ... '
                         '(accuracy).')
    if why:
        raise InputError(why)
    return residual_arch(name)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a size, a count of epochs or images)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    return value


def _tolerance(text: str) -> float:
    """argparse type: a finite number >= 0 (an error bound: NaN would let every comparison pass)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f'must be a finite number >= 0, got {text}')
    return value


def _derive(args) -> int:
    from .models.torchvision_models import create_named_model
    from .twins.summary import describe_twin, list_twins
    if args.list:
        print('\n'.join(list_twins()))
        return 0
    if not args.model:
        print('jointrd derive: give a MODEL (e.g. resnet50) or --list', file=sys.stderr)
        return 2
    with _runs_at(args.model, args.input_size):
        text = describe_twin(_architecture(args.model), keep_projection_shortcuts=args.keep_projection_shortcuts,
                             input_size=args.input_size, build=create_named_model)
    print(text)
    return 0


@contextlib.contextmanager
def _runs_at(model: str, input_size):
    """A model that does not run at the input size asked for (too small for its strides, not the size an attention
    layer was built for) is the user's input to change: one line saying so, not a traceback from inside the model."""
    try:
        yield
    except (RuntimeError, AssertionError, ValueError) as e:
        if isinstance(e, JointRDError) or 'out of memory' in str(e):
            raise
        size = f'a {input_size}x{input_size} input' if input_size else 'its configured input size'
        detail = ' '.join(str(e).split())[:200]
        raise InputError(f'{model} does not run on {size} ({type(e).__name__}{": " + detail if detail else ""}). '
                         'Give an --input-size it takes (e.g. its pretrained size, or a multiple of its total '
                         'stride).') from e


def _train(args) -> int:
    from .training.runner import load_config, train
    overrides = list(args.overrides) + ([f'runner.compile={args.compile}'] if args.compile else [])
    config = load_config(args.config, overrides)
    train(config, output_dir=args.output_dir, resume=args.resume, device=args.device, overwrite=args.overwrite)
    return 0


def _convert(args) -> int:
    from .training.checkpoint import convert_checkpoint
    from safetensors import safe_open
    path = convert_checkpoint(args.source, args.output, entry=args.entry)
    with safe_open(str(path), 'pt') as f:  # its metadata only: which entry was written
        entry = (f.metadata() or {}).get('entry')
    what = f'its {entry!r} entry' if entry else 'the file itself, a bare state dict'
    print(f'wrote {path} (the weights of {args.source}: {what}; read with torch.load(weights_only=True))')
    return 0


def _demo(args) -> int:
    from .training.demo import run_demo
    run_demo(dataset=args.dataset, output_dir=args.output_dir, epochs=args.epochs, device=args.device,
             recipe=args.recipe, limit=args.limit)
    return 0


def _export_name(spec: str) -> str:
    """The exported files' stem for a model spec: a folder's own name (also for '.' or './'), else the name's last
    part ('hf-hub:org/name' -> 'name')."""
    path = Path(spec[len('local-dir:'):] if spec.startswith('local-dir:') else spec).expanduser()
    name = path.resolve().name if path.is_dir() else Path(spec.rstrip('/')).name.replace(':', '_')
    return name or 'model'


def _export(args) -> int:
    from .deploy.export import export_model
    from .integrations.hub import load_model
    model = load_model(args.model, require_weights=not args.random_weights)
    name = args.name or _export_name(args.model)
    report = export_model(model, args.output_dir, name, input_size=args.input_size, atol=args.atol)
    print(json.dumps({'fold': report['fold'], **{k: v for k, v in report['files'].items()}}, indent=1))
    return 0


def _exact(args) -> int:
    from .deploy.exact import exact_conversion_report, exact_plain
    from .deploy.export import export_model
    from .integrations.hub import load_model
    model = load_model(args.model, require_weights=not args.random_weights)
    plain = exact_plain(model)
    report = exact_conversion_report(model, plain, input_size=args.input_size)
    name = args.name or _export_name(args.model) + '_exact'
    exported = export_model(plain, args.output_dir, name, formats=tuple(args.formats), input_size=args.input_size,
                            atol=args.atol)
    print(json.dumps(dict(report, files=exported['files']), indent=1))
    return 0


def _memory(args) -> int:
    import torch
    from .deploy.bench import model_input_size
    from .deploy.fold import fold_for_deployment
    from .deploy.memory import analyze_activation_memory
    from .models.torchvision_models import create_named_model
    teacher = _architecture(args.model)
    built = {name: create_named_model(name) for name in (teacher, f'plain_{teacher}')}
    size = args.input_size or model_input_size(built[teacher])
    x = torch.randn(args.batch, 3, size, size)
    rows = {}
    for name, model in built.items():
        with _runs_at(teacher, size), torch.no_grad():
            model.eval()(x)  # a model that does not take x fails here, before torch.fx's shape pass prints its trace
        rows[name] = analyze_activation_memory(fold_for_deployment(model)[0] if args.fold else model, x)
    print(f'activation memory of one inference, batch {args.batch}, {size}x{size}, '
          f'{"folded" if args.fold else "eager"} model (tensors freed as soon as dead):')
    for name, r in rows.items():
        print(f'  {name}: peak {r.peak_bytes / 2**20:.2f} MB, held only by shortcuts at the peak '
              f'{r.shortcut_only_bytes_at_peak / 2**20:.2f} MB ({100 * r.shortcut_share:.0f} %), '
              f'{r.shortcut_additions} shortcut additions'
              + (f'; {r.layers_kept_whole} layers on timm\'s no-trace list kept whole (torch.fx cannot trace the '
                 'model through them), their internal tensors not counted: the peak is a lower bound'
                 if r.layers_kept_whole else ''))
    a, b = rows.values()
    print(f'  ratio residual / twin: {a.peak_bytes / b.peak_bytes:.2f}x')
    return 0


def _bench(args) -> int:
    from .deploy.bench import markdown, run_bench
    from .io import atomic_write, file_in_the_way
    if args.output:  # before the benchmark, not after its minutes
        blocker = file_in_the_way(Path(args.output).parent)
        if blocker is not None:
            raise InputError(f'--output {args.output}: {blocker} is a file, not a folder, so {args.output}.json and '
                             '.md cannot be written there; choose another --output.')
    with _runs_at(', '.join(args.models) or 'the benchmark set', args.input_size):
        report = run_bench([_architecture(m) for m in args.models] or None, tuple(args.batches), args.repeats,
                           args.threads, onnx=not args.no_onnx, measure_memory=not args.no_measure,
                           input_size=args.input_size)
    text = markdown(report)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out.with_suffix('.json'), lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
        atomic_write(out.with_suffix('.md'), lambda tmp: Path(tmp).write_text(text + '\n'))
    return 0


def _published_as(args, model) -> dict:
    """``save_trained_model`` / ``push_model`` keywords from ``--entry``: the entry's model card and its tag (written
    into config.json); none without --entry. The entry must describe ``model``: its architecture and classes."""
    if not args.entry:
        return {}
    from .integrations.hub import model_card
    from .models.catalogue import entry
    try:
        published = entry(args.entry)
    except KeyError as e:  # a name that is not in the registry (the message lists those that are)
        raise InputError(e.args[0]) from e
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    classes = getattr(model, 'num_classes', None)
    for what, theirs, ours in (('architecture', published['architecture'], arch),
                               ('number of classes', published.get('num_classes'), classes)):
        if theirs is not None and ours is not None and theirs != ours:
            raise InputError(f'--entry {args.entry}: the entry publishes {what} {theirs}, but {args.source} holds '
                             f'{ours}; its card would describe another model. Save it without --entry, or name an '
                             'entry of its own (registry/).')
    return dict(model_card=model_card(published), tag=published['tag'])


def _save(args) -> int:
    from .integrations.hub import card_with_source, load_model, save_trained_model, saved_beside
    model = load_model(args.source, require_weights=not args.random_weights)  # random weights: on purpose only
    # the card and metrics saved with the source travel with it, its commands loading the new folder; --entry's card
    # replaces its card
    beside = saved_beside(args.source)
    if 'model_card' in beside:
        where = Path(args.output_dir).expanduser().resolve()
        beside['model_card'] = card_with_source(beside['model_card'], f'local-dir:{where}')
    folder = save_trained_model(model, args.output_dir, **dict(beside, **_published_as(args, model)))
    print(f'wrote {folder} ({", ".join(sorted(p.name for p in Path(folder).iterdir()))})')
    return 0


def _push(args) -> int:
    from .integrations.hub import load_model, push_model, saved_beside
    model = load_model(args.source, require_weights=not args.random_weights)
    published = dict(saved_beside(args.source), **_published_as(args, model))
    info = push_model(model, args.repo_id, published.get('model_card'), private=args.private,
                      revision=args.revision, tag=published.get('tag'), metrics=published.get('metrics'))
    print(f'pushed to {args.repo_id}: {info}')
    return 0


def _reading(args, model) -> dict:
    """How ``jointrd eval`` reads the images for ``model``: its own data config unless the options say otherwise."""
    import timm.data
    from .io import input_channels
    channels = input_channels(model)
    channels = channels if channels in (1, 3) else 3
    data_cfg = timm.data.resolve_data_config({}, model=model)  # its pretrained_cfg: size, crop, mean / std
    # the digits are grayscale 8x8: read as the model's channels (an RGB model gets them repeated, as distill does)
    if args.dataset == 'sklearn:digits':
        if args.transform not in (None, 'tensor'):
            raise InputError(f'sklearn:digits is read as tensors (8x8 grey images), not with --transform '
                             f'{args.transform}: leave --transform out.')
        kwargs = dict(transform='tensor', input_size=8, channels=channels)
    elif args.transform is None and len(data_cfg['mean']) == channels:
        # as the model's config.json says (a saved run's: how its test images were read), as timm's validate.py does
        if args.input_size:
            data_cfg['input_size'] = (channels, args.input_size, args.input_size)
        kwargs = dict(data_cfg=data_cfg, channels=channels)
    else:  # --transform given, or a grey model whose config has RGB statistics (grey: 0.5 / 0.5)
        kwargs = dict(transform=args.transform or 'cifar', channels=channels)
    for option in ('image_column', 'label_column') + (('input_size',) if 'data_cfg' not in kwargs else ()):
        if getattr(args, option):
            kwargs[option] = getattr(args, option)
    if args.test_fraction:
        kwargs.update(test_fraction=args.test_fraction, part='test')
    return kwargs


def _eval(args) -> int:
    from .integrations.hub import load_model
    from .training.data import class_agreement, evaluate_model
    model = load_model(args.model, require_weights=not args.random_weights)
    other = load_model(args.against, require_weights=not args.random_weights) if args.against else None
    # the test split; with --test-fraction, the test set jointrd distill carved from the train split
    split = args.split or ('train' if args.test_fraction else 'test')
    where = f'the {args.test_fraction:g} of {split} carved out as the test set' if args.test_fraction else split
    result = evaluate_model(model, args.dataset, split, predictions=other is not None, **_reading(args, model))
    if result.get('note'):
        print(f'note: {result["note"]}', file=sys.stderr)
    line = f'{args.model}: top-1 {result["top1"]:.2f} % on {result["samples"]} images ({args.dataset}, {where})'
    try:
        from .models.catalogue import entry
        recorded = entry(args.model)['metrics']['top1_test']
        line += f'; registry records {recorded:.2f} % (difference {result["top1"] - recorded:+.2f})'
    except KeyError:
        pass
    print(line)
    if other is not None:  # the same images, each read as that model reads them
        try:
            compared = evaluate_model(other, args.dataset, split, predictions=True, **_reading(args, other))
        except InputError as e:
            raise InputError(f'--against {args.against}: {e}') from e
        if compared.get('note'):
            print(f'note ({args.against}): {compared["note"]}', file=sys.stderr)
        if compared['samples'] != result['samples']:  # one split read twice: a dataset that changed in between
            raise InputError(f'{args.against} was evaluated on {compared["samples"]} images, {args.model} on '
                             f'{result["samples"]}: the dataset changed while it was read; run the command again.')
        same, note = class_agreement(model, result['predicted'], other, compared['predicted'])
        if note:
            print(f'note: {note}', file=sys.stderr)
        print(f'{args.against}: top-1 {compared["top1"]:.2f} % on the same images; the two give the same class on '
              f'{same:.2f} % of them')
    return 0


def _distill(args) -> int:
    from .training.distill import run_distill
    options = {k: v for k, v in vars(args).items() if k not in ('command', 'func', 'teacher', 'data')}
    run_distill(args.teacher, args.data, **options)
    return 0


class _DeprecatedAlias(argparse.Action):
    """Stores the value like ``store``; given under one of its ``deprecated`` names, it also warns (FutureWarning:
    shown to the user) with the current name."""

    def __init__(self, option_strings, dest, deprecated=(), **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.deprecated = deprecated

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated:
            warnings.warn(f'{parser.prog} {option_string} is deprecated: use {self.option_strings[0]}.',
                          FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of every subcommand that trains into an output folder (train; others that run the runner)."""
    p.add_argument('--output-dir', default=None, help='default: runner.output_dir of the YAML')
    runs = p.add_mutually_exclusive_group()
    runs.add_argument('--resume', action='store_true', help='continue the run in the output folder exactly, from '
                      'its last.safetensors')
    runs.add_argument('--overwrite', action='store_true', help='replace the run in the output folder (deleted only '
                      'once this run has saved its first epoch); without --resume or --overwrite a folder holding a '
                      'run is refused')
    p.add_argument('--device', choices=('cpu', 'cuda'), default=None, help='default: cuda if available')


def _add_export_arguments(p: argparse.ArgumentParser, formats: bool = False) -> None:
    """The arguments of the commands that write exported files (export, exact)."""
    p.add_argument('--output-dir', default='exports')
    p.add_argument('--name', default=None, help='file name stem (default: from the model)')
    p.add_argument('--input-size', type=_positive_int, default=None,
                   help='side of the example input (default: the model cfg)')
    if formats:
        p.add_argument('--formats', nargs='+', choices=('onnx', 'torchscript'), default=['onnx', 'torchscript'])
    p.add_argument('--atol', type=_tolerance, default=1e-3, help='max abs error allowed for an exported file')
    p.add_argument('--random-weights', action='store_true', help='allow a bare architecture name (random weights)')


def _add_columns(p: argparse.ArgumentParser) -> None:
    """The data's columns (distill, eval); not given: found in the data (training.data.find_columns)."""
    p.add_argument('--image-column', default=None,
                   help="the data's image column (default: its one column of images, datasets.Image)")
    p.add_argument('--label-column', default=None,
                   help="the data's label column (default: 'label', else its one ClassLabel column)")


def _add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument('--compile', nargs='?', const='inductor', default=None, metavar='BACKEND',
                   help='torch.compile the models (runner.compile; BACKEND default inductor): the twin\'s and '
                        "teacher's stem, stages and head, the methods' own code eager around them")


def _derive_parser(sub) -> None:
    p = sub.add_parser('derive', help="summary of a model's shortcut-free twin")
    p.add_argument('model', nargs='?', help='a timm architecture, e.g. resnet50, or a torchvision one, e.g. '
                   'torchvision:resnet50')
    p.add_argument('--list', action='store_true', help='list every architecture with a twin')
    p.add_argument('--keep-projection-shortcuts', action='store_true', help="the paper's plain-CNN variant")
    p.add_argument('--input-size', type=_positive_int, default=None,
                   help='input size for FLOPs (default: the model cfg)')
    p.set_defaults(func=_derive)


def _train_parser(sub) -> None:
    p = sub.add_parser('train', help='train from a torchdistill YAML with accelerate',
                       description='Train from a torchdistill YAML. A YAML is code: its !import_call tags import and '
                                   'call Python while it loads (that is how it builds datasets), so run only YAMLs '
                                   'you trust. Its keys and numbers are checked with a safe loader before the tags '
                                   'run.')
    p.add_argument('--config', required=True, help='torchdistill-format YAML (see yamls/); runs code: trusted only')
    p.add_argument('overrides', nargs='*', help='key.path=value overrides, e.g. train.num_epochs=1')
    add_run_arguments(p)
    _add_compile(p)
    p.set_defaults(func=_train)


def _convert_parser(sub) -> None:
    p = sub.add_parser('convert-checkpoint', help="a pickled checkpoint's weights (torchdistill's, timm train.py's) to "
                                                  'safetensors',
                       description='Reads a pickled checkpoint with torch.load(weights_only=True): tensors and plain '
                                   'containers only, no code is run; convert only files you trust all the same. The '
                                   'state dict under ENTRY (torchdistill: model, timm train.py: state_dict) is written '
                                   'as .safetensors, which every other command takes (jointrd distill ARCH '
                                   '--teacher-weights FILE).')
    p.add_argument('source', help='a .pt/.pth/.pth.tar checkpoint, e.g. one written by torchdistill\'s example script '
                                  "or timm's train.py")
    p.add_argument('output', help='the .safetensors file to write')
    p.add_argument('--entry', default=None,
                   help="the checkpoint's entry holding the state dict (default: model (torchdistill) or state_dict "
                        "(timm's train.py), whichever holds one; e.g. state_dict_ema for timm's weight average)")
    p.set_defaults(func=_convert)


def _demo_parser(sub) -> None:
    p = sub.add_parser('demo', help='teacher, twin alone, twin with JointRD on an embedded dataset; table + plot')
    p.add_argument('--dataset', default='sklearn:digits', help='any dataset the runner takes (default: sklearn:digits)')
    p.add_argument('--output-dir', default='runs/demo',
                   help='default: runs/demo; a rerun replaces its three runs (a new or empty folder, or one an '
                        'earlier demo wrote; any other is refused)')
    p.add_argument('--recipe', default='default',
                   help='twin recipe (jointrd_timm.recipes.RECIPES): default (start from the teacher, fade its '
                        'shortcuts out), dirac (Dirac-parametrised convs from scratch), reference (JointRD reference, '
                        'plain convs)')
    p.add_argument('--epochs', type=_positive_int, default=None,
                   help="epochs per run (default: the 'demo' schedule's, settings.SCHEDULES)")
    p.add_argument('--limit', type=_positive_int, default=None,
                   help='train images per run (a quick smoke run; default all)')
    p.add_argument('--device', choices=('cpu', 'cuda'), default=None)
    p.set_defaults(func=_demo)


def _distill_parser(sub) -> None:
    p = sub.add_parser('distill', help='a residual model -> its trained, deployed shortcut-free twin, in one command',
                       description='Train the shortcut-free twin of TEACHER with JointRD (the recommended recipe), '
                                   'evaluate both on the same test split, write the deployed twin (timm Hub format, '
                                   'model card), the YAML of the run and a side-by-side table and plot. See docs/cli.md.')
    p.add_argument('teacher', help='timm name with a pretrained tag (resnet50.a1_in1k), hf-hub:org/name, a Hub-format '
                                   'folder or a runner output folder, a torchvision model (torchvision:resnet50, '
                                   'torchvision:resnet50.IMAGENET1K_V2); a bare architecture (resnet20_cifar) has no '
                                   'weights: the teacher is then trained here first, from scratch')
    p.add_argument('--data', required=True, help='Hub id, local Hub-layout folder, image folder, or sklearn:digits')
    p.add_argument('--teacher-weights', default=None,
                   help='a .safetensors state dict of the bare architecture TEACHER names (a model trained elsewhere, '
                        "e.g. timm's train.py: `jointrd convert-checkpoint` writes one from its .pth.tar)")
    p.add_argument('--epochs', type=int, default=None, help='twin epochs (default: the schedule of the data\'s setting)')
    p.add_argument('--teacher-epochs', type=int, default=None,
                   help='epochs of a teacher trained or fine-tuned here (default: --epochs)')
    p.add_argument('--recipe', default=None, help='a recipe of jointrd_timm.recipes.RECIPES, optionally with fields '
                   "changed ('default,kd_weight=0.5,lr_scale=0.2'; default: the recommended one for the architecture)")
    p.add_argument('--output-dir', '--output', default='runs/distill', action=_DeprecatedAlias,
                   deprecated=('--output',), help='output folder (default: runs/distill; --output: its former name, '
                                                  'deprecated)')
    p.add_argument('--num-classes', type=int, default=None,
                   help="re-initialise a pretrained teacher's classifier for the data's labels (it is then "
                        'fine-tuned here with cross-entropy for --teacher-epochs)')
    _add_columns(p)
    p.add_argument('--train-split', default='train')
    p.add_argument('--test-split', default='test')
    p.add_argument('--val-fraction', type=float, default=0.0,
                   help='hold out this fraction of the train split for the per-epoch record (default: the test split)')
    p.add_argument('--test-fraction', type=float, default=0.0,
                   help='carve the test set from the train split (data without a test split, e.g. a folder of class '
                        'subfolders alone; default 0: read --test-split)')
    p.add_argument('--limit', type=int, default=None, help='train images (a quick run; default all)')
    p.add_argument('--transform', choices=('cifar', 'imagenet', 'tensor'), default=None,
                   help="default: tensor for sklearn:digits, cifar up to 64 px, imagenet above")
    p.add_argument('--input-size', type=int, default=None, help="default: 8 for sklearn:digits, else the teacher's")
    p.add_argument('--batch-size', type=int, default=None, help='global batch (default: the schedule\'s)')
    p.add_argument('--lr', type=float, default=None, help='default: the schedule\'s')
    p.add_argument('--workers', type=int, default=None, help='data loader workers')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--latency-repeats', type=int, default=30, help='interleaved timed runs per model and batch size')
    p.add_argument('--device', choices=('cpu', 'cuda'), default=None, help='default: cuda if available')
    p.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16'), default='no',
                   help="the runs' runner.mixed_precision (accelerate's; default: no)")
    p.add_argument('--channels-last', action='store_true',
                   help='train in channels_last memory format (runner.channels_last; often faster on GPUs)')
    _add_compile(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument('--resume', action='store_true', help='continue the run in --output-dir')
    group.add_argument('--overwrite', action='store_true', help="replace the run in --output-dir (distill's files only)")
    p.set_defaults(func=_distill)


def _export_parsers(sub) -> None:
    p = sub.add_parser('export', help='fold (BN, Dirac) and export to ONNX + TorchScript, checked against eager')
    p.add_argument('model', help='plain_* name[.tag], hf-hub:org/name, local-dir:path, or a runner output folder')
    _add_export_arguments(p)
    p.set_defaults(func=_export)

    p = sub.add_parser('exact', help='remove the shortcuts of a trained post-activation ResNet exactly (RM), export',
                       description='Convert the timm BasicBlock / Bottleneck blocks of MODEL into plain conv-ReLU '
                                   'chains with the same output (RM operation, docs/exact_conversion.md), report '
                                   'parameters, FLOPs and the max abs difference from the BN-folded model on a random '
                                   'input, and export the result (folded) like `jointrd export`.')
    p.add_argument('model', help='name[.tag], hf-hub:org/name, local-dir:path, or a runner output folder')
    _add_export_arguments(p, formats=True)
    p.set_defaults(func=_exact)


def _measure_parsers(sub) -> None:
    p = sub.add_parser('memory', help='activation memory of a model and its twin (analysed)')
    p.add_argument('model', help='a timm architecture (resnet50) or a torchvision one (torchvision:resnet50)')
    p.add_argument('--batch', type=_positive_int, default=1)
    p.add_argument('--input-size', type=_positive_int, default=None)
    p.add_argument('--no-fold', dest='fold', action='store_false', help='analyse the eager model, BN unfolded')
    p.set_defaults(func=_memory)

    p = sub.add_parser('bench', help='latency and memory of residual models vs twins, side by side')
    p.add_argument('models', nargs='*', help='residual architectures, timm or torchvision:<name> (default: the '
                   'deployment benchmark set)')
    p.add_argument('--batches', type=_positive_int, nargs='+', default=[1, 16])
    p.add_argument('--repeats', type=_positive_int, default=20)
    p.add_argument('--threads', type=_positive_int, default=2)
    p.add_argument('--no-onnx', action='store_true')
    p.add_argument('--no-measure', action='store_true', help='skip the measured (subprocess RSS) memory')
    p.add_argument('--input-size', type=_positive_int, default=None,
                   help="side of the square input (default: each model's pretrained config's)")
    p.add_argument('--output', default=None, help='write <output>.json and <output>.md')
    p.set_defaults(func=_bench)


def _publish_parsers(sub) -> None:
    for command, helptext in (('save', 'a trained model to a folder in timm\'s Hub format (safetensors + card)'),
                              ('push', 'a trained model to the Hugging Face Hub in timm\'s format')):
        p = sub.add_parser(command, help=helptext)
        p.add_argument('source', help='runner output folder, Hub-format folder, hf-hub:..., or model name.tag')
        p.add_argument('--random-weights', action='store_true',
                       help='allow a bare architecture name (random weights, e.g. to try the format)')
        if command == 'save':
            p.add_argument('output_dir')
        else:
            p.add_argument('repo_id')
            p.add_argument('--private', action='store_true')
            p.add_argument('--revision', default=None)
        p.add_argument('--entry', default=None,
                       help="registry entry (name): the model card and config.json's pretrained tag come from it")
        p.set_defaults(func=_save if command == 'save' else _push)


def _eval_parser(sub) -> None:
    p = sub.add_parser('eval', help='top-1 accuracy of a (published) model on a dataset')
    p.add_argument('model', help='registry tag, hf-hub:..., local-dir:..., or a folder')
    p.add_argument('--dataset', required=True, help='Hub id, local Hub-layout folder, image folder, sklearn:digits')
    p.add_argument('--split', default=None, help='default: test (train with --test-fraction)')
    p.add_argument('--test-fraction', type=float, default=0.0,
                   help="evaluate on the test set jointrd distill's --test-fraction carved from --split (the same "
                        'images; default 0: the whole split)')
    p.add_argument('--transform', '--recipe', dest='transform', default=None, choices=('cifar', 'imagenet', 'tensor'),
                   help="evaluation transform (--recipe: its former name); default: the model's own data config "
                        "(config.json's input size, crop, interpolation, mean / std), as timm's validate.py reads it")
    _add_columns(p)
    p.add_argument('--input-size', type=_positive_int, default=None,
                   help="side the images are read at (default: the model's config; 8 for sklearn:digits; 32 with "
                        "--transform)")
    p.add_argument('--random-weights', action='store_true', help='allow a bare architecture name (random weights)')
    p.add_argument('--against', default=None, metavar='MODEL',
                   help='a second model (e.g. the twin\'s teacher; named as MODEL is) evaluated on the same images: '
                        'its top-1 and how often the two give the same class')
    p.set_defaults(func=_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='jointrd', description='Shortcut-free twins of timm models, trained by '
                                     'Residual Distillation (JointRD, NeurIPS 2020).')
    sub = parser.add_subparsers(dest='command', required=True)
    for add in (_derive_parser, _train_parser, _convert_parser, _demo_parser, _distill_parser, _export_parsers,
                _measure_parsers, _publish_parsers, _eval_parser):  # one function per subcommand (or family)
        add(sub)
    return parser


def main(argv=None) -> int:
    """Run one subcommand. The package's own errors (:class:`~jointrd_timm.errors.JointRDError`: bad input, a folder
    or file it cannot use) and a missing file print one line and return 1; anything else is a bug and raises with
    its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (JointRDError, FileNotFoundError) as e:
        print(f'jointrd {args.command}: error: {error_line(e)}', file=sys.stderr)
        return 1


def error_line(error: BaseException) -> str:
    """The message of ``error`` as one line: an error raised in a DataLoader worker comes back wrapped in the worker's
    traceback ('Caught InputError in DataLoader worker process 0. Original Traceback ...'), whose last line holds it."""
    text = str(error)
    if text.startswith('Caught ') and 'Original Traceback' in text:
        text = text.rstrip().splitlines()[-1].split(': ', 1)[-1]
    return text


if __name__ == '__main__':
    sys.exit(main())
