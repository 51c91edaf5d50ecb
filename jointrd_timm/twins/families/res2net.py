"""timm.models.res2net (Gao et al., "Res2Net", TPAMI 2019). DECISION: the block-level shortcut goes; the
hierarchical additions between the scale groups inside the block (``sp = sp + spx[i]``) are part of the
multi-scale convolution, not a shortcut around it, and stay."""
from typing import List

import torch
from timm.models.res2net import Bottle2neck

from ..rules import swap_rule


class PlainBottle2neck(Bottle2neck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        spx = torch.split(out, self.width, 1)
        spo: List[torch.Tensor] = []
        sp = spx[0]
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            if i == 0 or self.is_first:
                sp = spx[i]
            else:
                sp = sp + spx[i]
            sp = conv(sp)
            sp = bn(sp)
            sp = self.relu(sp)
            spo.append(sp)
        if self.scale > 1:
            if self.pool is not None:
                spo.append(self.pool(spx[-1]))
            else:
                spo.append(spx[-1])
        out = torch.cat(spo, 1)
        out = self.drop_block(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.se is not None:
            out = self.se(out)
        if self.downsample is not None:
            out = out + self.downsample(x)
        return self.relu(out)


swap_rule(Bottle2neck, PlainBottle2neck, 'downsample')
