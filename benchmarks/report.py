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
    """The command line of this process, relative to the repository root, less ``--report-only``: a page rewritten
    from its runs names the command that ran them (which reads finished runs back)."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    return ' '.join(['python', str(script), *map(shlex.quote, (a for a in sys.argv[1:] if a != '--report-only'))])


def load_record(name: str, out: Path = RESULTS) -> Optional[Dict]:
    """The record ``<out>/<name>.json``, or None when there is none."""
    path = out / f'{name}.json'
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(name: str, record: Dict, lines: List[str], plot: Optional[Callable[[Path], None]] = None,
                 out: Path = RESULTS) -> Dict[str, Path]:
    """Write ``<out>/<name>.json`` (``record``, atomically), ``<name>.md`` (``lines``, with a footer naming the
    record, the machine and the command) and ``<name>.png`` (``plot(path)``, if given). Returns the paths."""
    from jointrd_timm.io import atomic_write
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


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out ``fig``, write it as PNG to ``path`` and close it (the tail of every plot here)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format='png')
    plt.close(fig)


def curves_and_bars(rows: Dict[str, Dict], path: Path, title: str, short=lambda label: label, colors=None) -> None:
    """The CIFAR benchmarks' plot: each row's validation curve (``val_curve``) beside its last-epoch test accuracy
    (``test_acc``). ``short`` shortens the bar labels; ``colors`` gives one colour per row."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in rows.items():
        ax1.plot(range(1, len(r['val_curve']) + 1), r['val_curve'], marker='o', label=label)
    ax1.set_xlabel('epoch')
    ax1.set_ylabel('held-out validation accuracy (%)')
    ax1.legend(fontsize=7)
    accs = [r['test_acc'] for r in rows.values()]
    ax2.bar([short(label) for label in rows], accs, color=colors)
    ax2.tick_params(axis='x', labelsize=7)
    ax2.set_ylabel('last-epoch test accuracy (%)')
    ax2.set_ylim(max(0, min(accs) - 10), min(100, max(accs) + 5))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format='png')
    plt.close(fig)
