"""One module per timm family (and torchvision's residual blocks); importing this package registers every rule."""
from . import byobnet, convnext, cspnet, dla, efficientnet, nfnet, regnet, res2net, resnest, resnet, resnetv2, senet, sknet
from . import graph  # noqa: E402  (after the hand-written rules: graph rules only for classes they leave)
from . import torchvision  # noqa: E402  (torchvision's blocks, graph rules too)

FAMILIES = ('resnet', 'resnetv2', 'regnet', 'efficientnet', 'convnext', 'byobnet', 'cspnet', 'res2net', 'resnest',
            'sknet', 'nfnet', 'dla', 'senet', 'graph', 'torchvision')
