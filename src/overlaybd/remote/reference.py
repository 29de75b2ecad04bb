"""Parsing image references (pure): ``oci:PATH[:TAG]`` and Docker-style ``HOST[:PORT]/REPO[:TAG|@DIGEST]``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
DEFAULT_TAG = "latest"


@dataclass(frozen=True, slots=True)
class Reference:
    kind: str  # "oci" (a local image-layout directory) or "registry"
    repository: str  # layout path, or repository name inside the registry
    host: str = ""  # registry host[:port]
    tag: str | None = None
    digest: str | None = None

    @property
    def selector(self) -> str:
        """What to ask for: the digest if given, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def is_local_host(self) -> bool:
        name = self.host.rsplit(":", 1)[0] if not self.host.startswith("[") else self.host.split("]")[0] + "]"
        return name in ("localhost", "127.0.0.1", "[::1]") or name.startswith("127.")

    def __str__(self) -> str:
        if self.kind == "oci":
            return f"oci:{self.repository}" + (f":{self.tag}" if self.tag else "")
        out = f"{self.host}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_digest(text: str) -> bool:
    return bool(_DIGEST.fullmatch(text))


def is_tag(text: str) -> bool:
    return bool(_TAG.fullmatch(text))


def is_repository_name(text: str) -> bool:
    return bool(_REPO.fullmatch(text))


def parse_reference(text: str) -> Reference:
    if text.startswith("oci:"):
        rest = text[4:]
        path, tag = rest, None
        head, sep, tail = rest.rpartition(":")
        if sep and head and "/" not in tail and _TAG.fullmatch(tail):
            path, tag = head, tail
        if not path:
            raise UsageError(f"bad reference {text!r}: oci:PATH[:TAG]")
        return Reference("oci", path, tag=tag)
    name, digest = text, None
    if "@" in text:
        name, _, digest = text.partition("@")
        if not is_digest(digest):
            raise UsageError(f"bad digest in {text!r}: expected sha256:<64 hex digits>")
    first, sep, rest = name.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        raise UsageError(f"bad reference {text!r}: give the registry, as HOST[:PORT]/REPO[:TAG|@DIGEST] "
                         "(or oci:PATH[:TAG] for a local directory)")
    repo, tag = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and "/" not in tail:
        repo, tag = head, tail
        if not _TAG.fullmatch(tag):
            raise UsageError(f"bad tag {tag!r} in {text!r}")
    if not _REPO.fullmatch(repo):
        raise UsageError(f"bad repository name {repo!r} in {text!r} (lowercase letters, digits, . _ - /)")
    return Reference("registry", repo, host=first, tag=tag, digest=digest)
