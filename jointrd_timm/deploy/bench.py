"""``jointrd bench``: residual model vs its twin, side by side in one run.

For each pair and batch size: latency of the folded eager model (channels_last) and of ONNX Runtime, interleaved
with warm-up, medians of repeats, threads stated; activation memory analysed (deploy.memory) on the folded graph
and measured (peak RSS of a fresh process). Ratios are residual / twin (> 1: the twin is better).
"""
import platform
import time
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch

from .fold import fold_for_deployment
from .latency import compare_latency
from .memory import MemoryAnalysisError, analyze_activation_memory, measure_peak_rss
from ..extras import require

__all__ = ['measure_models', 'bench_models', 'bench_pair', 'run_bench', 'model_input_size', 'DEFAULT_PAIRS']

DEFAULT_PAIRS = ['resnet18', 'resnet34', 'resnet50', 'resnet56_cifar', 'regnetx_002', 'mobilenetv2_050',
                 'efficientnet_b0', 'convnext_atto']


def model_input_size(model: torch.nn.Module) -> int:
    """The side of the square input a built ``model`` (timm's, or a torchvision one built by name) is measured at:
    its ``pretrained_cfg``'s input size (224 without one)."""
    size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size')
    return int(size[-1]) if size else 224


def _onnx_runner(model, x):
    import io
    ort = require('onnxruntime', 'the onnxruntime latency backend')
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, input_names=['input'], output_names=['logits'], opset_version=17,
                      dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buffer.getvalue(), options, providers=['CPUExecutionProvider'])
    feed = {'input': x.numpy()}
    return lambda: session.run(None, feed)


def measure_models(models: Dict[str, torch.nn.Module], input_chw: Tuple[int, int, int],
                   batches: Sequence[int] = (1, 16), repeats: int = 20, warmup: int = 3, onnx: bool = False,
                   channels_last: bool = True, fold: bool = False, memory_batches: Optional[Sequence[int]] = None,
                   measure: Optional[Dict[str, str]] = None) -> Dict:
    """The deployment measurement of models side by side, used by ``jointrd bench``, ``jointrd distill`` and the
    demo: per batch size, the median latency (ms) of each model's eager run (``channels_last``: in channels_last) and,
    with ``onnx``, of ONNX Runtime, all interleaved (``compare_latency``); the activation memory analysed on the
    graph (``deploy.memory``) at ``memory_batches`` (default every batch size); with ``measure`` (label -> timm name),
    the peak RSS of a fresh process. ``fold``: fold (BN, Dirac) copies first (the models users deploy); pass folded
    models otherwise. Ratios ``speedup/<backend>`` and ``memory_ratio_*`` are first / second model."""
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}  # as given (before folding)
    if fold:
        models = {k: fold_for_deployment(m)[0] for k, m in models.items()}
    models = {k: m.eval() for k, m in models.items()}
    labels = list(models)
    result = dict(input_chw=list(input_chw), params=params, batches={})
    for batch in batches:
        x = torch.randn(batch, *input_chw)
        x_run = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        runners = {}
        for kind, model in models.items():
            run = model.to(memory_format=torch.channels_last) if channels_last else model
            runners[f'{kind}/eager'] = (lambda m=run: m(x_run))
            if onnx:
                runners[f'{kind}/onnxruntime'] = _onnx_runner(model, x)
        timed = compare_latency(runners, repeats=repeats, warmup=warmup)
        row = {name: round(t['median_ms'], 3) for name, t in timed.items()}
        result['batches'][batch] = row
        pair = labels[:2] if len(labels) > 1 else None
        if pair:
            for backend in ('eager', 'onnxruntime') if onnx else ('eager',):
                row[f'speedup/{backend}'] = row[f'{pair[0]}/{backend}'] / row[f'{pair[1]}/{backend}']
        if memory_batches is None or batch in memory_batches:
            try:
                memory = {kind: analyze_activation_memory(model, x) for kind, model in models.items()}
            except MemoryAnalysisError as e:  # untraceable: the measured peak below still says it
                row['memory_analysed_error'] = str(e)
            else:
                row['memory_analysed_bytes'] = {k: m.peak_bytes for k, m in memory.items()}
                if pair:
                    row['memory_ratio_analysed'] = memory[pair[0]].peak_bytes / memory[pair[1]].peak_bytes
                row['shortcut_share_analysed'] = memory[labels[0]].shortcut_share
                if any(m.layers_kept_whole for m in memory.values()):  # timm layers kept whole: a lower bound
                    row['memory_analysed_lower_bound'] = True
        if measure:
            measured = {kind: measure_peak_rss(name, batch, tuple(input_chw), torch.get_num_threads())
                        for kind, name in measure.items()}
            row['memory_measured_bytes'] = measured
            if pair and set(pair) <= set(measured):
                row['memory_ratio_measured'] = measured[pair[0]] / max(1, measured[pair[1]])
    return result


def bench_models(built: Dict[str, torch.nn.Module], size: int, batches: Sequence[int] = (1, 16), repeats: int = 20,
                 onnx: bool = True, measure: Optional[Dict[str, str]] = None) -> Dict:
    """:func:`measure_models` of already folded square-input models, eager in channels_last, in the record layout of
    ``deploy_bench.json`` (``input_size``)."""
    result = measure_models(built, (3, size, size), batches, repeats, onnx=onnx, measure=measure)
    return dict(input_size=size, params=result['params'], batches=result['batches'])


def bench_pair(teacher: str, batches: Sequence[int] = (1, 16), repeats: int = 20, onnx: bool = True,
               measure_memory: bool = True, input_size: Optional[int] = None) -> Dict:
    """The residual ``teacher`` (a timm or ``torchvision:`` name) vs ``plain_<teacher>`` (both folded), at
    ``input_size`` (default: the teacher's pretrained config's)."""
    from ..models.torchvision_models import create_named_model
    names = {'residual': teacher, 'twin': f'plain_{teacher}'}
    models = {k: create_named_model(v) for k, v in names.items()}
    size = input_size or model_input_size(models['residual'])
    built = {k: fold_for_deployment(m)[0] for k, m in models.items()}
    result = bench_models(built, size, batches, repeats, onnx, names if measure_memory else None)
    return dict(teacher=teacher, **result)


def run_bench(pairs: Optional[List[str]] = None, batches: Sequence[int] = (1, 16), repeats: int = 20,
              threads: int = 2, onnx: bool = True, measure_memory: bool = True, log=print,
              input_size: Optional[int] = None) -> Dict:
    torch.set_num_threads(threads)
    results = []
    for teacher in pairs or DEFAULT_PAIRS:
        start = time.time()
        results.append(bench_pair(teacher, batches, repeats, onnx, measure_memory, input_size))
        log(f'{teacher}: {time.time() - start:.0f} s')
    meta = dict(threads=threads, repeats=repeats, machine=f'{platform.machine()} {platform.processor()}'.strip(),
                torch=torch.__version__, timm=timm.__version__, date=time.strftime('%Y-%m-%d'))
    try:
        import onnxruntime
        meta['onnxruntime'] = onnxruntime.__version__
    except ImportError:
        pass
    from ..models.torchvision_models import torchvision_name
    if any(torchvision_name(m) is not None for m in pairs or ()):
        import torchvision
        meta['torchvision'] = torchvision.__version__
    return dict(meta=meta, results=results)


def markdown(report: Dict) -> str:
    meta = report['meta']
    lines = [f'Machine: {meta["machine"]}, {meta["threads"]} threads; torch {meta["torch"]}, timm {meta["timm"]}'
             f'{", onnxruntime " + meta["onnxruntime"] if "onnxruntime" in meta else ""}; medians of '
             f'{meta["repeats"]} interleaved runs after warm-up; models folded (BN, Dirac), eager in channels_last.',
             '', '| residual model | batch | eager ms residual / twin | speedup eager | ORT ms residual / twin | '
             'speedup ORT | act. memory analysed MB residual / twin | ratio | measured peak RSS MB residual / twin | '
             'ratio | shortcut share at peak |', '|---|---|---|---|---|---|---|---|---|---|---|']
    for r in report['results']:
        for batch, row in r['batches'].items():
            ort_ms = (f'{row["residual/onnxruntime"]:.2f} / {row["twin/onnxruntime"]:.2f}', f'{row["speedup/onnxruntime"]:.2f}x') \
                if 'speedup/onnxruntime' in row else ('-', '-')
            mem = row.get('memory_analysed_bytes')
            at_least = '>= ' if row.get('memory_analysed_lower_bound') else ''  # layers kept whole, not counted inside
            analysed = (f'{at_least}{mem["residual"] / 2**20:.2f} / {at_least}{mem["twin"] / 2**20:.2f}',
                        f'{row["memory_ratio_analysed"]:.2f}x', f'{100 * row["shortcut_share_analysed"]:.0f} %') \
                if mem else ('not traceable', '-', '-')
            measured = row.get('memory_measured_bytes')
            meas = (f'{measured["residual"] / 2**20:.1f} / {measured["twin"] / 2**20:.1f}',
                    f'{row["memory_ratio_measured"]:.2f}x') if measured else ('-', '-')
            lines.append(
                f'| {r["teacher"]} ({r["input_size"]} px) | {batch} | {row["residual/eager"]:.2f} / {row["twin/eager"]:.2f} | '
                f'{row["speedup/eager"]:.2f}x | {ort_ms[0]} | {ort_ms[1]} | {analysed[0]} | {analysed[1]} | '
                f'{meas[0]} | {meas[1]} | {analysed[2]} |')
    return '\n'.join(lines)
