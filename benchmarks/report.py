"""The report tail every benchmark shares: its record (JSON, written atomically), its page (markdown) and its plot
(PNG) under benchmarks/results/, with the machine and the command that produced them.

    from report import machine, write_report
    write_report('my_bench', record, lines, plot=lambda ax_path: ...)

``record['meta']`` gets ``command`` (the one given, or this process's command line), ``machine``, ``torch`` and
``date`` unless the caller set them. Pages are generated from records only, so a number on a page is always the
record's.
"""
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results'


def machine() -> str:
    import torch
    return (f'{platform.machine()}, {platform.processor() or "cpu"}, {torch.get_num_threads()} torch threads, '
            f'torch {torch.__version__}')


def this_command() -> str:
    """The command line of this process, relative to the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return ' '.join(['python', str(script), *map(shlex.quote, sys.argv[1:])])


def write_report(name: str, record: Dict, lines: List[str], plot: Optional[Callable[[Path], None]] = None,
                 out: Path = RESULTS) -> Dict[str, Path]:
    """Write ``<out>/<name>.json`` (``record``, atomically), ``<name>.md`` (``lines``, with a footer naming the
    record, the machine and the command) and ``<name>.png`` (``plot(path)``, if given). Returns the paths."""
    from jointrd_timm.training.checkpoint import atomic_write
    meta = record.setdefault('meta', {})
    meta.setdefault('command', this_command())
    meta.setdefault('machine', machine())
    meta.setdefault('date', time.strftime('%Y-%m-%d'))
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / f'{name}.json', md=out / f'{name}.md')
    atomic_write(paths['json'], lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + '\n'))
    footer = ['', f'Generated from [{name}.json]({name}.json) by `{meta["command"]}` on {meta["machine"]}, '
                  f'{meta["date"]}.']
    atomic_write(paths['md'], lambda tmp: Path(tmp).write_text('\n'.join(lines + footer) + '\n'))
    if plot is not None:
        paths['png'] = out / f'{name}.png'
        atomic_write(paths['png'], lambda tmp: plot(Path(tmp)))
    return paths


def pyplot():
    """matplotlib's pyplot on the Agg backend (the ``plots`` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("Benchmark plots need matplotlib: pip install 'jointrd-timm[plots]'") from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt
