"""Registries reached through mirrors and proxies, configured as containerd users configure them (hosts.toml).

The upstream is docker-registry; the mirror is a second docker-registry configured as a pull-through cache of it.
Clients see both through FaultProxy instances (counting, logging, and misbehaving when told), and the mirror sees
the upstream through a third one, which counts what the upstream served the mirror. SOCKS5 is microsocks, binding
its outgoing connections to 127.0.0.2, so the registry sees which connections came through it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from overlaybd.errors import DigestMismatchError
from overlaybd.remote import hosts
from overlaybd.remote import lazy as lazy_mod
from overlaybd.remote.lazy import shared_cache
from overlaybd.remote.reference import parse_reference
from overlaybd.remote.registry import RegistryRepository
from overlaybd.remote.transfer import pull, push
from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD, require
from .registry import FaultProxy, free_port, registry, self_signed_cert
from .test_remote_trust import SwappingProxy

pytestmark = pytest.mark.slow
MiB = 1 << 20
REPO = "team/vol"


@dataclass
class World:
    server: FaultProxy  # the upstream as clients see it: references name this host
    upstream_to_mirror: FaultProxy  # the upstream as the mirror sees it
    mirror: FaultProxy  # the mirror as clients see it
    upstream: str  # the upstream registry itself
    content: bytes  # the image's device
    blobs: set[str]  # the image's config and layer digests
    same_size: tuple[str, str, bytes]  # (digest of genuine/vol's layer, of other/vol's, genuine/vol's device)

    @property
    def ref(self) -> str:
        return f"{self.server.address}/{REPO}:v1"

    def reset(self) -> None:
        for p in (self.server, self.upstream_to_mirror, self.mirror):
            p.reset()


def _volume(path: Path, pieces: list[tuple[int, bytes]]) -> Volume:
    vol = Volume.create(str(path), 16 * MiB)
    for offset, data in pieces:
        with vol.open(writable=True) as dev:
            dev.pwrite(offset, data)
            dev.flush()
        vol.snapshot(f"at {offset}")
    return vol


def _device(vol: Volume) -> bytes:
    with vol.open() as dev:
        return dev.pread(0, dev.size)


def _same_size_pair(tmp: Path, host: str) -> tuple[str, str, bytes]:
    """genuine/vol and other/vol: one-layer images whose layer blobs have one size (incompressible payloads)."""
    for attempt in range(20):
        a = _volume(tmp / f"a{attempt}", [(MiB, os.urandom(MiB))])
        b = _volume(tmp / f"b{attempt}", [(MiB, os.urandom(MiB))])
        ra = push(a, parse_reference(f"{host}/genuine/vol:v1"))
        rb = push(b, parse_reference(f"{host}/other/vol:v1"))
        if ra.layers[0]["size"] == rb.layers[0]["size"]:
            return ra.layers[0]["digest"], rb.layers[0]["digest"], _device(a)
    pytest.fail("could not make two layer blobs of one size")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("mirrors")
    with registry(tmp / "upstream") as upstream:
        to_mirror = FaultProxy(upstream, accept_oci=True)
        server = FaultProxy(upstream)
        with registry(tmp / "mirror", pull_through=f"http://{to_mirror.address}") as mirror_host:
            mirror = FaultProxy(mirror_host)
            vol = _volume(tmp / "vol", [(0, os.urandom(3 * MiB)), (5 * MiB, b"second".ljust(2 * MiB, b"x"))])
            report = push(vol, parse_reference(f"{server.address}/{REPO}:v1"))
            blobs = {layer["digest"] for layer in report.layers}
            same = _same_size_pair(tmp, server.address)
            w = World(server, to_mirror, mirror, upstream, _device(vol), blobs, same)
            try:
                yield w
            finally:
                mirror.close()
        to_mirror.close()
        server.close()


@pytest.fixture(autouse=True)
def private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world: World) -> Iterator[None]:
    """A cache, a layer store and a hosts directory of each test's own; repositories made afresh."""
    monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.setenv(hosts.ENV, str(tmp_path / "hosts"))
    monkeypatch.setattr(hosts, "_chosen", None)
    for var in ("ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY",
                "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    RegistryRepository._shared.clear()
    world.reset()
    yield
    shared_cache().wait_verified()
    RegistryRepository._shared.clear()


def write_hosts(tmp_path: Path, server: str, text: str) -> Path:
    host, _, port = server.rpartition(":")
    folder = tmp_path / "hosts" / f"{host}_{port}_"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hosts.toml").write_text(text)
    return tmp_path / "hosts"


def mirror_hosts(tmp_path: Path, world: World, extra: str = "", caps: str = '["pull", "resolve"]') -> Path:
    return write_hosts(tmp_path, world.server.address,
                       f'[host."http://{world.mirror.address}"]\n  capabilities = {caps}\n{extra}')


def _blob_gets(p: FaultProxy) -> int:
    return sum(p.blob_gets_by_digest().values())


def test_pulls_go_through_the_mirror_and_the_upstream_serves_each_blob_once(world: World, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy_mod, "PROVE_FIRST", 0)  # these blobs are small: read them as large ones are read
    hosts_dir = mirror_hosts(tmp_path, world)
    # eager, from the command line (--hosts-dir)
    res = subprocess.run([*OVERLAYBD, "pull", "--hosts-dir", str(hosts_dir), world.ref, str(tmp_path / "eager")],
                         capture_output=True, text=True, env={**os.environ, hosts.ENV: "/nonexistent"})
    assert res.returncode == 0, res.stderr
    assert _device(Volume(str(tmp_path / "eager"))) == world.content
    assert world.server.seen == []  # nothing asked of the upstream itself: tag, config and layers from the mirror
    # docker-registry (2.8) as a pull-through cache fetches a blob it lacks twice: once to store it, once to stream
    # it to the client that asked; never again
    first = world.upstream_to_mirror.blob_gets_by_digest()
    assert set(first) == world.blobs and all(n <= 2 for n in first.values()), first
    # lazy, another machine (cache and layer store of its own), reading everything
    os.environ["OVERLAYBD_CACHE_DIR"] = str(tmp_path / "cache2")
    lazy = pull(parse_reference(world.ref), str(tmp_path / "lazy"), lazy=True).volume
    with lazy.open() as dev:
        assert dev.pread(0, 4096) == world.content[:4096]
        # the mirror's bytes are kept as the mirror's, not the registry's, until their blob is whole and checked
        unproven = {e.origin for e in shared_cache().entries() if e.state != "verified"}
        assert unproven == {f"http://{world.mirror.address}/v2/{REPO}/blobs"}
        assert dev.pread(0, dev.size) == world.content
    shared_cache().wait_verified()
    assert {e.state for e in shared_cache().entries()} == {"verified"}
    assert world.server.seen == []
    assert world.upstream_to_mirror.blob_gets_by_digest() == first  # the mirror had them all: nothing more upstream
    assert _blob_gets(world.mirror) > len(world.blobs)  # range reads, at the mirror


def test_a_cold_mirror_that_answers_ranges_with_whole_blobs_sends_those_reads_to_the_server(
        world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull-through cache that lacks a blob answers a range request with the whole blob from its start, streamed
    from its upstream: a read far into the blob goes to the server instead (the mirror meanwhile stores the blob),
    and the mirror is asked again later."""
    monkeypatch.setattr(lazy_mod, "PROVE_FIRST", 0)
    to_mirror = FaultProxy(world.upstream, accept_oci=True)
    try:
        with registry(tmp_path / "cold-mirror", pull_through=f"http://{to_mirror.address}") as cold:
            write_hosts(tmp_path, world.server.address,
                        f'[host."http://{cold}"]\n  capabilities = ["pull", "resolve"]\n')
            lazy = pull(parse_reference(world.ref), str(tmp_path / "lazy"), lazy=True).volume
            assert _device(lazy) == world.content
            ranges = [h.get("Range", "") for m, p, h, _ in world.server.seen if m == "GET" and "/blobs/" in p]
            assert ranges and all(r.startswith("bytes=") for r in ranges)  # reads the mirror could not serve yet
            assert to_mirror.blob_gets  # the mirror fetched (and stores) the blobs
    finally:
        to_mirror.close()


def test_a_mirror_with_token_auth_gets_its_own_tokens(world: World, tmp_path: Path) -> None:
    to_mirror = FaultProxy(world.upstream, accept_oci=True)
    tokens: list[dict[str, str]] = []
    try:
        with registry(tmp_path / "auth-mirror", auth="token", token_requests=tokens,
                      pull_through=f"http://{to_mirror.address}") as mirror:
            write_hosts(tmp_path, world.server.address, f'[host."http://{mirror}"]\n')
            assert _device(pull(parse_reference(world.ref), str(tmp_path / "a")).volume) == world.content
            assert world.server.seen == []  # everything from the mirror, with the mirror's token
            assert tokens and all(t["scope"] == f"repository:{REPO}:pull" for t in tokens)
    finally:
        to_mirror.close()


def test_a_mirror_that_is_down_falls_back_to_the_server(world: World, tmp_path: Path) -> None:
    write_hosts(tmp_path, world.server.address, f'[host."http://127.0.0.1:{free_port()}"]\n'
                f'[host."http://{world.mirror.address}"]\n  capabilities = ["pull"]\n')
    world.mirror.set("500")  # the second mirror answers 500 to every blob GET
    eager = pull(parse_reference(world.ref), str(tmp_path / "eager")).volume
    assert _device(eager) == world.content
    lazy = pull(parse_reference(world.ref), str(tmp_path / "lazy"), lazy=True).volume
    assert _device(lazy) == world.content
    assert world.server.blob_gets_by_digest().keys() == world.blobs
    assert world.mirror.blob_gets  # it was asked, and failed


def test_a_mirror_that_corrupts_bytes_is_left_and_nothing_wrong_is_served_or_kept(world: World,
                                                                                  tmp_path: Path) -> None:
    mirror_hosts(tmp_path, world)
    world.mirror.set("corrupt")  # one byte of every blob body flipped
    eager = pull(parse_reference(world.ref), str(tmp_path / "eager")).volume
    assert _device(eager) == world.content  # whole blobs are checked: the server's are taken
    os.environ["OVERLAYBD_CACHE_DIR"] = str(tmp_path / "cache2")
    RegistryRepository._shared.clear()  # another process: it does not know the mirror lied to the eager pull
    lazy = pull(parse_reference(world.ref), str(tmp_path / "lazy"), lazy=True).volume
    try:
        # ZFile CRCs catch flipped bytes in blocks: those reads go to the server; a whole blob the mirror served
        # that fails its digest (a byte flipped outside any block) stops this opening's reads of that layer
        assert _device(lazy) == world.content
    except DigestMismatchError as exc:
        assert "another blob" in str(exc)
    cache = shared_cache()
    cache.wait_verified()
    assert _device(lazy) == world.content  # opened again: the mirror's bytes are left where they failed
    assert world.mirror.blob_gets and world.server.blob_gets
    for entry, state in cache.verify():
        assert state != "corrupt, evicted", entry
        if entry.state in ("verified", "complete"):
            assert entry.origin in ("", f"http://{world.server.address}/v2/{REPO}/blobs"), entry
    # a pull straight from the server, on this machine, reads the right bytes
    write_hosts(tmp_path, world.server.address, "")
    RegistryRepository._shared.clear()
    direct = pull(parse_reference(world.ref), str(tmp_path / "direct"), lazy=True).volume
    assert _device(direct) == world.content


def test_a_small_blob_from_a_mirror_is_checked_before_it_is_used(world: World, tmp_path: Path) -> None:
    genuine, other, content = world.same_size
    liar = SwappingProxy(world.upstream, {genuine: ("other/vol", other)})
    try:
        write_hosts(tmp_path, world.server.address, f'[host."http://{liar.host}"]\n  capabilities = ["pull"]\n')
        ref = parse_reference(f"{world.server.address}/genuine/vol:v1")
        assert _device(pull(ref, str(tmp_path / "lazy"), lazy=True).volume) == content  # the server's, at once
        assert liar.lies
    finally:
        liar.close()


def test_a_mirror_serving_other_valid_bytes_is_caught_when_the_blob_is_whole(world: World, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy_mod, "PROVE_FIRST", 0)  # the blob is read as large ones are: range by range
    genuine, other, content = world.same_size
    liar = SwappingProxy(world.upstream, {genuine: ("other/vol", other)})
    try:
        write_hosts(tmp_path, world.server.address, f'[host."http://{liar.host}"]\n  capabilities = ["pull"]\n')
        ref = parse_reference(f"{world.server.address}/genuine/vol:v1")
        vol = pull(ref, str(tmp_path / "lazy"), lazy=True).volume
        with vol.open() as dev:
            try:
                dev.pread(0, dev.size)  # the whole blob, from the liar: its bytes are bound to the liar only
            except DigestMismatchError:
                pass  # the check may already have run, and this read found the liar caught
            shared_cache().wait_verified()
            # the layer's index came from the liar: this opening reads no more, rather than mix two blobs
            with pytest.raises(DigestMismatchError, match="another blob"):
                dev.pread(0, dev.size)
        with vol.open() as dev:  # opened again: the server serves this blob
            assert dev.pread(0, dev.size) == content
        assert liar.lies
        states = {(e.origin.split("/")[2], e.state) for e in shared_cache().entries() if e.origin}
        assert (liar.host, "bad") in states
        # the next volume, through the same hosts, and one straight from the server: right bytes
        again = pull(ref, str(tmp_path / "again"), lazy=True).volume
        assert _device(again) == content
        write_hosts(tmp_path, world.server.address, "")
        RegistryRepository._shared.clear()
        assert _device(pull(ref, str(tmp_path / "direct"), lazy=True).volume) == content
    finally:
        liar.close()


def test_capabilities_say_which_host_resolves_and_which_serves_blobs(world: World, tmp_path: Path) -> None:
    mirror_hosts(tmp_path, world, caps='["pull"]')
    assert _device(pull(parse_reference(world.ref), str(tmp_path / "a")).volume) == world.content
    tag_gets = [(m, p) for m, p, _, _ in world.server.seen if "/manifests/" in p]
    assert tag_gets == [("GET", f"/v2/{REPO}/manifests/v1")]  # the tag, resolved at the server only
    assert not [p for _, p, _, _ in world.mirror.seen if p.split("?")[0].endswith("/manifests/v1")]
    assert _blob_gets(world.server) == 0 and world.mirror.blob_gets_by_digest().keys() == world.blobs
    world.reset()
    RegistryRepository._shared.clear()
    mirror_hosts(tmp_path, world, caps='["resolve"]')
    os.environ["OVERLAYBD_CACHE_DIR"] = str(tmp_path / "cache2")
    assert _device(pull(parse_reference(world.ref), str(tmp_path / "b")).volume) == world.content
    assert _blob_gets(world.mirror) == 0 and world.server.blob_gets_by_digest().keys() == world.blobs
    assert [p for m, p, _, _ in world.mirror.seen if p.split("?")[0].endswith("/manifests/v1")]
    # a push goes to the first host that may push: not the mirror
    world.reset()
    vol = _volume(tmp_path / "pushed", [(0, b"pushed".ljust(4096, b"\0"))])
    push(vol, parse_reference(f"{world.server.address}/team/pushed:v1"))
    assert world.mirror.seen == [] and any(m == "PUT" for m, _, _, _ in world.server.seen)


def test_headers_from_hosts_toml_go_to_that_host_only(world: World, tmp_path: Path) -> None:
    mirror_hosts(tmp_path, world, extra='  header = { x-mirror-key = "k1", x-two = ["a", "b"] }\n')
    assert _device(pull(parse_reference(world.ref), str(tmp_path / "a"), lazy=True).volume) == world.content
    assert world.mirror.seen
    for _, _, headers, _ in world.mirror.seen:
        assert headers.get("x-mirror-key") == "k1" and headers.get("x-two") == "a, b"
    assert all("x-mirror-key" not in h for _, _, h, _ in world.server.seen)


def test_reads_from_a_mirror_name_the_registry_they_are_for(world: World, tmp_path: Path) -> None:
    """As containerd's: ``?ns=REGISTRY`` on a mirror's GETs and HEADs, so a mirror of several registries (Harbor,
    Spegel, Dragonfly) knows which is meant; docker-registry ignores it. Never on the server's requests."""
    mirror_hosts(tmp_path, world)
    assert _device(pull(parse_reference(world.ref), str(tmp_path / "a"), lazy=True).volume) == world.content
    reads = [(m, p) for m, p, _, _ in world.mirror.seen]
    assert reads and all(m in ("GET", "HEAD") for m, _ in reads)
    assert all(parse_qs(urlsplit(p).query) == {"ns": [world.server.address]} for _, p in reads), reads
    assert all("ns=" not in p for _, p, _, _ in world.server.seen)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERLAYBD, *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_client_certificates_are_tried_in_order_at_a_registry_that_requires_one(tmp_path: Path) -> None:
    """docker-registry with TLS and ``clientcas``: it takes only a certificate its CA list signed. hosts.toml lists
    pairs; the first the registry accepts is used (a refused one moves the client to the next)."""
    pairs = {}
    for name in ("server", "good", "wrong"):
        (tmp_path / name).mkdir()
        pairs[name] = self_signed_cert(tmp_path / name)
    (tmp_path / "both.pem").write_bytes(pairs["good"][0].read_bytes() + pairs["good"][1].read_bytes())
    vol = _volume(tmp_path / "vol", [(0, os.urandom(MiB))])
    with registry(tmp_path / "reg", tls=pairs["server"], client_cas=[pairs["good"][0]]) as host:
        ref = f"{host}/certs/vol:v1"

        def configure(client: str) -> None:
            write_hosts(tmp_path, host, f'server = "https://{host}"\nca = "{pairs["server"][0]}"\n{client}')

        configure("")
        refused = _cli("push", vol.path, ref)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "refused the handshake" in refused.stderr
        wrong, good = (f'["{pairs[k][0]}", "{pairs[k][1]}"]' for k in ("wrong", "good"))
        configure(f"client = [{wrong}]\n")
        assert _cli("push", vol.path, ref).returncode == 1
        configure(f"client = [{wrong}, {good}]\n")
        pushed = _cli("push", vol.path, ref)
        assert pushed.returncode == 0, pushed.stderr
        configure(f'client = [{wrong}, "{tmp_path / "both.pem"}"]\n')  # certificate and key in one file
        RegistryRepository._shared.clear()
        lazy = pull(parse_reference(ref), str(tmp_path / "lazy"), lazy=True).volume
        assert _device(lazy) == _device(vol)


@contextmanager
def microsocks(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """microsocks on 127.0.0.1, its outgoing connections from 127.0.0.2; yields (its address, its log)."""
    exe = require("microsocks")
    port = free_port()
    log = tmp_path / "microsocks.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([exe, "-i", "127.0.0.1", "-p", str(port), "-b", "127.0.0.2"], stdout=out,
                                stderr=out, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(10)


def test_pull_through_a_socks5_proxy_from_the_environment(world: World, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with microsocks(tmp_path) as (proxy, log):
        monkeypatch.setenv("ALL_PROXY", f"socks5h://{proxy}")
        assert _device(pull(parse_reference(world.ref), str(tmp_path / "a")).volume) == world.content
        os.environ["OVERLAYBD_CACHE_DIR"] = str(tmp_path / "cache2")
        assert _device(pull(parse_reference(world.ref), str(tmp_path / "b"), lazy=True).volume) == world.content
    peers = {peer for _, _, _, peer in world.server.seen}
    assert peers == {"127.0.0.2"}  # every request came out of the proxy
    assert f"connected to {world.server.address}" in log.read_text()


def test_a_socks5_proxy_for_one_host_in_hosts_toml(world: World, tmp_path: Path) -> None:
    with microsocks(tmp_path) as (proxy, log):
        mirror_hosts(tmp_path, world, extra=f'  proxy = "socks5h://{proxy}"\n')
        assert _device(pull(parse_reference(world.ref), str(tmp_path / "a"), lazy=True).volume) == world.content
    assert {peer for _, _, _, peer in world.mirror.seen} == {"127.0.0.2"}
    assert world.server.seen == [] or {peer for _, _, _, peer in world.server.seen} == {"127.0.0.1"}
    text = log.read_text()
    assert f"connected to {world.mirror.address}" in text and f"connected to {world.server.address}" not in text
