"""jointrd_timm uses timm through its public names; the one exception is a module that says why."""
import ast

import pytest

from conftest import ROOT

# timm keeps the EfficientNet block classes in a private module only (see the module's docstring)
ALLOWED = {'jointrd_timm/twins/_timm_compat.py'}


def _private_timm_imports(path):
    """(line, dotted name) for each import of a private timm module (a part starting with '_') at ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module] + [f'{node.module}.{alias.name}' for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split('.')
            if parts[0] == 'timm' and any(part.startswith('_') for part in parts[1:]):
                yield node.lineno, name
                break


def test_no_private_timm_import_outside_the_compat_module():
    found = []
    for path in sorted((ROOT / 'jointrd_timm').rglob('*.py')):
        rel = path.relative_to(ROOT).as_posix()
        found += [f'{rel}:{line} imports {name}' for line, name in _private_timm_imports(path) if rel not in ALLOWED]
    assert not found, 'use timm\'s public names (timm.models, timm.layers, timm.models.<family>):\n' + '\n'.join(found)


def test_no_private_timm_attribute_outside_the_compat_module():
    """``timm.models._builder.x`` written as an attribute chain is as private as an import."""
    found = []
    for path in sorted((ROOT / 'jointrd_timm').rglob('*.py')):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if 'timm.models._' in line or 'timm.layers._' in line:
                found.append(f'{rel}:{number}: {line.strip()}')
    assert not found, '\n'.join(found)


def test_the_check_sees_a_private_import(tmp_path):
    source = tmp_path / 'm.py'
    source.write_text('from timm.models._builder import build_model_with_cfg\nfrom timm.models import resnet\n'
                      'import timm.layers._fx\nfrom timm.models import _registry\n')
    assert [line for line, _ in _private_timm_imports(source)] == [1, 3, 4]


@pytest.mark.parametrize('path', sorted(ALLOWED))
def test_the_allowed_module_exists_and_says_why(path):
    text = (ROOT / path).read_text()
    assert list(_private_timm_imports(ROOT / path)), f'{path} imports nothing private: drop it from ALLOWED'
    assert 'private in timm' in text
