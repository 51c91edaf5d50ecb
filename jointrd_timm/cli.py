"""The ``jointrd`` command: thin, every subcommand calls the library."""
import argparse
import json
import sys


def _derive(args) -> int:
    import timm
    import jointrd_timm  # noqa: F401
    from .twins.summary import describe_twin, list_twins
    if args.list:
        print('\n'.join(list_twins()))
        return 0
    if not args.model:
        print('jointrd derive: give a MODEL (e.g. resnet50) or --list', file=sys.stderr)
        return 2
    print(describe_twin(args.model, keep_projection_shortcuts=args.keep_projection_shortcuts,
                        input_size=args.input_size))
    return 0


def _train(args) -> int:
    from .training.runner import load_config, train
    config = load_config(args.config, args.overrides)
    train(config, output_dir=args.output_dir, resume=args.resume, device=args.device)
    return 0


def _demo(args) -> int:
    from .training.demo import run_demo
    run_demo(dataset=args.dataset, output_dir=args.output_dir, epochs=args.epochs, device=args.device)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='jointrd', description='Shortcut-free twins of timm models, trained by '
                                     'Residual Distillation (JointRD, NeurIPS 2020).')
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('derive', help="summary of a model's shortcut-free twin")
    p.add_argument('model', nargs='?', help='a timm architecture, e.g. resnet50')
    p.add_argument('--list', action='store_true', help='list every architecture with a twin')
    p.add_argument('--keep-projection-shortcuts', action='store_true', help="the paper's plain-CNN variant")
    p.add_argument('--input-size', type=int, default=None, help='input size for FLOPs (default: the model cfg)')
    p.set_defaults(func=_derive)

    p = sub.add_parser('train', help='train from a torchdistill YAML with accelerate')
    p.add_argument('--config', required=True, help='torchdistill-format YAML (see yamls/)')
    p.add_argument('overrides', nargs='*', help='key.path=value overrides, e.g. train.num_epochs=1')
    p.add_argument('--output-dir', default=None, help='default: runner.output_dir of the YAML')
    p.add_argument('--resume', action='store_true', help='continue from <output-dir>/last.safetensors')
    p.add_argument('--device', choices=('cpu', 'cuda'), default=None, help='default: cuda if available')
    p.set_defaults(func=_train)

    p = sub.add_parser('demo', help='teacher, twin alone, twin with JointRD on an embedded dataset; table + plot')
    p.add_argument('--dataset', default='sklearn:digits', help='any dataset the runner takes (default: sklearn:digits)')
    p.add_argument('--output-dir', default='runs/demo')
    p.add_argument('--epochs', type=int, default=None, help='epochs per run (default: fits 5 minutes on 2 cores)')
    p.add_argument('--device', choices=('cpu', 'cuda'), default=None)
    p.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f'jointrd {args.command}: error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
