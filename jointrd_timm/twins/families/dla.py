"""timm.models.dla (Yu et al., "Deep Layer Aggregation", CVPR 2018). DECISION: the residual additions go
(block shortcuts, the tree's projected shortcut, the roots' ``shortcut`` flag); the aggregation by
concatenation, which is the architecture itself, stays. ``DlaTree.project`` only feeds shortcuts, so it is
removed unless a projection is kept."""
from typing import List, Optional

import torch
from timm.models.dla import DlaBasic, DlaBottle2neck, DlaBottleneck, DlaRoot, DlaTree

from ..rules import swap_rule, switch_rule


class PlainDlaBasic(DlaBasic):
    shortcut_projection = None

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if shortcut is not None:
            out = out + shortcut
        return self.relu(out)


class PlainDlaBottleneck(DlaBottleneck):
    shortcut_projection = None

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if shortcut is not None:
            out = out + shortcut
        return self.relu(out)


class PlainDlaBottle2neck(DlaBottle2neck):
    shortcut_projection = None

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        out = self.relu(self.bn1(self.conv1(x)))
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
        out = self.bn3(self.conv3(torch.cat(spo, 1)))
        if shortcut is not None:
            out = out + shortcut
        return self.relu(out)


class PlainDlaTree(DlaTree):
    """A tree whose first child receives a shortcut only when a projection (``project``) was kept."""

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        if children is None:
            children = []
        bottom = self.downsample(x)
        projected: Optional[torch.Tensor] = None
        if self.project is not None:
            projected = self.project(bottom)
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, projected)
        if self.root is not None:
            x2 = self.tree2(x1)
            x = self.root([x2, x1] + children)
        else:
            children.append(x1)
            x = self.tree2(x1, None, children)
        return x


# The leaf blocks have no projection of their own: the tree hands them one (or None once plain).
for _block, _plain in ((DlaBasic, PlainDlaBasic), (DlaBottleneck, PlainDlaBottleneck),
                       (DlaBottle2neck, PlainDlaBottle2neck)):
    swap_rule(_block, _plain, 'shortcut_projection')
swap_rule(DlaTree, PlainDlaTree, 'project')
switch_rule(DlaRoot, 'shortcut', False)
