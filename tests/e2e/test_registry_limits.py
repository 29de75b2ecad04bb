"""What a registry sends is bounded and checked; a dead one costs a bounded number of requests; clients are shared.

Against the real docker-registry (through the fault proxy where it must misbehave) and, where a real registry
cannot lie (a 1 GiB manifest, an endless body, a blob longer than declared, a bad Docker-Content-Digest, a token
realm with secrets in it), against a scripted server of the tests' own."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from overlaybd.errors import LimitError, OverlaybdError
from overlaybd.remote.errors import (
    AuthError,
    DigestMismatchError,
    InvalidDigestError,
    RemoteError,
    TransportError,
)
from overlaybd.remote.http import DEFAULT_POLICY, RetryPolicy
from overlaybd.remote.lazy import repository_for
from overlaybd.remote.oci import (
    ANN_DIGEST,
    ANN_SIZE,
    ANN_VERSION,
    CONFIG_OCI,
    LAYER_TAR,
    MANIFEST_OCI,
    Manifest,
)
from overlaybd.remote.reference import parse_reference
from overlaybd.remote.registry import READ_CHUNK, RegistryClient, RegistryRepository
from overlaybd.remote.transfer import pull, push
from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD
from .registry import USER, FaultProxy, Reply, ScriptedServer, free_port, registry

pytestmark = pytest.mark.slow
MiB = 1 << 20


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))  # never the machine's own credentials
    for name in ("OVERLAYBD_REGISTRY_USERNAME", "OVERLAYBD_REGISTRY_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(digest: str, size: object) -> dict[str, object]:
    return {"mediaType": LAYER_TAR, "digest": digest, "size": size,
            "annotations": {ANN_DIGEST: digest, ANN_SIZE: str(size), ANN_VERSION: "0.1.0"}}


def manifest(layers: list[dict[str, object]], config: dict[str, object] | None = None) -> bytes:
    cfg = b"{}"
    return json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_OCI,
                       "config": config or {"mediaType": CONFIG_OCI, "digest": sha(cfg), "size": len(cfg)},
                       "layers": layers}).encode()


def serve_manifest(server: ScriptedServer, raw: bytes, reply: Reply | None = None) -> str:
    """The manifest at evil/img:v1; returns the reference."""
    server.answer("/v2/evil/img/manifests/v1", reply or Reply(body=raw, headers={"Content-Type": MANIFEST_OCI}))
    return f"{server.address}/evil/img:v1"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERLAYBD, *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert res.stderr.startswith("overlaybd: error:") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr
    return res.stderr


def make_volume(path: Path, snapshots: int = 1) -> tuple[Volume, bytes]:
    vol = Volume.create(str(path), 32 * MiB)
    for n in range(snapshots):
        with vol.open(writable=True) as dev:
            dev.pwrite(n * 8 * MiB, os.urandom(3 * MiB))
            dev.flush()
        vol.snapshot(f"snapshot {n}")
    with vol.open() as dev:
        return vol, dev.pread(0, dev.size)


def device_bytes(vol: Volume) -> bytes:
    with vol.open() as dev:
        return dev.pread(0, dev.size)


# -- item 5: bounded metadata, bounded blobs, checked digests and sizes -------------------------------------------


def test_a_1gib_manifest_is_refused_from_its_content_length(tmp_path: Path, server: ScriptedServer) -> None:
    ref = serve_manifest(server, b"", Reply(body=b" " * MiB, length=1 << 30, repeat_until=1 << 30,
                                           headers={"Content-Type": MANIFEST_OCI}))
    with pytest.raises(LimitError, match="manifest"):
        pull(parse_reference(ref), str(tmp_path / "vol"))
    assert server.sent < 64 * MiB, f"the client read {server.sent} bytes of a manifest it should have refused"
    assert server.paths().count("/v2/evil/img/manifests/v1") == 1  # a limit is final: not retried


def test_an_endless_chunked_manifest_is_cut_at_the_cap(tmp_path: Path, server: ScriptedServer) -> None:
    ref = serve_manifest(server, b"", Reply(body=b" " * MiB, chunked=True, repeat_until=1 << 30,
                                           headers={"Content-Type": MANIFEST_OCI}))
    with pytest.raises(LimitError, match="manifest"):
        pull(parse_reference(ref), str(tmp_path / "vol"))
    assert server.sent < 64 * MiB
    assert server.paths().count("/v2/evil/img/manifests/v1") == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_blob_longer_than_declared_stops_at_the_declared_size(tmp_path: Path, server: ScriptedServer,
                                                                chunked: bool) -> None:
    blob = os.urandom(MiB)
    ref = serve_manifest(server, manifest([layer(sha(blob), len(blob))]))
    server.answer(f"/v2/evil/img/blobs/{sha(blob)}", Reply(body=blob, chunked=chunked, repeat_until=256 * MiB))
    with pytest.raises(DigestMismatchError, match="more than|sends"):
        pull(parse_reference(ref), str(tmp_path / "vol"))
    assert server.sent < 64 * MiB, f"{server.sent} bytes read for a blob of {len(blob)}"
    assert server.paths().count(f"/v2/evil/img/blobs/{sha(blob)}") == 1  # a mismatch is final
    assert not [p for p in (tmp_path / "vol").rglob("*") if p.name.startswith(".download-")]


BAD_DIGESTS = ["../../x", "sha256:../../../../../../tmp/evil", "sha256:" + "A" * 64, "sha256:" + "0" * 63,
               "sha256:" + "0" * 64 + "\n", "md5:d41d8cd98f00b204e9800998ecf8427e/x", 7]


@pytest.mark.parametrize("bad", BAD_DIGESTS, ids=[repr(b)[:24] for b in BAD_DIGESTS])
def test_a_bad_layer_digest_is_one_line_and_reaches_no_path(tmp_path: Path, server: ScriptedServer,
                                                            bad: object) -> None:
    ref = serve_manifest(server, manifest([layer(bad, 4096)]))  # type: ignore[arg-type]
    err = one_line_error(cli("pull", ref, str(tmp_path / "vol")))
    assert "digest" in err
    assert not [p for p in server.paths() if "/blobs/" in p], "a bad digest reached a request"
    assert not (tmp_path / "vol").exists() or not list((tmp_path / "vol").rglob("*.tar"))
    assert not Path("/tmp/evil").exists()


def test_a_bad_config_digest_is_refused_at_parse_time(tmp_path: Path, server: ScriptedServer) -> None:
    ref = serve_manifest(server, manifest([layer(sha(b"x"), 1)], config={"mediaType": CONFIG_OCI,
                                                                        "digest": "../../etc/passwd", "size": 2}))
    with pytest.raises(InvalidDigestError, match="config digest"):
        pull(parse_reference(ref), str(tmp_path / "vol"))


@pytest.mark.parametrize("size", [-1, 1 << 60, 1.5, "4096", True], ids=["negative", "2^60", "float", "string",
                                                                         "bool"])
def test_absurd_declared_sizes_are_refused_before_any_download(tmp_path: Path, server: ScriptedServer,
                                                               size: object) -> None:
    ref = serve_manifest(server, manifest([layer(sha(b"x"), size)]))
    err = one_line_error(cli("pull", ref, str(tmp_path / "vol")))
    assert "size" in err
    assert not [p for p in server.paths() if "/blobs/" in p]


@pytest.mark.parametrize("header", ["../../x", "sha256:" + "0" * 64])
def test_docker_content_digest_is_checked(tmp_path: Path, server: ScriptedServer, header: str) -> None:
    blob = b"y" * 4096
    raw = manifest([layer(sha(blob), len(blob))])
    ref = serve_manifest(server, raw, Reply(body=raw, headers={"Content-Type": MANIFEST_OCI,
                                                               "Docker-Content-Digest": header}))
    server.answer(f"/v2/evil/img/blobs/{sha(blob)}", Reply(body=blob))
    err = one_line_error(cli("pull", ref, str(tmp_path / "vol")))
    assert "Docker-Content-Digest" in err or "the registry says" in err
    assert not [p for p in server.paths() if "/blobs/" in p]


def test_a_trickled_manifest_ends_at_the_deadline(server: ScriptedServer) -> None:
    """One byte every 0.2 s of a 1000-byte manifest would take 200 s; the operation's deadline ends it, though
    every socket read comes well within the read timeout."""
    serve_manifest(server, b"", Reply(body=b" " * 1000, pace=0.2, headers={"Content-Type": MANIFEST_OCI}))
    client = RegistryClient.shared(server.address, plain_http=True, policy=RetryPolicy(deadline=1.5, read_timeout=1))
    with pytest.raises(TransportError, match="no answer within 1.5 s"):
        RegistryRepository.shared(client, "evil/img").get_manifest("v1")
    assert server.sent < 100
    assert server.paths().count("/v2/evil/img/manifests/v1") == 1


def test_more_than_255_layers_are_refused_before_anything_is_downloaded(tmp_path: Path) -> None:
    """A real registry takes a manifest of 256 layers (one blob, referenced 256 times); pulling it is refused when
    the manifest is parsed: not one blob is fetched."""
    vol, _ = make_volume(tmp_path / "vol")
    with registry(tmp_path / "reg") as host:
        report = push(vol, parse_reference(f"{host}/many/vol:v1"))
        blob = report.layers[0]
        repo = RegistryRepository.shared(RegistryClient.shared(host), "many/vol")
        raw_config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        config = os.path.join(tmp_path, "config.json")
        Path(config).write_bytes(raw_config)
        repo.put_blob(config, sha(raw_config), len(raw_config))
        raw = manifest([layer(blob["digest"], blob["size"])] * 256,
                       config={"mediaType": CONFIG_OCI, "digest": sha(raw_config), "size": len(raw_config)})
        repo.put_manifest(raw, MANIFEST_OCI, "too-many")
        proxy = FaultProxy(host)
        try:
            for lazy in (False, True):
                with pytest.raises(LimitError, match="256 layers"):
                    pull(parse_reference(f"{proxy.address}/many/vol:too-many"), str(tmp_path / f"p{lazy}"),
                         lazy=lazy)
            assert proxy.blob_gets == 0
        finally:
            proxy.close()


def test_a_digest_mismatch_is_final_and_leaves_nothing(tmp_path: Path) -> None:
    vol, _ = make_volume(tmp_path / "vol")
    with registry(tmp_path / "reg") as host:
        push(vol, parse_reference(f"{host}/m/vol:v1"))
        proxy = FaultProxy(host)
        try:
            proxy.set("corrupt", -1)
            with pytest.raises(DigestMismatchError):
                pull(parse_reference(f"{proxy.address}/m/vol:v1"), str(tmp_path / "eager"))
            assert proxy.blob_gets == 1, f"{proxy.blob_gets} GETs: a digest mismatch was retried"
            assert not [p for p in (tmp_path / "eager").rglob("*") if p.name.startswith(".download-")]
        finally:
            proxy.close()


def test_a_cut_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    vol = Volume.create(str(tmp_path / "vol"), 32 * MiB)
    with vol.open(writable=True) as dev:
        dev.pwrite(0, os.urandom(12 * MiB))
        dev.flush()
    vol.snapshot("big")
    content = device_bytes(vol)
    with registry(tmp_path / "reg") as host:
        report = push(vol, parse_reference(f"{host}/r/vol:v1"))
        proxy = FaultProxy(host)
        try:
            proxy.set("truncate", 1)
            eager = pull(parse_reference(f"{proxy.address}/r/vol:v1"), str(tmp_path / "eager")).volume
            assert device_bytes(eager) == content
            size = report.layers[0]["size"]
            assert proxy.blob_gets == 2
            # the second request asked for the rest: at most the read chunk in flight when the body was cut is
            # fetched twice (a restart would fetch half the blob twice)
            assert proxy.bytes_sent <= size + READ_CHUNK, f"{proxy.bytes_sent} bytes for a blob of {size}"
        finally:
            proxy.close()


# -- item 6: one retry loop with one deadline; one client per registry ---------------------------------------------


@pytest.mark.parametrize("mode", ["500", "drop", "truncate", "bad-range"])
def test_one_read_from_a_dead_registry_costs_at_most_the_policy_attempts(tmp_path: Path, mode: str) -> None:
    vol, content = make_volume(tmp_path / "vol")
    with registry(tmp_path / "reg") as host:
        push(vol, parse_reference(f"{host}/d/vol:v1"))
        proxy = FaultProxy(host)
        try:
            lazy = pull(parse_reference(f"{proxy.address}/d/vol:v1"), str(tmp_path / "lazy"), lazy=True).volume
            with lazy.open() as dev:
                proxy.set(mode, -1)
                before = proxy.blob_gets
                at = 2 * MiB  # inside the random data: not cached by the pull, which read the header and index
                with pytest.raises(OverlaybdError):
                    dev.pread(at, 4096)
                spent = proxy.blob_gets - before
                assert 2 <= spent <= DEFAULT_POLICY.attempts, f"{spent} requests for one read ({mode})"
                proxy.set("pass", 0)
                assert dev.pread(at, 4096) == content[at : at + 4096]  # the next operation starts afresh
        finally:
            proxy.close()


def test_one_client_one_token_for_every_layer_and_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens: list[dict[str, str]] = []
    vol, content = make_volume(tmp_path / "vol", snapshots=3)
    with registry(tmp_path / "reg", auth="token", token_requests=tokens) as host:
        monkeypatch.setenv("OVERLAYBD_REGISTRY_USERNAME", USER)
        monkeypatch.setenv("OVERLAYBD_REGISTRY_PASSWORD", "testpass")
        push(vol, parse_reference(f"{host}/tok/vol:v1"))
        monkeypatch.delenv("OVERLAYBD_REGISTRY_USERNAME")
        monkeypatch.delenv("OVERLAYBD_REGISTRY_PASSWORD")
        tokens.clear()
        lazy = pull(parse_reference(f"{host}/tok/vol:v1"), str(tmp_path / "lazy"), lazy=True).volume
        for _ in range(2):
            assert device_bytes(lazy) == content  # three layers, opened twice
        assert len(tokens) == 1, f"{len(tokens)} token requests: {tokens}"
        url = lazy.config["repoBlobUrl"]
        assert repository_for(url) is repository_for(url)
        repository = repository_for(url)
        assert isinstance(repository, RegistryRepository) and repository.client is RegistryClient.shared(host)


def test_connections_outlive_layers_and_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer, every open and every thread borrows from one client's pool: no more connections than requests
    were ever in flight at once (and one for the TLS probe), however many layers and opens."""
    vol, content = make_volume(tmp_path / "vol", snapshots=3)
    with registry(tmp_path / "reg") as host:
        push(vol, parse_reference(f"{host}/c/vol:v1"))
        proxy = FaultProxy(host)
        try:
            lazy = pull(parse_reference(f"{proxy.address}/c/vol:v1"), str(tmp_path / "lazy"), lazy=True).volume
            for n in range(3):
                monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / f"cache{n}"))  # all fetched again
                assert device_bytes(lazy) == content
            assert proxy.blob_gets > 3 * 3
            assert proxy.connections <= proxy.peak_in_flight + 1, (proxy.connections, proxy.peak_in_flight)
        finally:
            proxy.close()


def test_token_realm_secrets_never_show(tmp_path: Path, server: ScriptedServer,
                                        caplog: pytest.LogCaptureFixture) -> None:
    realm = f"http://robot:s3cret-pass@127.0.0.1:{free_port()}/token?sig=T0PSECRET&X-Amz-Credential=AKIA"
    server.answer("/v2/evil/img/manifests/v1", Reply(401, b"{}", headers={
        "WWW-Authenticate": f'Bearer realm="{realm}",service="evil",scope="repository:evil/img:pull"'}))
    ref = f"{server.address}/evil/img:v1"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(TransportError) as exc:
            pull(parse_reference(ref), str(tmp_path / "vol"))
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("overlaybd"))
    assert "GET http://127.0.0.1" in ours  # the requests are logged at DEBUG ...
    shown = str(exc.value) + ours  # ... with no secret in them
    assert "127.0.0.1" in str(exc.value) and "/token" in str(exc.value)
    for secret in ("s3cret", "robot", "T0PSECRET", "AKIA"):
        assert secret not in shown
    err = one_line_error(cli("-v", "pull", ref, str(tmp_path / "vol2")))
    for secret in ("s3cret", "robot", "T0PSECRET", "AKIA"):
        assert secret not in err


def test_a_token_realm_that_is_not_http_is_refused(tmp_path: Path, server: ScriptedServer) -> None:
    server.answer("/v2/evil/img/manifests/v1", Reply(401, b"{}", headers={
        "WWW-Authenticate": 'Bearer realm="file:///etc/passwd",service="evil"'}))
    with pytest.raises(AuthError, match="not an http"):
        pull(parse_reference(f"{server.address}/evil/img:v1"), str(tmp_path / "vol"))


def test_a_huge_token_answer_is_not_read_whole(tmp_path: Path, server: ScriptedServer) -> None:
    server.answer("/token", Reply(body=b" " * MiB, chunked=True, repeat_until=1 << 30))
    server.answer("/v2/evil/img/manifests/v1", Reply(401, b"{}", headers={
        "WWW-Authenticate": f'Bearer realm="http://{server.address}/token",service="evil"'}))
    with pytest.raises(AuthError, match="no token"):
        pull(parse_reference(f"{server.address}/evil/img:v1"), str(tmp_path / "vol"))
    assert server.sent < 64 * MiB


def test_config_blobs_are_capped_and_verified(tmp_path: Path, server: ScriptedServer) -> None:
    vol, _ = make_volume(tmp_path / "vol")
    with registry(tmp_path / "reg") as host:
        push(vol, parse_reference(f"{host}/cfg/vol:v1"))
        repo = RegistryRepository.shared(RegistryClient.shared(host), "cfg/vol")
        raw, _, _ = repo.get_manifest("v1")
        cfg = Manifest.parse(raw).config
        assert json.loads(repo.read_metadata_blob(cfg.digest, cfg.size))["rootfs"]["type"] == "layers"
        with pytest.raises(LimitError):
            repo.read_metadata_blob(cfg.digest, 5 * MiB)  # refused before asking
    big = b"{" + b" " * (5 * MiB) + b"}"
    server.answer(f"/v2/evil/img/blobs/{sha(big)}", Reply(body=big))
    scripted = RegistryRepository.from_blob_url(f"http://{server.address}/v2/evil/img/blobs")
    with pytest.raises(DigestMismatchError):  # the registry sends more than the 100 bytes declared
        scripted.read_metadata_blob(sha(big), 100)
    assert server.sent < 64 * MiB


def test_bad_repository_in_a_blob_url_is_refused() -> None:
    for url in ("http://h:1/v2/../../x/blobs", "http://h:1/v2/UPPER/blobs", "ftp://h/v2/a/blobs"):
        with pytest.raises(RemoteError):
            RegistryRepository.from_blob_url(url)
