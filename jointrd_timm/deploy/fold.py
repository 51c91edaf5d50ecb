"""Folding a trained twin into its deployable form: Dirac parametrisation folded, BatchNorm folded into convs.

BN folding is torch.fx's own conv+BN fusion (torch.fx.experimental.optimization.fuse) on the traced model, after
timm's fused BatchNormAct2d layers are split into BatchNorm2d + activation so the pattern can match. Blocks that
timm knows how to re-parameterise (RepVGG / MobileOne / FastViT ``reparameterize()``, RepGhost / GhostNetV3
``switch_to_deploy()``, the ``fuse()`` of RepViT, LeViT, EfficientViT-MSRA, TinyViT, SHViT) are converted first by
timm's own ``reparameterize_model``. Then a BatchNorm after a sum or concatenation of convs, and convs added on one
input, are folded too (:mod:`.branches`). What could not be folded is reported, never hidden.
"""
import copy
from typing import Dict, Optional, Tuple

import torch.fx as fx
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..twins.dirac import fold_dirac
from .branches import fold_parallel_branches

__all__ = ['fold_for_deployment', 'count_batchnorms']


def _split_norm_act(model: nn.Module) -> None:
    from timm.layers import BatchNormAct2d
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is BatchNormAct2d:
                tensor = next((t for t in child.state_dict().values() if t.is_floating_point()), None)
                placed = {} if tensor is None else dict(device=tensor.device, dtype=tensor.dtype)  # as the model is
                # with the statistics it has (a flag turned off after training still leaves eval mode using them)
                bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.running_mean is not None, **placed)
                bn.load_state_dict(child.state_dict())
                bn.track_running_stats = child.track_running_stats
                bn.train(child.training)
                setattr(module, child_name, nn.Sequential(bn, child.drop, child.act))


def _is_batchnorm_call(node: fx.Node) -> bool:
    """A functional batch_norm in a graph that normalises activations with running statistics (not a weight
    standardisation, e.g. NFNets' ScaledStdConv2d, which calls batch_norm on its weight without statistics)."""
    if node.op != 'call_function' or 'batch_norm' not in str(node.target):
        return False
    running_mean = node.kwargs.get('running_mean', node.args[1] if len(node.args) > 1 else None)
    return running_mean is not None


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers still computed: modules, and functional batch_norm calls with running statistics in an fx
    graph (the same count before and after folding)."""
    count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            count += sum(_is_batchnorm_call(n) for n in module.graph.nodes)
    return count


def fold_for_deployment(model: nn.Module) -> Tuple[nn.Module, Dict]:
    """A folded copy of ``model`` (eval mode) and a report: batchnorms before (as given) and after (left computed),
    whether fx tracing worked (else ``reason``), ``parallel_branches`` (norms folded and conv pairs merged across
    branches) where there were any, and ``reparameterize_error`` where timm's re-parameterisation failed."""
    model = copy.deepcopy(model).eval()
    before = count_batchnorms(model)  # as given: a RepVGG / MobileOne block's branch norms count, then fold
    fold_dirac(model)
    report = dict(batchnorms_before=before, traced=True)
    model, failed = _reparameterized(model)
    if failed:
        report['reparameterize_error'] = failed
    _split_norm_act(model)
    try:
        folded = fuse(_unshared(fx.symbolic_trace(model)), no_trace=True)
    except Exception as e:  # noqa: BLE001 - traced again with timm's untraceable layers kept whole
        try:
            folded = _fuse_keeping_timm_layers(model)
            report['layers_kept_whole'] = True
        except Exception:  # noqa: BLE001 - a model fx cannot trace stays eager, unfused
            report.update(traced=False, reason=f'{type(e).__name__}: {e}'[:200])
            folded = model
    if isinstance(folded, fx.GraphModule):
        branches = fold_parallel_branches(folded)
        if any(branches.values()):
            report['parallel_branches'] = branches
    report['batchnorms_after'] = count_batchnorms(folded)
    return folded, report


def _reparameterized(model: nn.Module) -> Tuple[nn.Module, Optional[str]]:
    """``model`` re-parameterised by timm's ``reparameterize_model`` (a converted copy), and None; or, where timm's
    conversion fails, ``model`` unchanged and the reason. It fails on a model already re-parameterised whose blocks
    cannot be converted twice (timm's FastViT RepMixer), which then folds as it is."""
    from timm.models import reparameterize_model
    try:
        converted = reparameterize_model(model).eval()  # a fused module may come back in training mode
    except Exception as e:  # noqa: BLE001 - reported by fold_for_deployment; the model folds unconverted
        return model, f'{type(e).__name__}: {e}'[:200]
    # timm's fuse() builds its layers with torch's default dtype and device: back to the model's where it had one
    placed = {(t.dtype, t.device) for t in model.state_dict().values() if t.is_floating_point()}
    if len(placed) == 1:
        (dtype, device), = placed
        converted.to(device=device, dtype=dtype)
    return converted, None


def _unshared(graph_module: fx.GraphModule) -> fx.GraphModule:
    """``graph_module`` with a copy of a conv module for each of its calls after the first: torch's fusion folds a norm
    into the conv module that feeds it, which would change every other call of a shared conv."""
    seen = set()
    for node in graph_module.graph.nodes:
        if node.op != 'call_module' \
                or not isinstance(graph_module.get_submodule(node.target), nn.modules.conv._ConvNd):
            continue
        if node.target in seen:
            base, k = node.target.replace('.', '_') + '_call', 1
            while hasattr(graph_module, f'{base}{k}'):
                k += 1
            graph_module.add_submodule(f'{base}{k}', copy.deepcopy(graph_module.get_submodule(node.target)))
            node.target = f'{base}{k}'
        seen.add(node.target)
    graph_module.recompile()
    return graph_module


def _fuse_keeping_timm_layers(model: nn.Module) -> fx.GraphModule:
    """torch's conv + BN fusion on ``model`` traced with timm's untraceable layers kept whole (Conv2dSame's
    input-dependent padding: the ``tf_*`` ports), then the BatchNorm2d after a kept conv (a subclass of Conv2d, which
    torch's pattern does not match) folded into that conv's weights; a weight-standardised conv keeps its BN."""
    from timm.layers import Conv2dSame

    from .memory import _KeepTimmLayers
    graph_module = _unshared(fx.GraphModule(model, _KeepTimmLayers().trace(model)))
    folded = fuse(graph_module, no_trace=True)
    modules = dict(folded.named_modules())
    for node in list(folded.graph.nodes):
        bn = modules.get(node.target) if node.op == 'call_module' else None
        conv_node = node.args[0] if node.args else None
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or not isinstance(conv_node, fx.Node) \
                or conv_node.op != 'call_module' or len(conv_node.users) != 1:
            continue
        conv = modules.get(conv_node.target)
        # the convs whose forward uses their weight as stored (a weight-standardised StdConv2dSame would undo the
        # folded scale)
        if type(conv) not in (nn.Conv2d, Conv2dSame):
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias)
        node.replace_all_uses_with(conv_node)
        folded.graph.erase_node(node)
    folded.graph.lint()
    folded.delete_all_unused_submodules()
    folded.recompile()
    return folded
