"""``overlaybd.errors`` draws the whole error tree: every error class the package defines is in it, under its
real parent, so a caller reading that one docstring knows everything it may have to catch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import overlaybd
from overlaybd import errors
from overlaybd.errors import OverlaybdError

SKIP = ("overlaybd.cli", "overlaybd.__main__")  # the command line defines no errors and runs on import


def defined_errors() -> dict[str, type[OverlaybdError]]:
    found: dict[str, type[OverlaybdError]] = {}
    for info in pkgutil.walk_packages(overlaybd.__path__, "overlaybd."):
        if info.name.startswith(SKIP):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, OverlaybdError) and cls.__module__ == module.__name__:
                found[name] = cls
    return found


def drawn_tree() -> dict[str, str]:
    """name -> parent name, from the box drawing in the module docstring."""
    assert errors.__doc__ is not None
    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in errors.__doc__.splitlines():
        m = re.match(r"^(\s*(?:[│ ]   )*(?:[├└]── )?)([A-Z][A-Za-z0-9]+Error)\b", line)
        if not m:
            continue
        depth = len(m.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            parents[m.group(2)] = stack[-1][1]
        stack.append((depth, m.group(2)))
    return parents


def test_every_error_class_is_in_the_tree_under_its_parent() -> None:
    tree = drawn_tree()
    for name, cls in defined_errors().items():
        if cls is OverlaybdError:
            continue
        assert name in tree, f"{cls.__module__}.{name} is missing from the tree in overlaybd/errors.py"
        assert tree[name] == cls.__bases__[0].__name__, f"{name} is drawn under {tree[name]}"


def test_the_tree_names_no_class_that_does_not_exist() -> None:
    known = set(defined_errors())
    assert set(drawn_tree()) - known == set()
