"""Activation memory of one inference: analysed from the graph, and measured.

Analysis (``analyze_activation_memory``): the model is traced with torch.fx and shapes are propagated on a real
input. Every activation (the input included, parameters excluded) lives from the op that creates it to its last
use; in-place ops (ReLU(inplace=True), ``+=``) reuse their input's storage. Walking the ops in execution order and
freeing each tensor as soon as it is dead gives the peak. Shortcut additions are found on the graph:
an addition whose two operands fork from a common tensor, one through at most two convolutions (a pooling weighs
half: an identity or a projection, at most 5 ops), the other through more weight (the branch).
A model that torch.fx cannot trace through (TF 'same' padding, CondConv, some attention) is traced again with
timm's untraceable layers (``timm.layers.get_notrace_modules``) kept whole, unless one of them holds a shortcut
addition: a layer kept whole weighs as a convolution when it has a weight matrix or kernel, and its internal tensors
are not counted (only its output), so the peak of such a model is a lower bound.
Additions inside one layer's definition (attention's position logits, GRN, global context:
``twins.verify.NOT_SHORTCUT_CLASSES``) and sums of pieces of one split tensor (Res2Net) are not shortcuts: they
weigh no layer on either side, or their module or fork says so. A tensor is "held alive only by shortcuts" at a
moment when its only remaining uses are shortcut uses. The report gives the share of the peak that such tensors
hold, and the peak the model would have without those uses.

Measurement (``measure_peak_rss``): a fresh subprocess builds the model, resets the kernel's peak-RSS mark
(/proc/self/clear_refs), runs one inference and reports VmHWM - VmRSS before: the real peak including the
allocator's and the kernels' workspaces.
"""
import json
import operator
import subprocess
import sys
from collections import deque
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from timm.layers import is_notrace_module

from ..errors import JointRDError
from ..twins.verify import NOT_SHORTCUT_CLASSES, _qualname, shortcut_additions

__all__ = ['analyze_activation_memory', 'MemoryReport', 'measure_peak_rss', 'MemoryAnalysisError']

SHORT_BRANCH = 5  # ops on a shortcut's path, from the fork to the addition (pool, conv, norm, act, reshapes)
SHORT_BRANCH_WEIGHTS = 4  # its weight (conv / linear 2, pooling 1): an identity 0, a projection up to 4 (GhostNet's)
_F = torch.nn.functional
# what a path is weighed by (``_layer_weight``): convolutions and linear layers 2, poolings 1 (PoolFormer's token
# mixer is a pooling; ResNet-D's pool + conv projection weighs less than a basic block's two convs)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_CONV_FUNCTIONS = {torch.conv1d, torch.conv2d, torch.conv3d, _F.conv1d, _F.conv2d, _F.conv3d, _F.linear}
_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {_F.avg_pool1d, _F.avg_pool2d, _F.avg_pool3d, _F.max_pool1d, _F.max_pool2d, _F.max_pool3d,
                   _F.adaptive_avg_pool1d, _F.adaptive_avg_pool2d, _F.adaptive_max_pool1d, _F.adaptive_max_pool2d}
_INPLACE_FUNCTIONS = {operator.iadd, operator.imul, torch.relu_}
_INPLACE_METHODS = {'add_', 'mul_', 'relu_', 'clamp_', 'sigmoid_'}
_ADDS = {operator.add, operator.iadd, torch.add}


class MemoryAnalysisError(JointRDError, RuntimeError):
    """torch.fx cannot trace the model, so its activation memory cannot be analysed from its graph."""


@dataclass
class MemoryReport:
    peak_bytes: int
    shortcut_only_bytes_at_peak: int
    peak_without_shortcut_uses_bytes: int
    shortcut_additions: int
    num_activations: int
    # timm layers torch.fx could not trace through, kept whole (their internal tensors are not counted: a lower bound)
    layers_kept_whole: int = 0

    @property
    def shortcut_share(self) -> float:
        return self.shortcut_only_bytes_at_peak / self.peak_bytes if self.peak_bytes else 0.0

    def to_dict(self) -> Dict:
        return dict(asdict(self), shortcut_share=self.shortcut_share)


def _bytes(meta) -> int:
    if meta is None:
        return 0
    if hasattr(meta, 'shape') and hasattr(meta, 'dtype'):  # TensorMetadata (itself a namedtuple)
        n = 1
        for d in meta.shape:
            n *= int(d)
        return n * torch.empty((), dtype=meta.dtype).element_size()
    if isinstance(meta, (tuple, list)):
        return sum(_bytes(m) for m in meta)
    if isinstance(meta, dict):
        return sum(_bytes(m) for m in meta.values())
    return 0


def _is_inplace(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == 'call_module':
        return bool(getattr(modules[node.target], 'inplace', False))
    if node.op == 'call_function':
        return node.target in _INPLACE_FUNCTIONS or bool(node.kwargs.get('inplace', False))
    return node.op == 'call_method' and node.target in _INPLACE_METHODS


def _is_add(node: fx.Node) -> bool:
    return (node.op == 'call_function' and node.target in _ADDS) or \
        (node.op == 'call_method' and node.target in ('add', 'add_'))


def _ancestors(node: fx.Node) -> Dict[fx.Node, int]:
    """Every ancestor with its shortest distance (in ops) from ``node``."""
    dist = {node: 0}
    queue = deque([node])
    while queue:
        current = queue.popleft()
        for parent in current.all_input_nodes:
            if parent not in dist:
                dist[parent] = dist[current] + 1
                queue.append(parent)
    return dist


def _kept_whole(module: Optional[nn.Module]) -> bool:
    """Whether a called module is a layer kept whole from outside torch (:class:`_KeepTimmLayers`): a plain trace
    keeps only torch's own modules as leaves."""
    return module is not None and not type(module).__module__.startswith('torch.')


def _layer_weight(node: fx.Node, modules: Dict[str, nn.Module]) -> int:
    """2 for a convolution or linear layer, 1 for a pooling (as a module or a function), else 0; a timm layer kept
    whole (:class:`_KeepTimmLayers`) weighs 2 when it has a weight of two or more dimensions (CondConv's experts)."""
    if node.op == 'call_module':
        module = modules.get(node.target)
        if isinstance(module, _CONV_MODULES):
            return 2
        if isinstance(module, _POOL_MODULES):
            return 1
        return 2 if _kept_whole(module) and any(p.dim() >= 2 for p in module.parameters()) else 0
    if node.op == 'call_function':
        return 2 if node.target in _CONV_FUNCTIONS else 1 if node.target in _POOL_FUNCTIONS else 0
    return 0


def _layers_on_path(node: fx.Node, ancestors, modules: Dict[str, nn.Module], order: Dict[fx.Node, int]):
    """Every ancestor with the heaviest path from it to ``node`` (convolutions and linear layers weigh 2, poolings 1)
    (``node``'s own op included, the ancestor's not): a longest path over the graph's topological order, so that a
    branch that also reads its input directly (PoolFormer's ``pool(x) - x``) still weighs its pooling."""
    most = {node: 0}
    for current in sorted(ancestors, key=order.__getitem__, reverse=True):
        if current not in most:
            continue
        step = most[current] + _layer_weight(current, modules)
        for parent in current.all_input_nodes:
            most[parent] = max(most.get(parent, 0), step)
    return most


def _is_split(node: fx.Node) -> bool:
    """Whether ``node`` produced several tensors (split, chunk, unbind), from its shape metadata."""
    meta = node.meta.get('tensor_meta')
    return isinstance(meta, (tuple, list)) and not hasattr(meta, 'shape')


def _in_layer(node: fx.Node) -> bool:
    """Whether ``node`` runs inside a module whose additions are its own definition (``NOT_SHORTCUT_CLASSES``), as
    the tracer recorded it (``nn_module_stack``; absent on a graph re-traced from a flattened GraphModule)."""
    for _, cls in (node.meta.get('nn_module_stack') or {}).values():
        if isinstance(cls, type) and _qualname(cls) in NOT_SHORTCUT_CLASSES:
            return True
    return False


def _shortcut_uses(graph: fx.Graph, modules: Dict[str, nn.Module]):
    """(shortcut additions, set of (tensor, user) edges that exist only to feed a shortcut, shortcut-branch nodes)."""
    additions, edges, branch_nodes = 0, set(), set()
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        if not _is_add(node) or len(node.args) < 2 or _in_layer(node):
            continue
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        da, db = _ancestors(a), _ancestors(b)
        common = [n for n in da if n in db]
        if not common:
            continue
        fork = min(common, key=lambda n: (max(da[n], db[n]), da[n] + db[n]))
        if _is_split(fork):  # two pieces of one tensor added (Res2Net's hierarchy): not a shortcut around a block
            continue
        wa, wb = _layers_on_path(a, da, modules, order)[fork], _layers_on_path(b, db, modules, order)[fork]
        (short, w_short, d_short), (_, w_long, d_long) = sorted(((a, wa, da[fork]), (b, wb, db[fork])),
                                                                 key=lambda t: (t[1], t[2]))
        if d_short > SHORT_BRANCH or w_short > SHORT_BRANCH_WEIGHTS or w_long <= w_short or d_long <= d_short:
            continue
        additions += 1
        # walk the short branch back to the fork: its nodes are shortcut-only tensors
        current, user = short, node
        while current is not fork:
            branch_nodes.add(current)
            parents = [p for p in current.all_input_nodes if p is fork or fork in _ancestors(p)]
            user, current = current, parents[0]
        edges.add((fork, user))
    return additions, edges, branch_nodes


class _KeepTimmLayers(fx.Tracer):
    """A tracer that keeps timm's untraceable layers whole (``timm.layers.is_notrace_module``: Conv2dSame's
    input-dependent padding, CondConv2d, ...), except one that holds a shortcut addition (NormFreeBlock): hiding
    it would hide the shortcut."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if super().is_leaf_module(m, module_qualified_name):
            return True
        return is_notrace_module(type(m)) and not any(shortcut_additions(sub) for sub in m.modules())


def _trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced by torch.fx, through every module, else with timm's untraceable layers kept whole; a
    GraphModule (a folded model) is read as it is: re-tracing it would lose the module each op ran in."""
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow (TF 'same' padding), untraceable calls
        first = e
    try:
        tracer = _KeepTimmLayers()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception:  # noqa: BLE001 - untraceable outside timm's known layers too: report the first error
        raise MemoryAnalysisError(
            f'torch.fx cannot trace {type(model).__name__} ({type(first).__name__}: {str(first)[:120]}), so its '
            'activation memory cannot be analysed from its graph; the measured peak (`jointrd bench`, its RSS '
            'column) still works.') from first


def analyze_activation_memory(model: nn.Module, x: torch.Tensor) -> MemoryReport:
    """Peak activation memory of ``model(x)`` and the part held alive only by shortcuts (see module docstring)."""
    model = model.eval()
    graph_module = _trace(model)
    with torch.no_grad():
        ShapeProp(graph_module).propagate(x)
    modules = dict(graph_module.named_modules())
    nodes = list(graph_module.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    storage: Dict[fx.Node, fx.Node] = {}
    size: Dict[fx.Node, int] = {}
    for node in nodes:
        if node.op in ('placeholder', 'call_module', 'call_function', 'call_method'):
            first = node.all_input_nodes[0] if node.all_input_nodes else None
            if first is not None and _is_inplace(node, modules) and first in storage:
                storage[node] = storage[first]
            elif node.op == 'call_function' and node.target is operator.getitem:
                storage[node] = node  # a view/element of a tuple: counted where it was produced
                size[node] = 0
                continue
            else:
                storage[node] = node
                size[node] = _bytes(node.meta.get('tensor_meta'))
    additions, shortcut_edges, branch_nodes = _shortcut_uses(graph_module.graph, modules)
    last_use: Dict[fx.Node, int] = {}
    last_main_use: Dict[fx.Node, int] = {}
    for node in nodes:
        for parent in node.all_input_nodes:
            if parent not in storage:
                continue
            s = storage[parent]
            i = len(nodes) if node.op == 'output' else index[node]
            last_use[s] = max(last_use.get(s, index[s]), i)
            if (parent, node) not in shortcut_edges and node not in branch_nodes:
                last_main_use[s] = max(last_main_use.get(s, index[s]), i)
    created = {s: index[s] for s in size}

    def live_at(i, until):
        return [s for s in size if created[s] <= i <= until.get(s, created[s])]

    profile = [sum(size[s] for s in live_at(i, last_use)) for i in range(len(nodes))]
    peak_index = max(range(len(nodes)), key=profile.__getitem__)
    shortcut_only = sum(size[s] for s in live_at(peak_index, last_use)
                        if s in branch_nodes or peak_index > last_main_use.get(s, created[s]))
    without = max(sum(size[s] for s in live_at(i, last_main_use) if s not in branch_nodes) for i in range(len(nodes)))
    kept = sum(n.op == 'call_module' and _kept_whole(modules[n.target]) for n in nodes)
    return MemoryReport(peak_bytes=profile[peak_index], shortcut_only_bytes_at_peak=shortcut_only,
                        peak_without_shortcut_uses_bytes=without, shortcut_additions=additions,
                        num_activations=len(size), layers_kept_whole=kept)


_MEASURE = r'''
import json, sys, torch
from jointrd_timm.deploy.fold import fold_for_deployment
from jointrd_timm.models.torchvision_models import create_named_model
torch.set_num_threads(int(sys.argv[4]))
name, batch, (chans, height, width) = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model = create_named_model(name, in_chans=chans).eval()
if sys.argv[5] == 'fold':
    model = fold_for_deployment(model)[0]
x = torch.randn(batch, chans, height, width)
def status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
with torch.inference_mode():
    open('/proc/self/clear_refs', 'w').write('5')
    before = status('VmRSS')
    model(x)
    print(json.dumps(dict(peak_delta_bytes=status('VmHWM') - before)))
'''


def measure_peak_rss(model_name: str, batch: int, size: Union[int, Sequence[int]], threads: int = 2,
                     fold: bool = True) -> int:
    """Peak RSS increase (bytes) of one inference of ``model_name`` (a timm or ``torchvision:`` name) in a fresh
    process (see module docstring), on ``batch`` inputs of ``size``: a side (square, 3 channels) or (channels, height,
    width), the model built with that many input channels."""
    chw = (3, size, size) if isinstance(size, int) else tuple(size)
    if len(chw) != 3 or not all(isinstance(v, int) and v > 0 for v in chw):
        raise ValueError(f'measure_peak_rss: size is a side or (channels, height, width) of positive integers, got '
                         f'{size!r}.')
    out = subprocess.run([sys.executable, '-c', _MEASURE, model_name, str(batch), json.dumps(chw), str(threads),
                          'fold' if fold else 'eager'], capture_output=True, text=True)
    if out.returncode != 0:
        raise MemoryAnalysisError(f'measuring the peak RSS of {model_name} in a fresh process failed (it reads '
                                  f'/proc/self/status and writes /proc/self/clear_refs: Linux only): '
                                  f'{out.stderr.strip()[-500:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])['peak_delta_bytes']
