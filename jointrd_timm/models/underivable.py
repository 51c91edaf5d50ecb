"""Writes ``underivable.json``: the architectures of ``plain_twins.TWIN_MODULES`` whose twin does not derive
(``twins.coverage.classify``), with the reason. ``plain_twins`` does not register them as ``plain_*``.

    python -m jointrd_timm.models.underivable          # after a rule, a classifier or a timm change

tests/test_underivable.py checks that every entry still refuses with its recorded reason and (slow) that the file is
what this script writes.
"""
import json
from pathlib import Path
from typing import Dict

import timm

from ..twins.coverage import DERIVED, classify

__all__ = ['PATH', 'underivable', 'main']

PATH = Path(__file__).with_name('underivable.json')


def twin_module_architectures(modules) -> list:
    """Every architecture that timm registers in one of ``modules`` (timm's public module index)."""
    return sorted({name for module in modules for name in timm.list_models(module=module)})


def underivable(names) -> Dict[str, str]:
    """name -> reason, for the names whose twin does not derive."""
    found = {}
    for name in names:
        result = classify(name)
        if result['status'] != DERIVED:
            found[name] = result['reason']
    return found


def main() -> None:
    from .plain_twins import PREFIX, TWIN_MODULES
    names = [n for n in twin_module_architectures(TWIN_MODULES) if not n.startswith(PREFIX)]
    PATH.write_text(json.dumps(underivable(names), indent=1, sort_keys=True))


if __name__ == '__main__':
    main()
