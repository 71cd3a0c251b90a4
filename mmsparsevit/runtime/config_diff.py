# Copyright (c) mmsparsevit contributors. All rights reserved.
"""What a change to a config amounts to, written the way a config file would say it.

The tools compare the config before and after :mod:`.hardening` rather than have each
hardening step report itself, so the log shows exactly what changed, including whatever a
future step forgets to mention.
"""
import difflib
from typing import Any, List

__all__ = ['config_changes']


def _format(value: Any) -> str:
    """Write a config value as config code: ``dict(type='X', n=1)``, ``[...]``, ``'text'``."""
    if isinstance(value, dict):
        if all(isinstance(name, str) and name.isidentifier() for name in value):
            return f'dict({", ".join(f"{k}={_format(v)}" for k, v in value.items())})'
        return f'{{{", ".join(f"{k!r}: {_format(v)}" for k, v in value.items())}}}'
    if isinstance(value, list):
        return f'[{", ".join(map(_format, value))}]'
    if isinstance(value, tuple):
        return f'({", ".join(map(_format, value))}{"," if len(value) == 1 else ""})'
    if isinstance(value, type):
        return value.__name__
    return repr(value)


def config_changes(before: Any, after: Any, key: str = '') -> List[str]:
    """The changes that turn ``before`` into ``after``, one statement each.

    Statements read like config code: ``a.b = v`` (a new key), ``a.b = v  # was w`` (a
    replaced value), ``a.b += [v, ...]`` (appended to a list), ``a.b.insert(i, v)`` (inserted
    at index ``i`` of the new list), ``del a.b`` (a removed key). Dicts are compared key by key
    and lists element by element, so a change deep inside is named by its full key.

    Args:
        before: A config as plain data (``Config.to_dict()``).
        after: The changed config as plain data.
        key (str): The key of ``before`` and ``after`` in the config. Defaults to '' (the
            whole config).

    Returns:
        list[str]: The statements, in the order of ``after``'s keys; empty when nothing
        changed.
    """
    if isinstance(before, dict) and isinstance(after, dict):
        changes = []
        for name, value in after.items():
            child = f'{key}.{name}' if key else str(name)
            if name in before:
                changes += config_changes(before[name], value, child)
            else:
                changes.append(f'{child} = {_format(value)}')
        return changes + [
            f'del {key}.{name}' if key else f'del {name}' for name in before if name not in after
        ]
    if isinstance(before, list) and isinstance(after, list):
        return _list_changes(before, after, key)
    if before == after:
        return []
    return [f'{key} = {_format(after)}  # was {_format(before)}']


def _list_changes(before: list, after: list, key: str) -> List[str]:
    shown_before = [_format(value) for value in before]
    shown_after = [_format(value) for value in after]
    changes: List[str] = []
    matcher = difflib.SequenceMatcher(a=shown_before, b=shown_after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == 'equal':
            continue
        if tag == 'insert' and i1 == len(before):
            changes.append(f'{key} += [{", ".join(shown_after[j1:j2])}]')
        elif tag == 'insert':
            changes += [f'{key}.insert({j}, {shown_after[j]})' for j in range(j1, j2)]
        elif tag == 'replace' and i2 - i1 == j2 - j1:
            for offset in range(i2 - i1):
                changes += config_changes(before[i1 + offset], after[j1 + offset],
                                          f'{key}[{j1 + offset}]')
        else:  # elements removed: the list as a whole says it more plainly
            return [f'{key} = {_format(after)}  # was {_format(before)}']
    return changes
