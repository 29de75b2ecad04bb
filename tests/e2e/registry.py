"""A real CNCF distribution registry (Debian docker-registry) for tests, with no auth, htpasswd Basic auth, or
token auth (a small token server of the tests' own), plus a fault-injecting proxy, and a scripted server that lies
where a real registry cannot. All on 127.0.0.1."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import http.server
import json
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .nbd_helpers import require

USER, PASSWORD = "testuser", "testpass"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, *, connect_only: bool = False) -> None:
    """Until ``url`` answers (or, with ``connect_only``, until its port takes connections)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited: {log.read_text()[-2000:]}")
        if connect_only:
            try:
                port = int(url.split("/")[2].rsplit(":", 1)[1])
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
                continue
        try:
            import ssl

            urllib.request.urlopen(url, timeout=1, context=ssl._create_unverified_context())
            return
        except urllib.error.HTTPError:
            return  # 401: up, and asking for auth
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"docker-registry did not answer at {url}: {log.read_text()[-2000:]}")


@contextmanager
def registry(tmp: Path, auth: str = "none", redirect_to: str | None = None, tls: tuple[Path, Path] | None = None,
             token_requests: list[dict[str, str]] | None = None, pull_through: str | None = None,
             client_cas: list[Path] | None = None) -> Iterator[str]:
    """Start docker-registry; yield HOST:PORT. With ``redirect_to`` (a base URL serving the storage folder), blob
    GETs answer 307 to it, as registries in front of object storage do. With token auth, ``token_requests`` (when
    given) receives one entry per request the token server answered. With ``pull_through`` (a registry's base
    URL), it is a pull-through cache (a mirror) of that registry. With ``client_cas`` (and ``tls``), a client must
    present a certificate one of them signed."""
    exe = require("docker-registry")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    cas = f", clientcas: [{', '.join(str(p) for p in client_cas)}]" if client_cas else ""
    tls_line = f", tls: {{certificate: {tls[0]}, key: {tls[1]}{cas}}}" if tls else ""
    lines = ["version: 0.1", "log: {level: warn, accesslog: {disabled: true}}",
             f"storage: {{filesystem: {{rootdirectory: {tmp / 'storage'}}}, delete: {{enabled: true}}}}",
             f"http: {{addr: 127.0.0.1:{port}{tls_line}}}"]
    if pull_through:
        lines.append(f"proxy: {{remoteurl: '{pull_through}'}}")
    if redirect_to:
        lines.append(f"middleware: {{storage: [{{name: redirect, options: {{baseurl: '{redirect_to}'}}}}]}}")
    token_server = None
    if auth == "basic":
        htpasswd = require("htpasswd")
        out = subprocess.run([htpasswd, "-Bbn", USER, PASSWORD], capture_output=True, text=True, check=True)
        (tmp / "htpasswd").write_text(out.stdout)
        lines.append(f"auth: {{htpasswd: {{realm: basic-realm, path: {tmp / 'htpasswd'}}}}}")
    elif auth == "token":
        token_server = TokenServer(tmp, token_requests)
        lines.append(f"auth: {{token: {{realm: 'http://127.0.0.1:{token_server.port}/token', service: test-registry,"
                     f" issuer: test-issuer, rootcertbundle: {token_server.cert_path}}}}}")
    (tmp / "config.yml").write_text("\n".join(lines) + "\n")
    log = tmp / "registry.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([exe, "serve", str(tmp / "config.yml")], stdout=log_file, stderr=log_file,
                                stdin=subprocess.DEVNULL)
    try:
        _wait(f"http{'s' if tls else ''}://127.0.0.1:{port}/v2/", proc, log, connect_only=bool(client_cas))
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if token_server is not None:
            token_server.close()


class TokenServer:
    """Issues RS256 JWTs the registry trusts (cert in x5c). Valid Basic credentials get what they ask for;
    anonymous callers get pull only."""

    def __init__(self, tmp: Path, requests: list[dict[str, str]] | None = None) -> None:
        import jwt
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-token-issuer")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
        self.cert_path = tmp / "token-cert.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.requests: list[dict[str, str]] = requests if requests is not None else []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                from urllib.parse import parse_qs, urlparse

                q = parse_qs(urlparse(self.path).query)
                authed = self.headers.get("Authorization", "") == "Basic " + base64.b64encode(
                    f"{USER}:{PASSWORD}".encode()).decode()
                if self.headers.get("Authorization") and not authed:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in q.get("scope", []):
                    for part in scope.split(" "):
                        kind, _, rest = part.partition(":")
                        repo, _, actions = rest.rpartition(":")
                        granted = actions.split(",") if authed else [a for a in actions.split(",") if a == "pull"]
                        access.append({"type": kind, "name": repo, "actions": granted})
                server.requests.append({"authed": str(authed), "scope": " ".join(q.get("scope", []))})
                t = int(time.time())
                token = jwt.encode({"iss": "test-issuer", "sub": USER if authed else "", "aud": "test-registry",
                                    "exp": t + 300, "nbf": t - 10, "iat": t, "jti": os.urandom(8).hex(),
                                    "access": access}, key, algorithm="RS256", headers={"x5c": [x5c]})
                body = json.dumps({"token": token, "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FaultProxy:
    """An HTTP proxy in front of the registry that misbehaves on blob GETs as told:
    ``drop`` (close without answering), ``500``, ``truncate`` (half the body), ``corrupt`` (flip a byte of the
    body), ``ignore-range`` (answer 200 with the whole blob), ``bad-range`` (a Content-Range one byte off).
    ``faults`` counts how many requests still get the fault (then it passes requests through); -1 means forever.
    ``connections`` counts the TCP connections clients opened to it, ``peak_in_flight`` the most requests it was
    answering at once; ``seen`` lists every request: (method, path, headers, the client's address). With
    ``accept_oci``, manifest requests also accept the OCI media types (docker-registry 2.8 as a pull-through cache
    leaves them out of its requests, and then refuses OCI manifests)."""

    def __init__(self, upstream: str, *, accept_oci: bool = False) -> None:
        self.upstream = upstream
        self.accept_oci = accept_oci
        self.mode = "pass"
        self.faults = 0
        self.blob_gets = 0
        self.bytes_sent = 0
        self.connections = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.seen: list[tuple[str, str, dict[str, str], str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy.connections += 1

            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                if proxy.accept_oci and "/manifests/" in self.path:
                    accept = [v for k, v in headers.items() if k.lower() == "accept"]
                    headers = {k: v for k, v in headers.items() if k.lower() != "accept"}
                    headers["Accept"] = ", ".join([*accept, "application/vnd.oci.image.manifest.v1+json",
                                                   "application/vnd.oci.image.index.v1+json"])
                is_blob_get = method == "GET" and "/blobs/sha256:" in self.path
                with proxy._lock:
                    proxy.seen.append((method, self.path, dict(self.headers.items()), self.client_address[0]))
                    mode = proxy.mode if is_blob_get and proxy.faults != 0 else "pass"
                    if mode != "pass" and proxy.faults > 0:
                        proxy.faults -= 1
                    if is_blob_get:
                        proxy.blob_gets += 1
                if mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode == "500":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if mode == "ignore-range":
                    headers.pop("Range", None)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(method, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if mode == "corrupt" and data:
                    damaged = bytearray(data)
                    damaged[len(damaged) // 2] ^= 0x40
                    data = bytes(damaged)
                declared = len(data) if method != "HEAD" else int(resp.getheader("Content-Length") or 0)
                if mode == "truncate":
                    data = data[: len(data) // 2]
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if mode == "bad-range" and k.lower() == "content-range" and v.startswith("bytes "):
                        first, _, rest = v[6:].partition("-")
                        v = f"bytes {int(first) + 1}-{rest}"
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(data)
                    with proxy._lock:
                        proxy.bytes_sent += len(data) if is_blob_get else 0
                if mode == "truncate":
                    self.close_connection = True

            def _counted(self, method: str) -> None:
                with proxy._lock:
                    proxy.in_flight += 1
                    proxy.peak_in_flight = max(proxy.peak_in_flight, proxy.in_flight)
                try:
                    self._forward(method)
                finally:
                    with proxy._lock:
                        proxy.in_flight -= 1

            def do_GET(self) -> None:  # noqa: N802
                self._counted("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._counted("HEAD")

            def do_POST(self) -> None:  # noqa: N802
                self._forward("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._forward("PUT")

            def do_PATCH(self) -> None:  # noqa: N802
                self._forward("PATCH")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def set(self, mode: str, faults: int = -1) -> None:
        with self._lock:
            self.mode, self.faults = mode, faults

    def reset(self) -> None:
        """Counters and the request log back to zero, faults off."""
        with self._lock:
            self.mode, self.faults, self.blob_gets, self.bytes_sent = "pass", 0, 0, 0
            self.seen.clear()

    def blob_gets_by_digest(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for method, path, _, _ in self.seen:
                if method == "GET" and "/blobs/sha256:" in path:
                    digest = path.split("/blobs/", 1)[1].split("?", 1)[0]
                    out[digest] = out.get(digest, 0) + 1
            return out

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class RangeFileServer:
    """A static file server that honours Range (the "blob storage" behind a redirecting registry); counts GETs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gets = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = (server.root / self.path.split("?", 1)[0].lstrip("/")).resolve()
                server.gets += 1
                if not str(path).startswith(str(server.root.resolve())) or not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    first, _, last = rng[6:].partition("-")
                    a, b = int(first), min(int(last), len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
                    body = data[a : b + 1]
                else:
                    self.send_response(200)
                    body = data
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (as an IP SAN) and its key, PEM."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "tls-cert.pem", tmp / "tls-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@dataclass
class Reply:
    """What a ScriptedServer answers: ``body`` (sent again and again until ``repeat_until`` bytes went out, when
    set), declared by ``length`` (default: what is sent) or sent chunked, with ``headers``; with ``pace``, in pieces
    of ``piece`` bytes that many seconds apart (a server that trickles)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    length: int | None = None
    chunked: bool = False
    repeat_until: int = 0
    pace: float = 0.0
    piece: int = 1


class ScriptedServer:
    """A tiny HTTP/1.1 server that answers each (method, path) as told (the query string ignored; 404 for anything
    else): a registry that lies where a real one cannot (a 1 GiB or endless manifest, a blob longer than declared,
    a bad Docker-Content-Digest, a token realm carrying secrets). Counts the requests, and the body bytes it got
    out before the client hung up."""

    def __init__(self) -> None:
        self.replies: dict[tuple[str, str], Reply] = {}
        self.requests: list[tuple[str, str]] = []
        self.sent = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, method: str) -> None:
                path = self.path.split("?", 1)[0]
                with server._lock:
                    server.requests.append((method, path))
                    reply = server.replies.get((method, path))
                    if reply is None and method == "HEAD":
                        reply = server.replies.get(("GET", path))
                if reply is None:
                    reply = Reply(404, b'{"errors":[{"code":"NOT_FOUND"}]}')
                total = max(reply.repeat_until, len(reply.body))
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if reply.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(reply.length if reply.length is not None else total))
                if reply.repeat_until:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if method == "HEAD":
                    return
                try:
                    out = 0
                    while out < total and reply.body:
                        piece = reply.body[: total - out]
                        if reply.pace:
                            time.sleep(reply.pace)
                            piece = reply.body[out % len(reply.body):][: min(reply.piece, total - out)]
                        if reply.chunked:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        else:
                            self.wfile.write(piece)
                        out += len(piece)
                        with server._lock:
                            server.sent += len(piece)
                    if reply.chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def do_GET(self) -> None:  # noqa: N802
                self._answer("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._answer("HEAD")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, path: str, reply: Reply, method: str = "GET") -> None:
        with self._lock:
            self.replies[(method, path)] = reply

    def paths(self, method: str = "GET") -> list[str]:
        with self._lock:
            return [p for m, p in self.requests if m == method]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
