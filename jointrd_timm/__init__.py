"""jointrd-timm: shortcut-free twins of timm models, trained by Residual Distillation (JointRD).

Importing the package registers the ``plain_*`` twins and the CIFAR teachers in timm.
"""
from .twins import count_shortcut_additions, make_plain
from .twins.dirac import apply_dirac, fold_dirac
from .twins.transfer import load_teacher_weights
from . import models  # noqa: F401  (timm registration)

__version__ = '0.1.0'
__all__ = ['make_plain', 'load_teacher_weights', 'apply_dirac', 'fold_dirac', 'count_shortcut_additions']
