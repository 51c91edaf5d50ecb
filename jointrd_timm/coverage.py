"""The recommended recipe's path, checked for one architecture: teacher -> fading twin -> JointRD -> deployed twin.

Each step is a column of ``benchmarks/results/twin_coverage.md`` (``benchmarks/recipe_coverage.py`` runs it over
every derivable architecture; ``tests/test_coverage.py`` over one small architecture per family):

* ``fade``: ``plain_<arch>`` with ``shortcut_fade=True`` and the teacher's weights (``load_teacher_weights``) gives
  the teacher's outputs at ``s = 1`` (eval mode; max abs diff reported). The teacher's weights and statistics are
  moved off their initial values first (:func:`_off_init`), as a trained teacher's are.
* ``jointrd``: :class:`~jointrd_timm.methods.JointRD` builds its stage split for the pair, and one train step gives a
  finite loss and a gradient to every twin parameter that the twin trained alone (cross-entropy) reaches.
* ``deploy``: at ``s = 0``, :func:`~jointrd_timm.twins.fade.deployable` has no shortcut addition left, loads strictly
  into ``plain_<arch>`` and gives the same outputs.
* ``export``: BN / Dirac folding and ONNX export (run by onnxruntime) of the deployed twin
  (:func:`~jointrd_timm.deploy.export.export_model`); the fold report says what could not be fused.

A step that fails with one of the named refusals (:data:`REFUSALS`: the architecture cannot take that step by
design, and the error says why) is recorded as ``refused`` with its reason; any other exception is a ``crash``.
"""
import copy
import tempfile
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .deploy.export import UnsupportedExportError
from .methods import JointRD
from .methods.stages import StageLayoutError
from .models.torchvision_models import create_named_model
from .twins import count_shortcut_additions
from .twins.derive import NotResidualError, UnsupportedBlockError
from .recipes import DEFAULT_RECIPE
from .twins.fade import deployable, make_fading, set_shortcut_scale
from .twins.transfer import load_teacher_weights
from .twins.verify import find_unhandled_residual_blocks

__all__ = ['check_recipe_path', 'recipe_outcome', 'STEPS', 'REFUSALS', 'input_size_for']

STEPS = ('fade', 'jointrd', 'deploy', 'export')
# errors that refuse a step by design, each with its reason in the message
# (UnsupportedExportError: the ONNX exporter cannot translate one of the family's operators)
REFUSALS = (StageLayoutError, UnsupportedBlockError, NotResidualError, UnsupportedExportError)
# s = 1 reproduces the teacher exactly up to float reassociation inside re-traced blocks; tolerances are relative to
# the largest output, because some random-init nets (MobileOne: every block sums three branches) reach 1e11 and more
FADE_ATOL = 1e-4
EXPORT_ATOL = 1e-3
# a gradient this small relative to the median one is float noise (a bias whose effect a train-mode BN cancels)
GRAD_NOISE = 1e-6


def recipe_outcome(results: Dict[str, Dict]) -> str:
    """One architecture's result of :func:`check_recipe_path` in one word: ``'pass'`` (every step passed),
    ``'refused'`` (a step refused by design or not run, none failed) or ``'failed'`` (a step failed or crashed)."""
    statuses = {r['status'] for r in results.values()}
    if statuses <= {'pass'}:
        return 'pass'
    return 'refused' if statuses <= {'pass', 'refused', 'skipped'} else 'failed'


def _tolerance(atol: float, reference: torch.Tensor) -> float:
    return atol * max(1.0, reference.abs().max().item())


def input_size_for(model: nn.Module, size: int = 64) -> Tuple[int, int, int]:
    """A small input for ``model``: ``size`` square unless the model fixes its input size (or needs more)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    chans, h, w = cfg.get('input_size', (3, size, size))
    if cfg.get('fixed_input_size', False):
        return chans, h, w
    low = cfg.get('min_input_size', (chans, size, size))
    return chans, max(size, low[1]), max(size, low[2])


def _reached(model: nn.Module, noise: bool = False) -> set:
    """Parameters with a non-zero gradient; with ``noise``, only those whose gradient is above float noise: more
    than ``GRAD_NOISE`` times the median parameter's (the median, because a random-init net's largest gradients
    can be astronomically larger than the rest)."""
    grads = {n: p.grad.abs().max().item() for n, p in model.named_parameters() if p.grad is not None}
    grads = {n: g for n, g in grads.items() if g > 0}
    if not noise or not grads:
        return set(grads)
    median = sorted(grads.values())[len(grads) // 2]
    return {n for n, g in grads.items() if g > GRAD_NOISE * median}


def _fade_step(arch: str, teacher: nn.Module, x: torch.Tensor) -> Tuple[Dict, nn.Module]:
    from .models.plain_twins import underivable_reason
    if underivable_reason(arch):  # not registered as plain_<arch>: deriving its fading twin raises the refusal
        make_fading(copy.deepcopy(teacher))
    fading = create_named_model(f'plain_{arch}', num_classes=10, shortcut_fade=True)
    dropped = load_teacher_weights(fading, teacher)
    teacher.eval(), fading.eval()
    with torch.no_grad():
        expected = teacher(x)
        diff = (fading(x) - expected).abs().max().item()
    ok = diff <= _tolerance(FADE_ATOL, expected)
    return dict(status='pass' if ok else 'fail', max_abs_diff=diff, teacher_keys_dropped=len(dropped),
                **({} if ok else dict(reason=f'fading twin at s = 1 differs from the teacher by {diff:.3g}'))), fading


def _jointrd_step(teacher: nn.Module, fading: nn.Module, x: torch.Tensor) -> Dict:
    y = torch.arange(x.shape[0]) % 10
    fading.train()
    fading.zero_grad(set_to_none=True)
    F.cross_entropy(fading(x), y).backward()  # the twin alone, at the same s = 1
    alone = _reached(fading, noise=True)
    fading.zero_grad(set_to_none=True)
    # the recommended recipe's JointRD, one step of a two-step run
    method = JointRD(fading, teacher, DEFAULT_RECIPE.jointrd_config(), probe=x, num_epochs=1, steps_per_epoch=2)
    method.train()
    out = method(x, y)
    loss = out['loss']
    loss.backward()
    missing = sorted(alone - _reached(fading))
    fading.zero_grad(set_to_none=True)
    ok = bool(torch.isfinite(loss)) and not missing
    res = dict(status='pass' if ok else 'fail', loss=float(loss), stages=method.num_stages,
               params_reached=len(alone) - len(missing), params_alone=len(alone))
    if not ok:
        res['reason'] = (f'loss {float(loss)}' if not torch.isfinite(loss) else
                         f'{len(missing)} parameters the twin alone trains get no JointRD gradient, e.g. {missing[:3]}')
    return res


def _deploy_step(arch: str, fading: nn.Module, x: torch.Tensor) -> Tuple[Dict, nn.Module]:
    fading.eval()
    set_shortcut_scale(fading, 0.0)
    deployed = deployable(fading)
    left = count_shortcut_additions(deployed) + len(find_unhandled_residual_blocks(deployed))
    plain = create_named_model(f'plain_{arch}', num_classes=10).eval()
    plain.load_state_dict(deployed.state_dict())  # strict: exactly the twin's tensors
    with torch.no_grad():
        at_zero = fading(x)
        diff = max((deployed(x) - at_zero).abs().max().item(), (plain(x) - at_zero).abs().max().item())
    ok = left == 0 and diff <= _tolerance(FADE_ATOL, at_zero)
    res = dict(status='pass' if ok else 'fail', shortcuts_left=left, max_abs_diff=diff)
    if not ok:
        res['reason'] = f'{left} shortcut additions left' if left else f'deployed twin differs by {diff:.3g}'
    return res, deployed


def _export_step(deployed: nn.Module, size: int) -> Dict:
    from .deploy.export import export_model  # onnx / onnxruntime load only when exporting
    deployed.eval()
    with torch.no_grad():
        atol = _tolerance(EXPORT_ATOL, deployed(torch.randn(2, *input_size_for(deployed, size))))
    with tempfile.TemporaryDirectory() as folder:
        report = export_model(deployed, folder, formats=('onnx',), input_size=size, atol=atol)
    fold = report['fold']
    return dict(status='pass', onnx_max_abs_error=report['files']['onnx']['max_abs_error'], tolerance=atol,
                fold_traced=fold['traced'], batchnorms_before=fold['batchnorms_before'],
                batchnorms_after=fold['batchnorms_after'], **({'fold_reason': fold['reason']} if 'reason' in fold else {}))


def _failure(e: Exception) -> Dict:
    kind = 'refused' if isinstance(e, REFUSALS) else 'crash'
    return dict(status=kind, error=type(e).__name__, reason=str(e)[:300])


def _off_init(model: nn.Module) -> nn.Module:
    """Every float weight and statistic of ``model`` moved off its initial value, in place (a trained teacher's are):
    zero biases, zero-initialised gains and unit BN statistics would let a twin that drops or keeps a wrong term
    (a scale, a bias) agree with the plain twin by accident."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if not tensor.is_floating_point():
                continue
            if name.endswith('running_var'):
                tensor.add_(torch.rand(tensor.shape, generator=generator) * 0.5)
                continue
            spread = float(tensor.std()) if tensor.numel() > 1 else 0.0
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1 * (spread or 1.0))
    return model


def check_recipe_path(arch: str, size: int = 64, batch: int = 2, export: bool = True,
                      seed: int = 0) -> Dict[str, Dict]:
    """Run the recipe path for ``arch`` (a residual timm architecture, or a torchvision one: ``torchvision:<name>``);
    one result dict per step of :data:`STEPS`, each with ``status`` ``pass`` / ``fail`` / ``refused`` / ``crash`` /
    ``skipped`` and its measurements. A step whose model an earlier step could not build is ``skipped``."""
    torch.manual_seed(seed)
    results: Dict[str, Dict] = {}
    fading: Optional[nn.Module] = None
    deployed: Optional[nn.Module] = None
    teacher = _off_init(create_named_model(arch, num_classes=10))
    chans, h, w = input_size_for(teacher, size)
    x = torch.randn(batch, chans, h, w)
    steps = [('fade', lambda: _fade_step(arch, teacher, x)),
             ('jointrd', lambda: (_jointrd_step(teacher, fading, x), None)),
             ('deploy', lambda: _deploy_step(arch, fading, x)),
             ('export', lambda: (_export_step(deployed, h), None))]
    for step, run in steps:
        if step == 'export' and not export:
            results[step] = dict(status='skipped', reason='not asked for')
            continue
        if (step in ('jointrd', 'deploy') and fading is None) or (step == 'export' and deployed is None):
            results[step] = dict(status='skipped', reason='an earlier step could not build its model')
            continue
        try:
            res, made = run()
        except Exception as e:  # noqa: BLE001 - recorded per step: a named refusal, or a crash with its message
            res, made = _failure(e), None
        results[step] = res
        if step == 'fade':
            fading = made
        elif step == 'deploy':
            deployed = made
    return results
