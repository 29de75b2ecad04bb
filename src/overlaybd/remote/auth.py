"""Registry credentials and WWW-Authenticate challenges.

Where credentials come from, first match wins: ``OVERLAYBD_REGISTRY_USERNAME`` / ``OVERLAYBD_REGISTRY_PASSWORD``
(any registry), then the Docker config file (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``):
``credHelpers[host]``, ``auths[host]`` (``auth`` base64, or ``username``/``password``, or ``identitytoken``), then
``credsStore``. Credentials are never logged nor put in error messages.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "basic" or "bearer"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="…",service="…",scope="…"`` -> Challenge (pure)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace('\\"', '"')
              for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str = ""
    password: str = ""
    identity_token: str = ""  # an OAuth2 refresh token, sent to the token endpoint

    def __repr__(self) -> str:  # never show secrets
        return f"Credentials(username={self.username!r}, password=***)"

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def docker_config_path() -> str:
    folder = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(folder, "config.json")


def _helper(name: str, host: str) -> Credentials | None:
    exe = shutil.which(f"docker-credential-{name}")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "get"], input=host, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode:
        return None
    try:
        data = json.loads(res.stdout)
    except ValueError:
        return None
    user, secret = data.get("Username", ""), data.get("Secret", "")
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(user, secret)


def find_credentials(host: str) -> Credentials | None:
    """Credentials for ``host``: the environment, then Docker's config (credential helpers, ``auths``, the
    credentials store), in the order the docker CLI tries them."""
    user = os.environ.get("OVERLAYBD_REGISTRY_USERNAME")
    if user is not None:
        return Credentials(user, os.environ.get("OVERLAYBD_REGISTRY_PASSWORD", ""))
    try:
        with open(docker_config_path()) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    helpers = cfg.get("credHelpers") or {}
    for key in keys:
        if key in helpers:
            creds = _helper(helpers[key], host)
            if creds:
                return creds
    auths = cfg.get("auths") or {}
    for key in keys:
        creds = _from_auths_entry(auths.get(key))
        if creds:
            return creds
    if cfg.get("credsStore"):
        return _helper(cfg["credsStore"], host)
    return None


def _from_auths_entry(entry: dict[str, str] | None) -> Credentials | None:
    """One ``auths`` entry of Docker's config: an identity token, ``auth`` (base64 of user:password), or the two
    fields; None when it holds none of them (or an undecodable ``auth``)."""
    if not entry:
        return None
    if entry.get("identitytoken"):
        return Credentials(identity_token=entry["identitytoken"])
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(entry["username"], entry.get("password", ""))
    return None
