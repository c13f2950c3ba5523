"""A small name -> class registry, used for losses and balancers."""

from typing import Generic, TypeVar

from ._errors import unknown_name_message

__all__ = ["Registry"]

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Maps unique names to classes; checkpoints refer to classes only through such names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._by_name: dict[str, T] = {}

    def register(self, name: str, cls: T) -> T:
        """Register ``cls`` under ``name``; a duplicate name raises ``ValueError``."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty string, got {name!r}.")
        if name in self._by_name:
            raise ValueError(
                f"A {self.kind} named {name!r} is already registered "
                f"({self._by_name[name].__qualname__}). Pick another name."
            )
        self._by_name[name] = cls
        return cls

    def get(self, name: str) -> T:
        """Return the class registered under ``name``; unknown names list the valid ones."""
        if name not in self._by_name:
            raise ValueError(unknown_name_message(self.kind, name, self._by_name))
        return self._by_name[name]

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._by_name)

    def name_of(self, cls: type) -> str | None:
        """The name ``cls`` was registered under (exact class match), or ``None``."""
        for name, registered in self._by_name.items():
            if registered is cls:
                return name
        return None
