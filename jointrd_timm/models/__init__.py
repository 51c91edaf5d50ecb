"""timm registrations: the CIFAR teachers, then the plain_* twin of every residual architecture."""
from . import cifar_resnet, plain_twins
