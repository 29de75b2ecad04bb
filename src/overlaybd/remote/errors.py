"""Remote errors (one of the three translation edges: HTTP library -> these)."""

from __future__ import annotations

from ..errors import DigestMismatchError, FormatError, OverlaybdError


class RemoteError(OverlaybdError):
    """A repository could not do what was asked."""


class NotFoundError(RemoteError):
    """A manifest, tag or blob that the repository does not have."""


class AuthError(RemoteError):
    """The registry refused our credentials (or wants some)."""


class TransportError(RemoteError):
    """The connection failed, or the server kept failing, after bounded retries."""


class RangeRefusedError(RemoteError):
    """A mirror answered a range request with the whole blob from its start (a pull-through cache that is still
    fetching the blob does): that read goes to the next host, and the mirror is asked again next time."""


class InvalidDigestError(FormatError):
    """A digest that is not ``sha256:`` and 64 lowercase hex digits (in a manifest, an index, a header, a
    volume's config): refused before it reaches a URL or a file name."""


__all__ = ["AuthError", "DigestMismatchError", "InvalidDigestError", "NotFoundError", "RangeRefusedError",
           "RemoteError", "TransportError"]
