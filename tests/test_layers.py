"""Layers point one way (docs/design.md): a module imports only from its own package or from packages below it,
lazy imports inside functions included."""
import ast

from conftest import ROOT

# bottom to top; a name is a package of jointrd_timm (or one of its top-level modules)
LAYERS = [('errors', 'io', 'extras', 'faults'), ('twins',), ('models',), ('methods',), ('settings', 'recipes'), ('deploy', 'coverage'), ('integrations',),
          ('training',), ('cli', 'timm_script')]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(parts):
    """The layer unit of a module path inside jointrd_timm (its package, or the top-level module)."""
    return parts[0] if parts else None


def _imports(path):
    """(unit imported, line) for every jointrd_timm import of the module at ``path``."""
    parts = path.relative_to(ROOT / 'jointrd_timm').with_suffix('').parts
    package = parts[:-1] if path.name != '__init__.py' else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1]) if node.level > 1 else list(package)
                target = base + (node.module.split('.') if node.module else [])
                if not node.module:  # from .. import x
                    yield from ((_unit(target + [alias.name]), node.lineno) for alias in node.names)
                    continue
            elif node.module and node.module.split('.')[0] == 'jointrd_timm':
                target = node.module.split('.')[1:]
                if not target:
                    yield from ((_unit([alias.name]), node.lineno) for alias in node.names)
                    continue
            else:
                continue
            yield _unit(target), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'jointrd_timm' and len(alias.name.split('.')) > 1:
                    yield _unit(alias.name.split('.')[1:]), node.lineno


def test_every_unit_has_a_layer():
    units = {p.relative_to(ROOT / 'jointrd_timm').parts[0].removesuffix('.py') for p in
             (ROOT / 'jointrd_timm').iterdir() if p.name != '__pycache__' and p.name != '__init__.py'
             and (p.is_dir() or p.suffix == '.py')}
    assert units - set(RANK) == set(), 'add the new package or module to LAYERS (and to docs/design.md)'


def test_no_module_imports_a_layer_above_it():
    upward = []
    for path in sorted((ROOT / 'jointrd_timm').rglob('*.py')):
        rel = path.relative_to(ROOT / 'jointrd_timm')
        if rel.parts == ('__init__.py',):  # the package's public face re-exports from every layer
            continue
        source = _unit(rel.with_suffix('').parts)
        for target, line in _imports(path):
            if target in RANK and RANK[target] > RANK[source]:
                upward.append(f'{rel}:{line} ({source}) imports {target}')
    assert not upward, 'imports against the layer order:\n' + '\n'.join(upward)
