"""timm.models.res2net (Gao et al., "Res2Net", TPAMI 2019). DECISION: the block-level shortcut goes; the
hierarchical additions between the scale groups inside the block (``sp = sp + spx[i]``) are part of the
multi-scale convolution, not a shortcut around it, and stay."""
from typing import List

import torch
from timm.models.res2net import Bottle2neck

from ..rules import swap_rule
from ._tails import DownsampleTail


class Res2NetScales:
    """Mixin: the multi-scale middle of a Res2Net block, as timm writes it (also DLA's ``DlaBottle2neck``)."""

    def _multi_scale(self, out: torch.Tensor) -> torch.Tensor:
        """3x3 conv-bn-relu over each of ``scale`` width groups, each group after the first also fed the previous
        group's output; the last group pooled (first block of a stage) or passed on; concatenated."""
        spx = torch.split(out, self.width, 1)
        spo: List[torch.Tensor] = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            if i == 0 or self.is_first:
                sp = spx[i]
            else:
                sp = sp + spx[i]
            sp = self.relu(bn(conv(sp)))
            spo.append(sp)
        if self.scale > 1:
            if self.pool is not None:
                spo.append(self.pool(spx[-1]))
            else:
                spo.append(spx[-1])
        return torch.cat(spo, 1)


class PlainBottle2neck(Res2NetScales, DownsampleTail, Bottle2neck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.drop_block(self._multi_scale(out))))
        return self.relu(self._se_and_kept_projection(out, x))


swap_rule(Bottle2neck, PlainBottle2neck, 'downsample')
