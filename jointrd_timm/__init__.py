"""jointrd-timm: shortcut-free twins of timm models, trained by Residual Distillation (JointRD).

Importing the package registers the ``plain_*`` twins and the CIFAR teachers in timm. When torchdistill is
already imported (a torchdistill YAML listing ``dependencies: [{name: jointrd_timm}]``), it also registers
jointrd_timm's models, losses and processes there; ``import jointrd_timm.integrations.torchdistill`` does it
explicitly. (torchdistill is not imported otherwise: importing it costs seconds.)
"""
import sys

from .twins import (NotResidualError, UnsupportedBlockError, check_graph_rule, count_shortcut_additions, make_plain,
                    register_graph_rule)
from .twins.dirac import apply_dirac, fold_dirac
from .twins.fade import deployable, finish_fade, is_fading, make_fading, set_shortcut_scale, shortcut_scales
from .twins.transfer import load_teacher_weights
from . import models  # noqa: F401  (timm registration)

if 'torchdistill' in sys.modules:
    from .integrations import torchdistill as _torchdistill  # noqa: F401

__version__ = '0.1.0'
__all__ = ['make_plain', 'load_teacher_weights', 'apply_dirac', 'fold_dirac', 'count_shortcut_additions', 'deployable',
           'register_graph_rule', 'check_graph_rule', 'make_fading', 'set_shortcut_scale', 'shortcut_scales',
           'finish_fade', 'is_fading', 'NotResidualError', 'UnsupportedBlockError']
