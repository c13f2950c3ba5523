"""One registry implementation for losses and balancers: names to classes, and their recipes.

Checkpoints refer to classes only through such names (``_serialization.build_object`` looks
them up here), and the contract suites of ``kdistill.testing`` find each class's recipe here.
``losses/_registry.py`` and ``balancers.py`` wrap one instance each in their public
``register_*`` / ``get_*`` / ``list_*`` functions.
"""

from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from torch import nn

from ._errors import unknown_name_message

__all__ = ["Registry"]

T = TypeVar("T", bound=type)
R = TypeVar("R")
C = TypeVar("C", bound=type)  # a registered class, returned as it came


class Registry(Generic[T, R]):
    """Maps unique names to subclasses of ``base``, each with an optional contract recipe.

    Args:
        kind: What is registered, for messages (``"loss"``, ``"loss balancer"``).
        base: Registered classes must subclass it.
        recipe_types: The accepted recipe classes; the first names the kind of recipe in
            messages (``LossRecipe``), the others are alternatives (``ContractOptOut``).
    """

    def __init__(self, kind: str, base: type, recipe_types: tuple[type, ...]) -> None:
        self.kind = kind
        self.base = base
        self.recipe_types = recipe_types
        self._by_name: dict[str, T] = {}
        self._recipes: dict[str, R] = {}

    # ------------------------------------------------------------------ registration
    def register(self, name: str, cls: C, recipe: R | None = None) -> C:
        """Register ``cls`` under ``name`` (with its recipe); returns ``cls``.

        Raises:
            TypeError: ``name`` is not a non-empty string, ``cls`` does not subclass ``base``,
                or ``recipe`` is of a wrong type.
            ValueError: ``name`` is already registered.
        """
        self._check_recipe(recipe, allow_none=True)
        _check_name(name)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            base = "nn.Module" if self.base is nn.Module else self.base.__qualname__
            raise TypeError(
                f"`cls` must subclass {base}, got {cls!r} (register {base} subclasses only)."
            )
        if name in self._by_name:
            raise ValueError(
                f"A {self.kind} named {name!r} is already registered "
                f"({self._by_name[name].__qualname__}). Pick another name."
            )
        self._by_name[name] = cast(T, cls)  # checked: a subclass of `base`
        if recipe is not None:
            self._recipes[name] = recipe
        return cls

    def decorator(self, name: str, recipe: R | None = None) -> Callable[[C], C]:
        """A class decorator that registers the class under ``name`` (arguments checked now)."""
        self._check_recipe(recipe, allow_none=True)
        _check_name(name)

        def register(cls: C) -> C:
            return self.register(name, cls, recipe)

        return register

    def add_recipe(self, name: str, recipe: R) -> R:
        """Give the class registered under ``name`` its recipe (it had none); returns ``recipe``.

        Raises:
            TypeError: ``recipe`` is of a wrong type.
            ValueError: ``name`` is not registered, or already has a recipe.
        """
        self._check_recipe(recipe, allow_none=False)
        self.get(name)  # unknown names raise, listing the registered ones
        if name in self._recipes:
            raise ValueError(f"A {self.kind} recipe for {name!r} is already registered.")
        self._recipes[name] = recipe
        return recipe

    # ------------------------------------------------------------------ look-up
    def get(self, name: str) -> T:
        """Return the class registered under ``name``; unknown names list the valid ones."""
        if name not in self._by_name:
            raise ValueError(unknown_name_message(self.kind, name, self._by_name))
        return self._by_name[name]

    def recipe(self, name: str) -> R | None:
        """The recipe of the class registered under ``name`` (None when it has none)."""
        self.get(name)
        return self._recipes.get(name)

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._by_name)

    def name_of(self, cls: type) -> str | None:
        """The name ``cls`` was registered under (exact class match), or ``None``."""
        for name, registered in self._by_name.items():
            if registered is cls:
                return name
        return None

    def _check_recipe(self, recipe: Any, allow_none: bool) -> None:
        if (recipe is None and allow_none) or isinstance(recipe, self.recipe_types):
            return
        first, *others = (t.__name__ for t in self.recipe_types)
        alternatives = "".join(f", a {other}" for other in others)
        none = " or None" if allow_none else ""
        raise TypeError(
            f"`recipe` must be a kdistill.testing.{first}{alternatives}{none}, got "
            f"{type(recipe).__name__}."
        )


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise TypeError(f"`name` must be a non-empty string, got {name!r}.")
