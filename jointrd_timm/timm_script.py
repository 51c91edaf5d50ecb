"""Run one of timm's own scripts (train.py, validate.py, benchmark.py, inference.py) with jointrd_timm registered.

timm never discovers plugins, so its scripts, used unchanged, do not know ``plain_*`` models or the published tags
(``--model plain_resnet56_cifar.jointrd_full_cifar10`` fails with "Unknown model"). This entry point imports
jointrd_timm first (the ``plain_*`` twins, the CIFAR teachers and every ``registry/`` tag), then runs the script as
``python SCRIPT ARGS`` would: as ``__main__``, with ``sys.argv`` = the script and its arguments and the script's
folder first on ``sys.path``; its exit status is the command's.

    python -m jointrd_timm.timm_script path/to/pytorch-image-models/validate.py \\
        --model plain_resnet56_cifar.jointrd_full_cifar10 --pretrained --dataset hfds/uoft-cs/cifar10 --split test \\
        --input-key img
    torchrun --nproc_per_node 2 -m jointrd_timm.timm_script path/to/pytorch-image-models/train.py ...
"""
import runpy
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import JointRDError

__all__ = ['run_script', 'main', 'ScriptNotFoundError']

USAGE = ('usage: python -m jointrd_timm.timm_script SCRIPT [ARGS ...]\n'
         "Runs SCRIPT (one of timm's scripts: train.py, validate.py, benchmark.py, inference.py) with jointrd_timm's "
         'models registered in timm; ARGS go to SCRIPT unchanged.')


class ScriptNotFoundError(JointRDError, FileNotFoundError):
    """The script to run does not exist."""


def run_script(script: str, args: Sequence[str] = ()) -> None:
    """Import jointrd_timm, then run ``script`` as ``__main__`` with ``args`` as its command line. A ``sys.exit``
    in the script propagates as ``SystemExit``, as it would from ``python script``."""
    path = Path(script)
    if not path.is_file():
        raise ScriptNotFoundError(
            f'{script}: no such script. Give the path of one of timm\'s scripts (train.py, validate.py, '
            'benchmark.py, inference.py in a checkout of https://github.com/huggingface/pytorch-image-models, '
            'ideally at the tag of your timm version), then its arguments.')
    import jointrd_timm  # noqa: F401  (registers plain_*, the CIFAR teachers and the published tags in timm)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.resolve().parent))  # as `python script`: the script's folder comes first
    runpy.run_path(str(path), run_name='__main__')


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        run_script(argv[0], argv[1:])
    except ScriptNotFoundError as e:
        print(f'jointrd_timm.timm_script: error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
