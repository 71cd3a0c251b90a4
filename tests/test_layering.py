# Copyright (c) mmsparsevit contributors. All rights reserved.
"""No module of the package imports from a layer above its own (README, "Development")."""
import ast
from pathlib import Path
from typing import Iterator, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / 'mmsparsevit'
# The leaves import nothing of ours; every layer may import them.
LEAVES = {'registry', 'version'}
# What each layer may import besides itself and the leaves. Nothing may import the runtime.
ALLOWED = {
    'utils': set(),
    'models': {'utils'},
    'datasets': {'models', 'utils'},
    'engine': {'datasets', 'models', 'utils'},
    'apis': {'engine', 'models', 'utils'},
    'runtime': {'apis', 'engine', 'datasets', 'models', 'utils'},
    '__init__': {'utils'},
    **{leaf: set() for leaf in LEAVES},
}


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix('.py')


def _module_name(path: Path) -> str:
    parts = ('mmsparsevit', ) + path.relative_to(PACKAGE).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_layers(path: Path) -> Iterator[Tuple[int, str, str]]:
    """``(line, imported module, its layer)`` of every import of ours in ``path``, those inside
    functions included."""
    package = _module_name(path)
    if path.name != '__init__.py':
        package = package.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit('.', node.level - 1)[0] if node.level else ''
            module = '.'.join(part for part in (base, node.module) if part)
            # `from mmsparsevit import utils` or `from . import x` name the layer in `names`.
            targets = ([f'{module}.{alias.name}' for alias in node.names]
                       if module == 'mmsparsevit' else [module])
        else:
            continue
        for target in targets:
            parts = target.split('.')
            if parts[0] == 'mmsparsevit' and len(parts) > 1:
                yield node.lineno, target, parts[1]


def test_every_module_imports_only_from_its_layer_or_below():
    violations, edges = [], set()
    for path in sorted(PACKAGE.rglob('*.py')):
        layer = _layer(path)
        assert layer in ALLOWED, f'{path}: layer {layer!r} is not in the map; add it'
        for line, target, imported in imported_layers(path):
            edges.add((layer, imported))
            if imported not in ALLOWED[layer] | LEAVES | {layer}:
                violations.append(f'{path.relative_to(PACKAGE.parent)}:{line} imports {target} '
                                  f'({layer} may import {sorted(ALLOWED[layer])})')
    assert violations == []
    # The walk sees relative imports, absolute ones and those of the package root.
    assert {('runtime', 'engine'), ('engine', 'models'), ('models', 'utils'),
            ('models', 'registry'), ('__init__', 'utils')} <= edges
