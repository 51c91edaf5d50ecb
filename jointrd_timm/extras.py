"""Optional dependencies, each behind a named extra of the package, with one error that says how to get it.

    pip install 'jointrd-timm[deploy]'   # onnx, onnxruntime, onnxscript: ONNX export and its latency backend
    pip install 'jointrd-timm[plots]'    # matplotlib: the demo's and the benchmarks' plots
    pip install 'jointrd-timm[demo]'     # scikit-learn (the embedded 8x8 digits) + plots: `jointrd demo`
"""
import importlib
from types import ModuleType

from .errors import JointRDError

__all__ = ['require', 'MissingExtraError', 'EXTRAS']

# module -> the extra that installs it
EXTRAS = {'onnx': 'deploy', 'onnxruntime': 'deploy', 'onnxscript': 'deploy', 'matplotlib': 'plots',
          'sklearn': 'demo'}


class MissingExtraError(JointRDError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """``import module``, or a :class:`MissingExtraError` naming ``purpose`` and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split('.')[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'jointrd-timm[{extra}]'" if extra else f'pip install {top}'
        raise MissingExtraError(f'{purpose} needs {top}, which is not installed: {hint}.') from e
