"""Whether a timm architecture gets a shortcut-free twin, and why not: built on the meta device (no memory, no
weights) and handed to ``make_plain(strict=True)``.

Used by ``benchmarks/twin_coverage.py`` (every architecture of timm) and by ``python -m
jointrd_timm.models.underivable``, which writes the list of architectures that ``models.plain_twins`` must not
register as ``plain_*``.
"""
import timm
import torch

from .derive import NotResidualError, UnsupportedBlockError, make_plain
from .verify import count_shortcut_additions, find_unhandled_residual_blocks, shortcut_additions

__all__ = ['classify', 'DERIVED']

DERIVED = 'derived'


def classify(name: str) -> dict:
    """``status`` ('derived', 'not residual', 'transformer (refused)', 'no rule', 'build failed') and ``reason``, or
    for a derived twin its shortcut counts, parameters and the rules used."""
    try:
        with torch.device('meta'):
            model = timm.create_model(name)
    except Exception as e:  # noqa: BLE001 - recorded as the reason
        return dict(status='build failed', reason=f'{type(e).__name__}: {e}'[:200])
    before = sum(shortcut_additions(m) or 0 for _, m in model.named_modules())
    try:
        make_plain(model, strict=True)
    except NotResidualError:
        return dict(status='not residual', reason='no shortcut addition found')
    except UnsupportedBlockError as e:
        transformer = 'refused by design' in str(e)
        return dict(status='transformer (refused)' if transformer else 'no rule', reason=str(e).split(': ', 1)[1][:300])
    if not before and not model.plain_report.shortcuts_removed:  # rule-known blocks, none of them residual here
        return dict(status='not residual', reason='no shortcut addition found')
    left = count_shortcut_additions(model) + len(find_unhandled_residual_blocks(model))
    if left:
        return dict(status='no rule', reason=f'{left} shortcut additions left after the rules')
    params = sum(p.numel() for p in model.parameters())
    return dict(status=DERIVED, shortcuts_removed=model.plain_report.shortcuts_removed, additions_found=before,
                params=params, rules=sorted(model.plain_report.blocks_by_rule))
