"""An unpickler that rebuilds tensors and allow-listed objects and nothing that runs code.

Passed to :func:`torch.load` as its ``pickle_module``. It differs from torch's
``weights_only`` unpickler in one way: an object of a class that is *not* on the allow-list is
not refused but kept as an inert :class:`ForeignObject` (the class is never imported, none of
its code runs), so that the authors' training checkpoints, which pickle an
``argparse.Namespace`` or a yacs ``CfgNode`` next to the weights, give up their tensors.
Everything that would *call* something outside the allow-list (``os.system``, ``exec``, a
foreign class's constructor) is refused, wherever it sits in the file.

The allow-list is torch's own ``weights_only`` list plus what
:func:`torch.serialization.add_safe_globals` registered (mmsparsevit registers mmengine's
checkpoint classes), read at each load.
"""
import _compat_pickle
import pickle
from collections import Counter, OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from torch import _weights_only_unpickler

__all__ = ['ForeignObject', 'Unpickler', 'UnsafeCheckpointError', 'find_foreign_objects', 'load']


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asks to call (or modify) something outside the allow-list."""


class ForeignClass:
    """A global that is not on the allow-list, by name only: it is never imported."""

    __slots__ = ('qualified_name', )

    def __init__(self, qualified_name: str) -> None:
        self.qualified_name = qualified_name

    def __repr__(self) -> str:
        return self.qualified_name


class ForeignObject:
    """Inert stand-in for an instance of a class that is not on the allow-list.

    It holds what the file said about the instance, as plain data: ``args`` given to
    ``__new__``, the pickled ``state`` (usually the instance's ``__dict__``), and the items of a
    dict or list subclass.
    """

    def __init__(self, qualified_name: str, args: tuple = (),
                 kwargs: Optional[dict] = None) -> None:
        self.qualified_name = qualified_name
        self.args = args
        self.kwargs = kwargs or {}
        self.state: Any = None
        self.items: Dict[Any, Any] = {}
        self.list_items: List[Any] = []

    def __repr__(self) -> str:
        return f'<not reconstructed: {self.qualified_name}>'


def _allowed_globals() -> Dict[str, Any]:
    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    allowed.update(_weights_only_unpickler._get_user_allowed_globals())
    return allowed


def _describe(obj: Any) -> str:
    if isinstance(obj, (ForeignClass, ForeignObject)):
        return obj.qualified_name
    name = getattr(obj, '__qualname__', None)
    if name is not None:
        return f'{getattr(obj, "__module__", "?")}.{name}'
    return f'an object of type {type(obj).__module__}.{type(obj).__qualname__}'


# copyreg._reconstructor is how protocols 0 and 1 pickle an instance of a plain class.
_RECONSTRUCTOR = 'copyreg._reconstructor'


class Unpickler(pickle._Unpickler):
    """Pure-Python unpickler whose every code-reaching opcode checks the allow-list."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._allowed = _allowed_globals()
        self._allowed_ids = {id(obj) for obj in self._allowed.values()}
        self._foreign: Dict[str, ForeignClass] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        qualified_name = f'{module}.{name}'
        if qualified_name in self._allowed:
            return self._allowed[qualified_name]
        if qualified_name not in self._foreign:
            self._foreign[qualified_name] = ForeignClass(qualified_name)
        return self._foreign[qualified_name]

    def _is_allowed(self, obj: Any) -> bool:
        return id(obj) in self._allowed_ids

    def _refuse(self, action: str, obj: Any) -> None:
        raise UnsafeCheckpointError(f'{action} {_describe(obj)}')

    def _call(self, func: Any, args: tuple) -> Any:
        if getattr(func, 'qualified_name', None) == _RECONSTRUCTOR and len(args) == 3 \
                and isinstance(args[0], ForeignClass):
            obj = ForeignObject(args[0].qualified_name)
            obj.state = args[2]
            return obj
        if not self._is_allowed(func) or isinstance(func, ForeignClass):
            self._refuse('a call of', func)
        return func(*args)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], args)

    def _instantiate(self, klass: Any, args: list) -> None:
        self.append(self._call(klass, tuple(args)))

    def _new(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        if isinstance(cls, ForeignClass):
            return ForeignObject(cls.qualified_name, args, kwargs)
        if not (isinstance(cls, type) and self._is_allowed(cls)):
            self._refuse('creating an instance of', cls)
        return cls.__new__(cls, *args, **kwargs)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))

    def load_build(self) -> None:
        inst = self.stack[-2]
        if isinstance(inst, ForeignObject):
            inst.state = self.stack.pop()
            return
        if not self._is_allowed(type(inst)):
            self._refuse('setting the state of', inst)
        super().load_build()

    def _container(self, kinds: Tuple[type, ...], action: str) -> Any:
        target = self.stack[-1]
        if not (isinstance(target, ForeignObject) or type(target) in kinds):
            self._refuse(action, target)
        return target

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self._container((list, ), 'appending to')
        (target.list_items if isinstance(target, ForeignObject) else target).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self._container((list, ), 'appending to')
        (target.list_items if isinstance(target, ForeignObject) else target).extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self._container((dict, OrderedDict, Counter), 'setting items of')
        (target.items if isinstance(target, ForeignObject) else target)[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container((dict, OrderedDict, Counter), 'setting items of')
        mapping = target.items if isinstance(target, ForeignObject) else target
        for index in range(0, len(items), 2):
            mapping[items[index]] = items[index + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._container((set, ), 'adding items to')
        if isinstance(target, ForeignObject):
            target.list_items.extend(items)
        else:
            target.update(items)


_CHECKED_OPCODES = {
    pickle.REDUCE: Unpickler.load_reduce,
    pickle.NEWOBJ: Unpickler.load_newobj,
    pickle.NEWOBJ_EX: Unpickler.load_newobj_ex,
    pickle.BUILD: Unpickler.load_build,
    pickle.APPEND: Unpickler.load_append,
    pickle.APPENDS: Unpickler.load_appends,
    pickle.SETITEM: Unpickler.load_setitem,
    pickle.SETITEMS: Unpickler.load_setitems,
    pickle.ADDITEMS: Unpickler.load_additems,
}
Unpickler.dispatch.update({opcode[0]: method for opcode, method in _CHECKED_OPCODES.items()})


def load(file, **kwargs) -> Any:
    """``pickle.load`` with :class:`Unpickler` (torch reads a legacy file's header with it)."""
    return Unpickler(file, **kwargs).load()


def find_foreign_objects(obj: Any, path: str = '') -> List[Tuple[str, str]]:
    """(path, class name) of each outermost :class:`ForeignObject` in a loaded checkpoint."""
    if isinstance(obj, ForeignObject):
        return [(path or '<root>', obj.qualified_name)]
    if isinstance(obj, dict):
        children = ((f'{path}.{key}' if path else str(key), value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((f'{path}[{index}]', value) for index, value in enumerate(obj))
    else:
        return []
    found = []
    for child_path, child in children:
        found.extend(find_foreign_objects(child, child_path))
    return found
