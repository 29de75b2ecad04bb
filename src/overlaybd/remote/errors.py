"""Remote errors (one of the three translation edges: HTTP library -> these)."""

from __future__ import annotations

from ..errors import DigestMismatchError, OverlaybdError


class RemoteError(OverlaybdError):
    """A repository could not do what was asked."""


class NotFoundError(RemoteError):
    """A manifest, tag or blob that the repository does not have."""


class AuthError(RemoteError):
    """The registry refused our credentials (or wants some)."""


class TransportError(RemoteError):
    """The connection failed, or the server kept failing, after bounded retries."""


__all__ = ["AuthError", "DigestMismatchError", "NotFoundError", "RemoteError", "TransportError"]
