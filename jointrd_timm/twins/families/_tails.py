"""The end of a plain forward, shared by the families whose projection shortcut is timm's ``downsample``.

A plain block computes its residual branch as the teacher does and then, instead of ``branch + shortcut``, adds
only a projection that a rule kept (``downsample`` is None once removed). Mixed in before the timm block class,
so the methods read the block's own modules; TorchScript compiles them with the forward that calls them.
"""
import torch

__all__ = ['DownsampleTail']


class DownsampleTail:
    """Mixin for plain blocks whose projection shortcut is ``self.downsample``."""

    def _add_kept_projection(self, out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """``out + downsample(shortcut)`` when the projection was kept, else ``out``: the identity is gone."""
        if self.downsample is not None:
            out = out + self.downsample(shortcut)
        return out

    def _se_and_kept_projection(self, out: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """The block's squeeze-excite (``self.se``, None when absent) on ``out``, then the kept projection."""
        if self.se is not None:
            out = self.se(out)
        return self._add_kept_projection(out, shortcut)
