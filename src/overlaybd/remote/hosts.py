"""Registry hosts as containerd configures them: ``HOSTS_DIR/<host>/hosts.toml`` (pure parsing, and the ordered
list of hosts a registry's requests may go to).

The hosts directory is ``--hosts-dir`` (:func:`use_hosts_dir`), else ``$OVERLAYBD_HOSTS_DIR``, else
``/etc/containerd/certs.d``. For a registry ``HOST[:PORT]`` the first of ``HOST_PORT_/``, ``HOST:PORT/`` and
``_default/`` that exists is its folder; in it, ``hosts.toml`` says::

    server = "https://registry.example.com"        # the registry itself (default: the host asked for)
    capabilities = ["pull", "resolve", "push"]     # top-level keys apply to the server

    [host."http://mirror.local:5000"]             # mirrors, tried in file order before the server
      capabilities = ["pull", "resolve"]          # resolve: tags to manifests; pull: blobs and manifests by
                                                  # digest; push: uploads (default: all three)
      ca = "/etc/certs/mirror-ca.pem"              # or a list; relative paths are relative to the folder
      client = [["/etc/certs/c.cert", "/etc/certs/c.key"]]   # or "c.pem" (cert and key in one file)
      skip_verify = false
      override_path = false                        # true: the URL's path is the API root (no /v2 added)
      header = { x-custom = "1" }                  # extra headers (a value may be a list)
      dial_timeout = "5s"                          # connect timeout (Go duration: 300ms, 1m30s, ...)
      proxy = "socks5h://127.0.0.1:1080"           # pyoverlaybd's own key: the proxy for this host only

Several ``client`` pairs are tried in order: the first one the host accepts is kept (a host that refuses a
certificate in the TLS handshake moves the client to the next pair). Requests to a mirror carry ``?ns=REGISTRY``
(the registry the reference names), as containerd sends them, so a mirror of several registries knows which one
is meant.

A URL without a scheme is ``https``; its path gets ``/v2`` appended unless it ends with it or ``override_path``
says otherwise. A folder without ``hosts.toml`` is read the Docker way: ``*.crt`` are CAs, ``*.cert`` (+ ``.key``)
client certificates, for the registry itself. Without any folder, the registry is its only host.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import UsageError

DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
ENV = "OVERLAYBD_HOSTS_DIR"
CAPABILITIES = ("pull", "resolve", "push")
ALL = frozenset(CAPABILITIES)
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PROXY_SCHEMES = ("http", "https", "socks5", "socks5h", "socks4", "socks4a")
_KEYS = {"capabilities", "ca", "client", "skip_verify", "header", "override_path", "proxy", "dial_timeout"}
_chosen: str | None = None


class HostsFileError(UsageError):
    """A hosts.toml that cannot be used as it is (bad TOML, an unknown capability, a value of the wrong type)."""


@dataclass(frozen=True, slots=True)
class RegistryHost:
    """One host a registry's requests may go to: a mirror, or the registry's server (the last)."""

    scheme: str  # "http" or "https"; "" for the server when hosts.toml does not name one (decided as before)
    host: str  # host[:port]
    path: str  # the API root: "/v2", or the URL's own path
    capabilities: frozenset[str] = ALL
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()  # (certificate, key); key "" when the certificate file holds both
    skip_verify: bool | None = None
    header: tuple[tuple[str, str], ...] = ()
    proxy: str | None = None
    mirror: bool = True  # False for the server
    dial_timeout: float | None = None  # seconds to connect (None: the retry policy's)

    @property
    def api(self) -> str:
        """``scheme://host/v2`` (or the overridden path): what repository paths are appended to."""
        return f"{self.scheme or 'https'}://{self.host}{self.path}"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities


@dataclass(frozen=True, slots=True)
class HostsConfig:
    """The hosts of one registry, in the order they are tried (the server last), and the folder they came from."""

    hosts: tuple[RegistryHost, ...]
    folder: str | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def for_capability(self, capability: str) -> tuple[RegistryHost, ...]:
        return tuple(h for h in self.hosts if h.can(capability))

    @property
    def has_mirrors(self) -> bool:
        return any(h.mirror for h in self.hosts)


def use_hosts_dir(path: str | None) -> None:
    """The hosts directory for this process and those it starts (``--hosts-dir``: it sets ``$OVERLAYBD_HOSTS_DIR``
    too); None goes back to the environment's."""
    global _chosen
    _chosen = path
    if path is not None:
        os.environ[ENV] = path


def hosts_dir() -> str:
    return _chosen or os.environ.get(ENV) or DEFAULT_HOSTS_DIR


def host_paths(root: str, host: str) -> list[str]:
    """Folders that may configure ``host``, in the order they are looked for (pure)."""
    out = []
    idx = host.rfind(":")
    if idx > 0 and not host.endswith("]"):
        out.append(os.path.join(root, f"{host[:idx]}_{host[idx + 1:]}_"))
    out += [os.path.join(root, host), os.path.join(root, "_default")]
    return out


def load(host: str, root: str | None = None) -> HostsConfig:
    """The hosts of registry ``host`` under ``root`` (default: :func:`hosts_dir`)."""
    root = root if root is not None else hosts_dir()
    for folder in host_paths(root, host):
        if os.path.isdir(folder):
            break
    else:
        return HostsConfig((RegistryHost("", host, "/v2", mirror=False),))
    path = os.path.join(folder, "hosts.toml")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        text = b""
    except OSError as exc:
        raise HostsFileError(f"cannot read it: {exc.strerror}", path=path) from None
    if not text.strip():
        return HostsConfig((_docker_certs(folder, host),), folder)
    return parse(text.decode("utf-8", errors="replace"), host, folder, path=path)


def parse(text: str, host: str, folder: str, *, path: str = "hosts.toml") -> HostsConfig:
    """``hosts.toml`` for registry ``host`` -> its hosts, mirrors in file order then the server (pure)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HostsFileError(f"not valid TOML: {exc}", path=path) from None
    mirrors = doc.get("host", {})
    if not isinstance(mirrors, dict):
        raise HostsFileError("'host' must be a table of [host.\"URL\"] tables", path=path)
    out = []
    for url, table in mirrors.items():  # tomllib keeps the file's order
        if not isinstance(table, dict):
            raise HostsFileError(f"[host.{url!r}] must be a table", path=path)
        out.append(_host(url, table, folder, path, mirror=True))
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise HostsFileError("'server' must be a string", path=path)
    top = {k: v for k, v in doc.items() if k in _KEYS}
    if server:
        out.append(_host(server, top, folder, path, mirror=False))
    else:  # the registry itself, with the top-level settings; every capability (as containerd does)
        settings = _host(f"https://{host}", top, folder, path, mirror=False)
        out.append(dataclasses.replace(settings, scheme="", host=host, path="/v2", capabilities=ALL))
    notes = tuple(f"unknown key {k!r} ignored" for k in doc if k not in _KEYS | {"server", "host"})
    return HostsConfig(tuple(out), folder, notes)


def _host(url: str, table: dict[str, Any], folder: str, path: str, *, mirror: bool) -> RegistryHost:
    where = f"[host.{url!r}]" if mirror else "the server"
    if not url.startswith(("http://", "https://")):
        if "://" in url:
            raise HostsFileError(f"{where}: only http and https URLs", path=path)
        url = "https://" + url
    parts = urlsplit(url)
    if not parts.hostname or parts.username or parts.query or parts.fragment:
        raise HostsFileError(f"{where}: not a URL of a host (scheme://host[:port][/path])", path=path)
    override = _bool(table, "override_path", where, path) or False
    api = posixpath.normpath(parts.path) if parts.path not in ("", "/") else ""
    if not override and not api.endswith("/v2"):
        api += "/v2"
    return RegistryHost(parts.scheme, parts.netloc, api, _capabilities(table, where, path),
                        _paths(table.get("ca"), "ca", folder, where, path), _client(table.get("client"), folder, where,
                                                                                     path),
                        _bool(table, "skip_verify", where, path), _headers(table.get("header"), where, path),
                        _proxy(table.get("proxy"), where, path), mirror,
                        _duration(table.get("dial_timeout"), where, path))


def _bool(table: dict[str, Any], key: str, where: str, path: str) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        raise HostsFileError(f"{where}: {key} must be true or false", path=path)
    return value


def _capabilities(table: dict[str, Any], where: str, path: str) -> frozenset[str]:
    caps = table.get("capabilities")
    if caps is None or caps == []:
        return ALL
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise HostsFileError(f"{where}: capabilities must be a list of strings", path=path)
    unknown = [c for c in caps if c.lower() not in CAPABILITIES]
    if unknown:
        raise HostsFileError(f"{where}: unknown capability {unknown[0]!r} (pull, resolve, push)", path=path)
    return frozenset(c.lower() for c in caps)


def _abs(p: str, folder: str) -> str:
    return p if os.path.isabs(p) else os.path.join(folder, p)


def _paths(value: Any, key: str, folder: str, where: str, path: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_abs(value, folder),)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(_abs(v, folder) for v in value)
    raise HostsFileError(f"{where}: {key} must be a path or a list of paths", path=path)


def _client(value: Any, folder: str, where: str, path: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items: Sequence[Any] = [value] if isinstance(value, str) else value if isinstance(value, list) else [None]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((_abs(item, folder), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
            out.append((_abs(item[0], folder), _abs(item[1], folder)))
        else:
            raise HostsFileError(f"{where}: client must be a path, or a list of paths or [cert, key] pairs",
                                 path=path)
    return tuple(out)


def _headers(value: Any, where: str, path: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise HostsFileError(f"{where}: header must be a table", path=path)
    out = []
    for name, v in value.items():
        values = [v] if isinstance(v, str) else v
        if not _HEADER_NAME.fullmatch(name) or not isinstance(values, list) \
                or not all(isinstance(x, str) and "\n" not in x and "\r" not in x for x in values):
            raise HostsFileError(f"{where}: header {name!r} must be a string or a list of strings", path=path)
        out.append((name, ", ".join(values)))
    return tuple(out)


def _proxy(value: Any, where: str, path: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or urlsplit(value).scheme not in _PROXY_SCHEMES or not urlsplit(value).hostname:
        raise HostsFileError(f"{where}: proxy must be a URL ({', '.join(_PROXY_SCHEMES)})", path=path)
    return value


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """A Go duration (``"5s"``, ``"1m30s"``, ``"250ms"``, ``"0"``) in seconds; None if it is not one (pure)."""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    return total if text else None


def _duration(value: Any, where: str, path: str) -> float | None:
    if value is None:
        return None
    seconds = parse_duration(value) if isinstance(value, str) else None
    if seconds is None:
        raise HostsFileError(f"{where}: dial_timeout must be a duration such as \"5s\" or \"500ms\"", path=path)
    return seconds if seconds > 0 else None  # 0: no timeout of its own


def _docker_certs(folder: str, host: str) -> RegistryHost:
    """A folder without hosts.toml, read as Docker reads ``certs.d``: ``*.crt`` CAs, ``*.cert`` + ``*.key``."""
    ca, client = [], []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name.endswith(".crt"):
            ca.append(full)
        elif name.endswith(".cert"):
            key = full[: -len(".cert")] + ".key"
            client.append((full, key if os.path.exists(key) else ""))
    return RegistryHost("", host, "/v2", ALL, tuple(ca), tuple(client), mirror=False)
