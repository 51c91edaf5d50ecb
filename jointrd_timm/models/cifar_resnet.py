"""CIFAR-sized residual teachers, registered in timm (their twins come from the same rules as every ResNet).

* ``resnet20/32/44/56/110_cifar``: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2:
  3x3 stem of 16 channels, three stages of 16/32/64 channels with n BasicBlocks each (depth 6n+2).
  DECISION: the width-changing shortcuts are 1x1 conv + BN projections (the paper's option B, timm's
  ``downsample``), not zero-padded identities (option A), so one rule set serves these and ImageNet ResNets.
* ``resnet18/34/50_cifar``: the ImageNet ResNets with a 3x3 stride-1 stem and no max-pool, as in the JointRD
  CIFAR experiments (Li et al., NeurIPS 2020).
* ``wide_resnet{depth}_{k}_cifar``: Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: widths 16k/32k/64k,
  (depth - 4) / 6 blocks per stage; the pairs of Xu et al. 2017 (teacher WRN-40-10, student WRN-10-4).
  DECISION: timm's post-activation BasicBlocks (one block family for every CIFAR net here), not WRN's pre-activation.

The blocks are timm's own (timm.models.resnet.BasicBlock / Bottleneck), built by timm's ``make_blocks``.
``norm_layer`` takes timm's norm names ('batchnorm2d' default, 'groupnorm1', ...): a BatchNorm-free variant
makes multi-process CPU runs comparable with one process (SyncBatchNorm needs CUDA).
"""
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from timm.layers import create_classifier, get_device_dtype, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, make_blocks

from .catalogue import tag_cfgs

__all__ = ['CifarResNet']


def intermediate_indices(
        num_features: int, indices: Optional[Union[int, List[int]]] = None) -> Tuple[List[int], int]:
    """timm's convention for intermediate features: ``None`` takes all ``num_features``, an int ``n`` the last
    ``n``, a list those indices (negative ones count from the end); returns them and the largest."""
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f'last-n ({indices}) is out of range (1 to {num_features})')
        taken = list(range(num_features - indices, num_features))
    else:
        taken = [num_features + i if i < 0 else i for i in indices]
        for i in taken:
            if not 0 <= i < num_features:
                raise ValueError(f'feature index {i} is out of range (0 to {num_features - 1})')
    return taken, max(taken)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stride-1 stem, no max-pool, ``len(channels)`` stages of timm blocks."""

    def __init__(
            self,
            block: Union[type, str] = 'basic',
            layers: Tuple[int, ...] = (9, 9, 9),
            channels: Tuple[int, ...] = (16, 32, 64),
            stem_width: int = 16,
            num_classes: int = 10,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            norm_layer: str = 'batchnorm2d',
            device=None,
            dtype=None,
    ):
        super().__init__()
        norm = get_norm_layer(norm_layer)
        block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[block] if isinstance(block, str) else block
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        stages, stage_info = make_blocks(
            (block_cls,) * len(channels), channels, layers, stem_width, drop_path_rate=drop_path_rate,
            norm_layer=norm)
        if len(stages) not in (3, 4):
            raise ValueError(f'CifarResNet has 3 or 4 stages, got {len(stages)} (layers={layers}).')
        self.stage_names = [name for name, _ in stages]
        for name, stage in stages:
            self.add_module(name, stage)
        if len(stages) == 3:
            self.layer4 = None  # explicit, so forward_features stays TorchScript-able
        # make_blocks counts from an ImageNet stem (stride 4); this stem has stride 1
        self.feature_info = [dict(num_chs=stem_width, reduction=1, module='act1')] + [
            dict(info, reduction=info['reduction'] // 4) for info in stage_info]
        self.num_features = channels[-1] * block_cls.expansion
        # timm's head: no flattening without pooling, 'catavgmax' doubles the classifier's input
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()
        if device is not None or dtype is not None:  # timm's create_model(..., device=, dtype=)
            self.to(device=device, dtype=dtype)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r'^conv1|bn1', blocks=r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """As timm's ResNet: None keeps the current pooling; the new head on the model's device and dtype."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool,
                                                      **get_device_dtype(self))
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def _stages(self) -> List[nn.Module]:
        return [getattr(self, name) for name in self.stage_names]

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ):
        """Stem and stage outputs (indices into ``feature_info``), as timm's ResNet returns them."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        take_indices, max_index = intermediate_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        stages = self._stages()
        if stop_early:
            stages = stages[:max_index]
        for idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take_indices, max_index = intermediate_indices(len(self.feature_info), indices)
        for name in self.stage_names[max_index:]:
            setattr(self, name, nn.Identity())
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        if self.layer4 is not None:
            x = self.layer4(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = nn.functional.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    n_stages = len(kwargs['layers'])
    return build_model_with_cfg(
        CifarResNet, variant, pretrained, feature_cfg=dict(out_indices=tuple(range(n_stages + 1))), **kwargs)


def _cfg(pool: int, **kwargs):
    return dict(
        url='', num_classes=10, input_size=(3, 32, 32), pool_size=(pool, pool), crop_pct=1.0, interpolation='bilinear',
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), first_conv='conv1', classifier='fc',
        license='apache-2.0', **kwargs)


WIDE = {'wide_resnet40_10_cifar': (40, 10), 'wide_resnet16_4_cifar': (16, 4), 'wide_resnet10_4_cifar': (10, 4)}

_BASE = {**{f'resnet{depth}_cifar': _cfg(8) for depth in (20, 32, 44, 56, 110)}, **{name: _cfg(8) for name in WIDE},
         **{f'resnet{depth}_cifar': _cfg(4) for depth in (18, 34, 50)}}
# published weights (registry/) first: timm makes the first tag the default of pretrained=True
default_cfgs = generate_default_cfgs(
    {name: cfg for arch, base in _BASE.items() for name, cfg in {**tag_cfgs(arch, base), arch: base}.items()})


def _he_cifar(variant: str, depth: int, pretrained: bool, **kwargs) -> CifarResNet:
    n = (depth - 2) // 6
    args = dict(block='basic', layers=(n, n, n), channels=(16, 32, 64), stem_width=16)
    return _create(variant, pretrained, **dict(args, **kwargs))


def _imagenet_layout(variant: str, block: str, layers, pretrained: bool, **kwargs) -> CifarResNet:
    args = dict(block=block, layers=layers, channels=(64, 128, 256, 512), stem_width=64)
    return _create(variant, pretrained, **dict(args, **kwargs))


@register_model
def resnet20_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """ResNet-20 for CIFAR (He et al. 2016): 3 x 3 BasicBlocks, 16/32/64 channels."""
    return _he_cifar('resnet20_cifar', 20, pretrained, **kwargs)


@register_model
def resnet32_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """ResNet-32 for CIFAR (He et al. 2016): 3 x 5 BasicBlocks."""
    return _he_cifar('resnet32_cifar', 32, pretrained, **kwargs)


@register_model
def resnet44_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """ResNet-44 for CIFAR (He et al. 2016): 3 x 7 BasicBlocks."""
    return _he_cifar('resnet44_cifar', 44, pretrained, **kwargs)


@register_model
def resnet56_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """ResNet-56 for CIFAR (He et al. 2016): 3 x 9 BasicBlocks."""
    return _he_cifar('resnet56_cifar', 56, pretrained, **kwargs)


@register_model
def resnet110_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """ResNet-110 for CIFAR (He et al. 2016): 3 x 18 BasicBlocks."""
    return _he_cifar('resnet110_cifar', 110, pretrained, **kwargs)


@register_model
def resnet18_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool (JointRD's CIFAR ResNet-18)."""
    return _imagenet_layout('resnet18_cifar', 'basic', (2, 2, 2, 2), pretrained, **kwargs)


@register_model
def resnet34_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """ResNet-34 with a 3x3 stride-1 stem and no max-pool."""
    return _imagenet_layout('resnet34_cifar', 'basic', (3, 4, 6, 3), pretrained, **kwargs)


@register_model
def resnet50_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """ResNet-50 with a 3x3 stride-1 stem and no max-pool."""
    return _imagenet_layout('resnet50_cifar', 'bottleneck', (3, 4, 6, 3), pretrained, **kwargs)


def _wide(variant: str, pretrained: bool, **kwargs) -> CifarResNet:
    depth, k = WIDE[variant]
    n = (depth - 4) // 6
    args = dict(block='basic', layers=(n, n, n), channels=(16 * k, 32 * k, 64 * k), stem_width=16)
    return _create(variant, pretrained, **dict(args, **kwargs))


@register_model
def wide_resnet40_10_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """WRN-40-10 for CIFAR (Xu et al. 2017's teacher): 3 x 6 BasicBlocks, 160/320/640 channels."""
    return _wide('wide_resnet40_10_cifar', pretrained, **kwargs)


@register_model
def wide_resnet16_4_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """WRN-16-4 for CIFAR: 3 x 2 BasicBlocks, 64/128/256 channels."""
    return _wide('wide_resnet16_4_cifar', pretrained, **kwargs)


@register_model
def wide_resnet10_4_cifar(pretrained=False, **kwargs) -> CifarResNet:
    """WRN-10-4 for CIFAR (Xu et al. 2017's student): 3 x 1 BasicBlocks, 64/128/256 channels."""
    return _wide('wide_resnet10_4_cifar', pretrained, **kwargs)
