"""timm registrations: the CIFAR teachers, then the plain_* twin of every residual architecture."""
from . import cifar_resnet
from .catalogue import register_timm_tags

register_timm_tags()  # registry entries of timm's own architectures, before the twins take their teachers' tags
from . import plain_twins  # noqa: E402
