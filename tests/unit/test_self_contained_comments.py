"""Comments and docstrings state facts; they do not send the reader to documents outside the repository (the
development machines' notes, section numbers of a spec that is not shipped)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"PEERS(\.md)?\b|these VMs|\bspec §")


def test_no_source_cites_a_document_outside_the_repository() -> None:
    offenders = []
    for folder in ("src", "benchmarks", "docs"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".c", ".md") or not path.is_file():
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if OUTSIDE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
