"""timm.models.dla (Yu et al., "Deep Layer Aggregation", CVPR 2018). DECISION: the residual additions go
(block shortcuts, the tree's projected shortcut, the roots' ``shortcut`` flag); the aggregation by
concatenation, which is the architecture itself, stays. ``DlaTree.project`` only feeds shortcuts, so it is
removed unless a projection is kept."""
from typing import List, Optional

import torch
from timm.models.dla import DlaBasic, DlaBottle2neck, DlaBottleneck, DlaRoot, DlaTree

from ..rules import hand_projection, swap_rule, switch_rule
from .res2net import Res2NetScales


class _PlainDlaLeaf:
    """A leaf block's forward: its branch (``_branch``), plus the shortcut only when the tree hands it a kept
    projection (the leaf's own identity default is gone), then ReLU."""
    shortcut_projection = None

    def forward(self, x, shortcut: Optional[torch.Tensor] = None, children: Optional[List[torch.Tensor]] = None):
        out = self._branch(x)
        if shortcut is not None:
            out = out + shortcut
        return self.relu(out)


class PlainDlaBasic(_PlainDlaLeaf, DlaBasic):
    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))


class PlainDlaBottleneck(_PlainDlaLeaf, DlaBottleneck):
    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


class PlainDlaBottle2neck(_PlainDlaLeaf, Res2NetScales, DlaBottle2neck):
    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn3(self.conv3(self._multi_scale(out)))


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
hand_projection(DlaTree, 'project', 'tree1')
switch_rule(DlaRoot, 'shortcut', False)
