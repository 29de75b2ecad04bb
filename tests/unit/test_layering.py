"""The package's floors hold: a module imports only from its own floor or the floors below, and never from inside a
function to get around that (only the command line's dispatch and optional extras load late)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "overlaybd"

# bottom to top; a module's floor is the first prefix that matches its dotted name (without "overlaybd.")
FLOORS: list[tuple[str, ...]] = [
    ("errors", "sizes", "native", "source", "metrics", "frozen"),
    ("formats", "operations", "inspection", "trace", "importing", "qemu"),
    ("cache", "layerstore"),
    ("volume", "volume_config"),
    ("remote",),
    ("convert",),
    ("export", "cli", "testing", "__init__", "__main__"),
]
# where a late import is the point: the command line loads optional extras (rich, mfusepy) only when used
LATE_IMPORTS_ALLOWED = ("cli",)


def floor_of(module: str) -> int:
    head = module.split(".")[0]
    for n, names in enumerate(FLOORS):
        if head in names:
            return n
    raise AssertionError(f"{module}: on no floor (add it to FLOORS)")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The package modules ``node`` imports (names relative to the package), or [] for outside ones."""
    if isinstance(node, ast.Import):
        return [a.name[len("overlaybd."):] for a in node.names if a.name.startswith("overlaybd.")]
    if node.level == 0:
        name = node.module or ""
        return [name[len("overlaybd."):]] if name.startswith("overlaybd.") else []
    base = module.split(".") if is_package and module != "__init__" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    package = ".".join([*base, *(node.module.split(".") if node.module else [])]).strip(".")
    out = []
    for alias in node.names:  # "from X import y": module X.y if there is one, else X itself
        sub = f"{package}.{alias.name}".strip(".")
        out.append(sub if is_module(sub) else package or "__init__")
    return out


def is_module(name: str) -> bool:
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def walk() -> list[tuple[str, int, str, bool]]:
    """(module, line, imported module, inside a function) for every import of a package module."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text())
        late: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                late.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported(node, module, path.name == "__init__.py"):
                    out.append((module, node.lineno, target, id(node) in late))
    return out


def test_every_module_imports_only_from_its_floor_or_below() -> None:
    wrong = [f"{m}:{line} imports {t} (floor {floor_of(t)} is above {floor_of(m)})"
             for m, line, t, _late in walk() if floor_of(t) > floor_of(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_hides_inside_a_function() -> None:
    wrong = [f"{m}:{line} imports {t} inside a function" for m, line, t, late in walk()
             if late and not m.startswith(LATE_IMPORTS_ALLOWED)]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_imports() -> None:
    found = {(m, t) for m, _, t, _ in walk()}
    assert ("volume", "formats.lsmt.stack") in found and ("remote.lazy", "volume") in found
