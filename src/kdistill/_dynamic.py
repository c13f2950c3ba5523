"""Generated subclasses ``class X(Mixin, Base)``: how ``convert`` and ``lightning.distill`` work.

Both swap an instance's class for a generated subclass of a kdistill mixin and the instance's own
class, so ``isinstance(obj, Base)`` keeps holding. ``SubclassFactory`` creates each such class
once per base class and keeps it in a weak cache: neither the base class nor the generated one is
kept alive by kdistill (a class defined in a function and converted once can be collected after
its last instance is gone). Generated classes cannot be found by name, so instances pickle
through ``reduce_instance``, which rebuilds the class from the mixin and the base class.
"""

import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["SubclassFactory"]

# One factory per mixin, so unpickling can find the factory from the (importable) mixin class.
_FACTORIES: dict[type, "SubclassFactory"] = {}


class SubclassFactory:
    """Creates and caches ``class Name(mixin, base)`` for each base class.

    Every generated class has the class attribute ``original_cls`` (the base class; ModelOpt's
    name for it) and the namespace that ``namespace(base)`` returns.

    Args:
        mixin: The kdistill class mixed in first (e.g. ``DistillationModel``).
        namespace: Extra class attributes for a base class (methods, docstring, ...).
        name: The generated class's ``__name__`` for a base class.
        qualname: Its ``__qualname__`` for a base class.
    """

    def __init__(
        self,
        mixin: type,
        namespace: Callable[[type], dict[str, Any]],
        name: Callable[[type], str],
        qualname: Callable[[type], str],
    ) -> None:
        if mixin in _FACTORIES:
            raise RuntimeError(f"A SubclassFactory for {mixin.__qualname__} already exists.")
        self.mixin = mixin
        self._namespace = namespace
        self._name = name
        self._qualname = qualname
        # Weak on both sides: the value must not keep its key alive (a generated class holds a
        # strong reference to its base), and instances keep their generated class alive.
        self._cache: weakref.WeakKeyDictionary[type, weakref.ref[type]] = (
            weakref.WeakKeyDictionary()
        )
        _FACTORIES[mixin] = self

    def get(self, base: type) -> type:
        """The generated subclass of ``(mixin, base)``; the same class while it is alive."""
        ref = self._cache.get(base)
        cls = ref() if ref is not None else None
        if cls is None:
            namespace = {
                "__module__": self.mixin.__module__,
                **self._namespace(base),
                "original_cls": base,
            }
            cls = type(self._name(base), (self.mixin, base), namespace)
            cls.__qualname__ = self._qualname(base)
            self._cache[base] = weakref.ref(cls)
        return cls

    def reduce_instance(self, obj: Any) -> tuple:
        """A ``__reduce_ex__`` value that rebuilds ``obj`` (state: a copy of its ``__dict__``)."""
        return (_new_instance, (self.mixin, type(obj).original_cls), obj.__dict__.copy())


def _new_instance(mixin: type, base: type) -> Any:
    """Unpickling helper: an empty instance of the generated subclass of ``(mixin, base)``."""
    return object.__new__(_FACTORIES[mixin].get(base))
