"""A registry endpoint's client: its connections, its tokens, and one request attempt with auth.

One client per (scheme, host, TLS verification, credentials, retry policy) in the process:
:meth:`RegistryClient.shared` keeps them (thread-safe), so every layer, repository and thread that talks to a
registry shares its bearer tokens and its keep-alive connections. Connections live in a pool of
``requests.Session`` objects, each used by one thread at a time and handed back after the request (a session is
not safe to share between threads; connections outlive the threads that opened them). ``requests`` was chosen by
measurement (~1.2 GiB/s bulk downloads on loopback, where httpx ran at 250-330 MiB/s); it honours HTTPS_PROXY,
NO_PROXY and REQUESTS_CA_BUNDLE from the environment.

A client knows nothing of repositories or paths: callers hand it absolute URLs (a repository builds them from its
own base URL), so a repository can later be served by several endpoints (mirrors tried in order, then the
server), each with its own client. Retries and deadlines are :mod:`.http`'s, one loop per operation.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlencode

import requests

from . import http
from .auth import Challenge, Credentials, find_credentials, parse_challenge
from .bodies import body_chunks, declared_length
from .errors import AuthError, TransportError
from .http import DEFAULT_POLICY, Operation, Retryable, RetryPolicy, redact_url
from .reference import Reference

log = logging.getLogger(__name__)

T = TypeVar("T")
Body = Callable[[], Any] | None
DRAIN_LIMIT = 64 << 10  # an answer's body read to the end (so its connection is kept) when no longer than this
TOKEN_LIMIT = 1 << 20  # a token service's answer
_ClientKey = tuple[str, str, bool | str, Credentials | None, RetryPolicy, "Extras"]


@dataclass(frozen=True, slots=True)
class Extras:
    """What a hosts.toml may add to a host's requests: client certificates, headers, a proxy of its own."""

    certs: tuple[tuple[str, str], ...] = ()  # (certificate, key) pairs, tried in order; key "" when the
    # certificate file holds both
    headers: tuple[tuple[str, str], ...] = ()
    proxy: str | None = None  # a proxy URL for every request to this host (http, https, socks5, socks5h)

    @property
    def proxies(self) -> dict[str, str] | None:
        return {"http": self.proxy, "https": self.proxy} if self.proxy else None

    def requests_cert(self, n: int) -> str | tuple[str, str] | None:
        """Pair ``n`` as ``requests`` takes it (None: no certificate)."""
        if n >= len(self.certs):
            return None
        cert, key = self.certs[n]
        return (cert, key) if key else cert


NO_EXTRAS = Extras()


class _SessionPool:
    """Sessions lent to one thread at a time; as many as were ever in use at once."""

    def __init__(self, extras: Extras = NO_EXTRAS) -> None:
        self._free: list[requests.Session] = []
        self._lock = threading.Lock()
        self._extras = extras

    @contextmanager
    def borrow(self) -> Iterator[requests.Session]:
        with self._lock:
            session = self._free.pop() if self._free else None
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = "pyoverlaybd"
            session.headers["Accept-Encoding"] = "identity"  # blobs are compressed already; no decoding bombs
            session.headers.update(dict(self._extras.headers))
        try:
            yield session
        finally:
            with self._lock:
                self._free.append(session)


def discard(r: requests.Response, op: Operation) -> None:
    """Done with an answer. A short declared body (at most DRAIN_LIMIT) is read to its end, within the deadline, so
    the connection goes back to the pool; any other is closed with its connection (never waited for)."""
    try:
        length = declared_length(r)
        if length is not None and length <= DRAIN_LIMIT:
            for _ in body_chunks(r, op, "an answer's end", size=DRAIN_LIMIT):
                pass
    except (Retryable, TransportError):
        pass
    finally:
        r.close()


class RegistryClient:
    """Talks to one registry endpoint. Thread-safe; get the process's shared one with :meth:`shared`."""

    _shared: ClassVar[dict[_ClientKey, RegistryClient]] = {}
    _tls_hosts: ClassVar[dict[str, bool]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, host: str, *, scheme: str = "https", verify: bool | str = True,
                 credentials: Credentials | None = None, policy: RetryPolicy = DEFAULT_POLICY,
                 extras: Extras = NO_EXTRAS) -> None:
        self.host = host
        self.scheme = scheme
        self.base = f"{scheme}://{host}"
        self.verify = verify
        self.credentials = credentials
        self.policy = policy
        self.extras = extras
        self._proxies = extras.proxies  # given with each request: it then wins over the environment's proxies
        self._sessions = _SessionPool(extras)
        self._cert = 0  # which of extras.certs is presented (the next one after a host refuses it)
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._lock = threading.Lock()
        self._scope_locks: dict[str, threading.Lock] = {}

    # -- the process's clients -------------------------------------------------------------------------------------
    @classmethod
    def shared(cls, host: str, *, insecure: bool = False, plain_http: bool | None = None,
               ca_bundle: str | None = None, credentials: Credentials | None = None,
               policy: RetryPolicy | None = None, extras: Extras = NO_EXTRAS) -> RegistryClient:
        """The process's client for this host and these settings. Plain HTTP when asked (``plain_http``), with
        ``insecure`` (which also skips TLS verification), or on a local host that does not speak TLS (as Docker:
        HTTPS first). Credentials are looked up (see :mod:`.auth`) unless given; new credentials get a new client.
        ``extras`` (a hosts.toml's client certificate, headers, proxy) make a client of their own."""
        verify: bool | str = ca_bundle or (not insecure)
        if plain_http is None and Reference("registry", "x", host=host).is_local_host and not insecure:
            plain_http = not cls._speaks_tls(host, verify)
        scheme = "http" if (plain_http if plain_http is not None else insecure) else "https"
        creds = credentials if credentials is not None else find_credentials(host)
        key: _ClientKey = (scheme, host, verify, creds, policy or DEFAULT_POLICY, extras)
        with cls._shared_lock:
            client = cls._shared.get(key)
            if client is None:
                client = cls._shared[key] = cls(host, scheme=scheme, verify=verify, credentials=creds,
                                                policy=policy or DEFAULT_POLICY, extras=extras)
            return client

    @classmethod
    def _speaks_tls(cls, host: str, verify: bool | str) -> bool:
        """Does a local registry answer TLS? (Certificate errors count as yes: they must surface, not downgrade.)
        Asked once per host and process."""
        with cls._shared_lock:
            known = cls._tls_hosts.get(host)
        if known is not None:
            return known
        try:
            requests.get(f"https://{host}/v2/", timeout=(DEFAULT_POLICY.connect_timeout, DEFAULT_POLICY.read_timeout),
                         verify=verify).close()
            answer = True
        except requests.exceptions.SSLError as exc:
            answer = "certificate" in str(exc).lower()
        except requests.RequestException:
            answer = False
        with cls._shared_lock:
            cls._tls_hosts[host] = answer
        return answer

    # -- operations ------------------------------------------------------------------------------------------------
    def run(self, what: str, attempt: Callable[[Operation], T], *, path: str | None = None) -> T:
        """One operation under this client's retry policy (see :mod:`.http`)."""
        return http.run(self.policy, what, attempt, path=path, host=self.host)

    def request(self, method: str, url: str, *, scope: str, headers: dict[str, str] | None = None,
                body: Body = None, allow_redirects: bool = True, authorize: bool = True,
                path: str | None = None) -> requests.Response:
        """A whole operation for an answer whose body does not matter: status and headers (the body is drained
        or dropped, the response closed)."""
        def attempt(op: Operation) -> requests.Response:
            with self.exchange(op, method, url, scope=scope, headers=headers, body=body,
                               allow_redirects=allow_redirects, authorize=authorize) as r:
                return r

        return self.run(f"{method} {redact_url(url)}", attempt, path=path)

    @contextmanager
    def exchange(self, op: Operation, method: str, url: str, *, scope: str, headers: dict[str, str] | None = None,
                 body: Body = None, allow_redirects: bool = True, authorize: bool = True
                 ) -> Iterator[requests.Response]:
        """One attempt's request, its body left to the caller to stream. An auth challenge is answered (once per
        operation) inside it. Raises :class:`Retryable` for a failed connection, a 5xx or a 429; AuthError for a
        refusal (when ``authorize``); otherwise yields the answer, whatever its status."""
        if not url.startswith(("http://", "https://")):
            url = self.base + url
        with self._sessions.borrow() as session:
            r = self._send(session, op, method, url, scope=scope, headers=headers, body=body,
                           allow_redirects=allow_redirects, authorize=authorize)
            try:
                yield r
            except BaseException:
                r.close()  # whatever went wrong, its connection is not trusted again
                raise
            discard(r, op)

    def _send(self, session: requests.Session, op: Operation, method: str, url: str, *, scope: str,
              headers: dict[str, str] | None, body: Body, allow_redirects: bool, authorize: bool) -> requests.Response:
        shown = f"{method} {redact_url(url)}"
        while True:
            h = dict(headers or {})
            if authorize:
                h.update(self._auth_header(scope))
            cert = self._cert
            try:
                r = session.request(method, url, headers=h, data=body() if body else None, stream=True,
                                    allow_redirects=allow_redirects, verify=self.verify, timeout=op.timeouts(),
                                    proxies=self._proxies, cert=self.extras.requests_cert(cert))
            except requests.exceptions.SSLError as exc:
                if self._next_cert(cert, exc):
                    continue
                raise TransportError(f"{shown}: {_tls_reason(exc)}") from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                raise Retryable(f"{shown}: {type(exc).__name__}") from None
            except requests.RequestException as exc:
                raise TransportError(f"{shown}: {type(exc).__name__}") from None
            log.debug("%s -> %d (attempt %d)", shown, r.status_code, op.attempt)
            if r.status_code == 401 and authorize and not op.challenge_answered:
                challenge = parse_challenge(r.headers.get("WWW-Authenticate", ""))
                discard(r, op)
                if challenge is None:
                    raise AuthError(f"{self.host} refused {shown} without saying how to log in")
                self._renew(session, op, challenge, scope, stale=h.get("Authorization"))
                op.challenge_answered = True
                continue
            if r.status_code >= 500 or r.status_code == 429:
                after = http.retry_after(r.headers.get("Retry-After"))
                discard(r, op)
                raise Retryable(f"{shown}: HTTP {r.status_code}", retry_after=after)
            if authorize and r.status_code in (401, 403):
                discard(r, op)
                raise AuthError(f"{self.host}: access denied ({r.status_code}) for {scope or shown}")
            return r

    def _next_cert(self, tried: int, exc: Exception) -> bool:
        """A TLS failure while presenting pair ``tried``: move to the next client certificate if there is one and
        the failure was not the server's own certificate (True: try again)."""
        if "certificate verify failed" in str(exc) or tried + 1 >= len(self.extras.certs):
            return False
        with self._lock:
            if self._cert == tried:
                self._cert = tried + 1
                log.info("%s refused client certificate %s; presenting %s", self.host, self.extras.certs[tried][0],
                         self.extras.certs[tried + 1][0])
        return True

    # -- auth ------------------------------------------------------------------------------------------------------
    def _auth_header(self, scope: str) -> dict[str, str]:
        with self._lock:
            token = self._tokens.get(scope)
            basic = self._basic
        if token:
            return {"Authorization": f"Bearer {token}"}
        if basic and self.credentials:
            return {"Authorization": self.credentials.basic}
        return {}

    def _renew(self, session: requests.Session, op: Operation, challenge: Challenge, scope: str,
               stale: str | None) -> None:
        """Answer a challenge, once for all threads: whoever comes second finds the answer already there."""
        with self._lock:
            gate = self._scope_locks.setdefault(scope, threading.Lock())
        with gate:
            current = self._auth_header(scope).get("Authorization")
            if current is not None and current != stale:
                return
            with self._lock:
                self._tokens.pop(scope, None)
            self._answer(session, op, challenge, scope)

    def _answer(self, session: requests.Session, op: Operation, challenge: Challenge, scope: str) -> None:
        if challenge.scheme == "basic":
            if not self.credentials or not self.credentials.username:
                raise AuthError(f"{self.host} wants a username and password (docker login, or "
                                "OVERLAYBD_REGISTRY_USERNAME/PASSWORD)")
            with self._lock:
                self._basic = True
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthError(f"{self.host} asks for unsupported authentication {challenge.scheme!r}")
        realm = challenge.params["realm"]
        shown = redact_url(realm)
        if not realm.startswith(("https://", "http://")):
            raise AuthError(f"{self.host}: token realm {shown!r} is not an http(s) URL")
        service = challenge.params.get("service", "")
        scopes = [s for s in (scope.split(" ") if scope else [challenge.params.get("scope", "")]) if s]
        r = self._ask_token_service(session, op, realm, service, scopes)
        try:
            if r.status_code >= 500 or r.status_code == 429:
                raise Retryable(f"token service {shown}: HTTP {r.status_code}")
            if r.status_code in (401, 403):
                raise AuthError(f"{self.host}: the token service refused our credentials for {scope or 'access'}")
            if r.status_code != 200:
                raise AuthError(f"{self.host}: the token service {shown} answered {r.status_code}")
            token = _token_from(r, op)
        finally:
            discard(r, op)
        if not token:
            raise AuthError(f"{self.host}: the token service {shown} sent no token")
        with self._lock:
            self._tokens[scope] = token

    def _ask_token_service(self, session: requests.Session, op: Operation, realm: str, service: str,
                           scopes: list[str]) -> requests.Response:
        """The token service's answer (not yet read): an identity token is exchanged by POST, a username and
        password (or nothing, for anonymous pulls) go with a GET."""
        shown = redact_url(realm)
        creds = self.credentials
        try:
            if creds and creds.identity_token:
                return session.post(realm, data={"grant_type": "refresh_token", "service": service,
                                                 "scope": " ".join(scopes), "client_id": "pyoverlaybd",
                                                 "refresh_token": creds.identity_token},
                                    timeout=op.timeouts(), verify=self.verify, stream=True, proxies=self._proxies,
                                    cert=self.extras.requests_cert(self._cert))
            auth = (creds.username, creds.password) if creds and creds.username else None
            query = urlencode([("service", service)] + [("scope", s) for s in scopes])
            sep = "&" if "?" in realm else "?"
            return session.get(f"{realm}{sep}{query}", auth=auth, timeout=op.timeouts(), verify=self.verify,
                               stream=True, proxies=self._proxies, cert=self.extras.requests_cert(self._cert))
        except requests.exceptions.SSLError:
            raise TransportError(f"token service {shown}: TLS error") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Retryable(f"token service {shown} unreachable: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise TransportError(f"token service {shown}: {type(exc).__name__}") from None


def _tls_reason(exc: Exception) -> str:
    text = str(exc)
    if "certificate verify failed" in text:
        return "certificate verify failed (a private CA goes in REQUESTS_CA_BUNDLE, or ca in hosts.toml)"
    for alert in ("certificate required", "bad certificate", "unknown ca", "certificate unknown",
                  "handshake failure"):
        if alert in text:
            return f"TLS error: the host refused the handshake ({alert}; a client certificate goes in hosts.toml)"
    return "TLS error"


def _token_from(r: requests.Response, op: Operation) -> str | None:
    """The token in a token service's JSON answer (at most TOKEN_LIMIT bytes of it)."""
    raw = bytearray()
    for chunk in body_chunks(r, op, "the token service's answer", size=64 << 10):
        raw += chunk
        if len(raw) > TOKEN_LIMIT:
            return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict):
        return None
    token = body.get("token") or body.get("access_token")
    return token if isinstance(token, str) else None
