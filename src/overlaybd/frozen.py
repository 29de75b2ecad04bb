"""Small immutable records without ``dataclasses``: importing it loads ``inspect`` (and with it ``ast``, ``dis``,
``tokenize``), and each ``@dataclass`` compiles its methods when its module is imported; together about 10 ms at
every start of a command, a third of what ``zfile decompress`` spent importing. The records on the paths of the
commands that must start fast derive from ``Frozen``: each lists its fields in ``__slots__`` (in order) and sets
them in its own ``__init__`` through ``object.__setattr__``; ``Frozen`` gives what ``@dataclass(frozen=True,
slots=True)`` gave them: equality and hashing by fields (same class only), a repr naming the fields, assignment
refused, ``replace``, pickling.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from typing import Any, Self


class Frozen:
    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__qualname__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__qualname__} is immutable")

    def __reduce__(self) -> tuple[type[Self], tuple[Any, ...]]:
        return type(self), self._values()

    def replace(self, **changes: Any) -> Self:
        """A copy with these fields changed (``dataclasses.replace``)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)
