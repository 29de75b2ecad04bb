"""Push and pull against a real registry (CNCF distribution from Debian's docker-registry), read back by skopeo
as an independent client; Basic and token auth; faults injected between us and the registry."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from overlaybd.errors import ChecksumError, OverlaybdError
from overlaybd.remote.lazy import RemoteLayers
from overlaybd.remote.reference import parse_reference
from overlaybd.remote.transfer import pull, push
from overlaybd.volume import Volume

from .nbd_helpers import OVERLAYBD, require
from .registry import PASSWORD, USER, FaultProxy, registry

pytestmark = pytest.mark.slow
MiB = 1 << 20


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))  # never the machine's own credentials


def make_volume(path: Path, snapshots: int = 2) -> tuple[Volume, bytes]:
    vol = Volume.create(str(path), 64 * MiB)
    for n in range(snapshots):
        with vol.open(writable=True) as dev:
            text = b"".join(b"snapshot %d line %d of a compressible pattern\n" % (n, i) for i in range(60000))
            dev.pwrite(n * 9 * MiB + 4096, text[: 2 * MiB])
            dev.pwrite(n * 9 * MiB + 2 * MiB + 8192, os.urandom(6 * MiB))
            dev.flush()
        vol.snapshot(f"snapshot {n}")
    with vol.open() as dev:
        return vol, dev.pread(0, dev.size)


def device_bytes(vol: Volume) -> bytes:
    with vol.open() as dev:
        return dev.pread(0, dev.size)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*OVERLAYBD, *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})


def test_push_pull_eager_lazy_and_skopeo(tmp_path: Path) -> None:
    skopeo = require("skopeo")
    vol, content = make_volume(tmp_path / "vol")
    with registry(tmp_path / "reg") as host:
        report = push(vol, parse_reference(f"{host}/test/vol:v1"))
        assert [layer["action"] for layer in report.layers] == ["uploaded", "uploaded"]
        raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{host}/test/vol:v1"],
                             capture_output=True, text=True, check=True).stdout
        mf = json.loads(raw)
        assert mf["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        for desc, layer in zip(mf["layers"], report.layers, strict=True):
            ann = desc["annotations"]
            assert ann["containerd.io/snapshot/overlaybd/blob-digest"] == desc["digest"] == layer["digest"]
            assert ann["containerd.io/snapshot/overlaybd/blob-size"] == str(desc["size"])
            assert ann["containerd.io/snapshot/overlaybd/version"] == "0.1.0"
            assert desc["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
        # --preserve-digests: else skopeo gzips uncompressed layers on the way (and drops their annotations)
        subprocess.run([skopeo, "copy", "--preserve-digests", "--src-tls-verify=false", f"docker://{host}/test/vol:v1",
                        f"oci:{tmp_path / 'skopeo-copy'}:v1"], capture_output=True, check=True)
        via_skopeo = pull(parse_reference(f"oci:{tmp_path / 'skopeo-copy'}:v1"), str(tmp_path / "from-skopeo")).volume
        assert device_bytes(via_skopeo) == content

        # the next snapshot uploads only the new layer
        with vol.open(writable=True) as dev:
            dev.pwrite(40 * MiB, b"third" * 1000)
            dev.flush()
        vol.snapshot("third")
        content3 = device_bytes(vol)
        again = push(vol, parse_reference(f"{host}/test/vol:v2"))
        assert [layer["action"] for layer in again.layers] == ["exists", "exists", "uploaded"]

        eager = pull(parse_reference(f"{host}/test/vol:v2"), str(tmp_path / "eager")).volume
        assert device_bytes(eager) == content3
        res = cli("push", eager.path, f"{host}/test/vol:v3", "--output", "json")
        assert res.returncode == 0, res.stderr
        assert [x["digest"] for x in json.loads(res.stdout)["layers"]] == [x["digest"] for x in again.layers]

        lazy = pull(parse_reference(f"{host}/test/vol:v2"), str(tmp_path / "lazy"), lazy=True).volume
        assert not any(os.path.exists(p) for p in lazy.lowers)  # nothing downloaded
        with lazy.open() as dev:
            assert dev.pread(4096, 65536) == content3[4096 : 4096 + 65536]
        cache_dir = Path(os.environ["OVERLAYBD_CACHE_DIR"])
        cached = sum(p.stat().st_blocks * 512 for p in cache_dir.rglob("*.data"))
        total = sum(x["size"] for x in again.layers)
        assert cached < total / 2, (cached, total)  # a small read fetched a small part
        assert device_bytes(lazy) == content3
        # a lazily pulled volume pushed to another repository of the same registry: mounted, not uploaded
        moved = push(lazy, parse_reference(f"{host}/other/vol:v1"))
        assert [layer["action"] for layer in moved.layers] == ["mounted"] * 3
        # and it can be snapshotted and pushed again
        with lazy.open(writable=True) as dev:
            dev.pwrite(0, b"lazy upper" * 100)
            dev.flush()
        lazy.snapshot("on top of a lazy pull")
        last = push(lazy, parse_reference(f"{host}/other/vol:v2"))
        assert [layer["action"] for layer in last.layers] == ["exists"] * 3 + ["uploaded"]


def test_basic_auth_env_and_docker_config(tmp_path: Path) -> None:
    vol, content = make_volume(tmp_path / "vol", snapshots=1)
    with registry(tmp_path / "reg", auth="basic") as host:
        denied = cli("push", vol.path, f"{host}/auth/vol:v1")
        assert denied.returncode == 1
        assert denied.stderr.startswith("overlaybd: error:") and denied.stderr.count("\n") == 1
        assert "Traceback" not in denied.stderr
        env = {"OVERLAYBD_REGISTRY_USERNAME": USER, "OVERLAYBD_REGISTRY_PASSWORD": PASSWORD}
        ok = cli("push", vol.path, f"{host}/auth/vol:v1", env=env)
        assert ok.returncode == 0, ok.stderr
        wrong = cli("pull", f"{host}/auth/vol:v1", str(tmp_path / "wrong"),
                    env={"OVERLAYBD_REGISTRY_USERNAME": USER, "OVERLAYBD_REGISTRY_PASSWORD": "not-" + PASSWORD})
        assert wrong.returncode == 1 and PASSWORD not in wrong.stderr + wrong.stdout
        docker = Path(os.environ["DOCKER_CONFIG"])
        docker.mkdir(parents=True, exist_ok=True)
        import base64

        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (docker / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
        got = cli("pull", f"{host}/auth/vol:v1", str(tmp_path / "pulled"), "--lazy")
        assert got.returncode == 0, got.stderr
        assert device_bytes(Volume(str(tmp_path / "pulled"), opener=RemoteLayers())) == content


def test_token_auth(tmp_path: Path) -> None:
    vol, content = make_volume(tmp_path / "vol", snapshots=1)
    with registry(tmp_path / "reg", auth="token") as host:
        denied = cli("push", vol.path, f"{host}/tok/vol:v1")  # anonymous: pull only
        assert denied.returncode == 1 and "denied" in denied.stderr
        env = {"OVERLAYBD_REGISTRY_USERNAME": USER, "OVERLAYBD_REGISTRY_PASSWORD": PASSWORD}
        assert cli("push", vol.path, f"{host}/tok/vol:v1", env=env).returncode == 0
        anon = pull(parse_reference(f"{host}/tok/vol:v1"), str(tmp_path / "anon"), lazy=True).volume
        assert device_bytes(anon) == content


@pytest.mark.parametrize("mode,faults", [("500", 2), ("drop", 2), ("truncate", 2), ("ignore-range", -1),
                                         ("corrupt", 1)])
def test_faults_give_right_bytes_or_clear_errors(tmp_path: Path, mode: str, faults: int) -> None:
    vol, content = make_volume(tmp_path / "vol", snapshots=1)
    with registry(tmp_path / "reg") as host:
        push(vol, parse_reference(f"{host}/f/vol:v1"))
        proxy = FaultProxy(host)
        try:
            lazy = pull(parse_reference(f"{proxy.address}/f/vol:v1"), str(tmp_path / "lazy"), lazy=True).volume
            proxy.set(mode, faults)
            assert device_bytes(lazy) == content  # retried, refetched, or sliced: the right bytes
        finally:
            proxy.close()


def test_persistent_corruption_is_an_error_never_wrong_bytes(tmp_path: Path) -> None:
    vol, content = make_volume(tmp_path / "vol", snapshots=1)
    with registry(tmp_path / "reg") as host:
        push(vol, parse_reference(f"{host}/f/vol:v1"))
        proxy = FaultProxy(host)
        try:
            lazy = pull(parse_reference(f"{proxy.address}/f/vol:v1"), str(tmp_path / "lazy"), lazy=True).volume
            proxy.set("corrupt", -1)
            with lazy.open() as dev, pytest.raises(ChecksumError) as exc:
                dev.pread(0, dev.size)
            assert "CRC" in str(exc.value)
            proxy.set("pass", 0)
            assert device_bytes(lazy) == content  # the corrupt chunks were not kept
        finally:
            proxy.close()


def test_unreachable_registry_fails_cleanly(tmp_path: Path) -> None:
    from .registry import free_port

    res = cli("pull", f"127.0.0.1:{free_port()}/x/y:v1", str(tmp_path / "v"))
    assert res.returncode == 1 and res.stderr.startswith("overlaybd: error:") and "Traceback" not in res.stderr
    with pytest.raises(OverlaybdError):
        pull(parse_reference(f"127.0.0.1:{free_port()}/x/y:v1"), str(tmp_path / "v2"))


def test_trace_recorded_then_prefetched_at_lazy_start(tmp_path: Path) -> None:
    import time

    from overlaybd.trace import decode

    vol, content = make_volume(tmp_path / "vol", snapshots=2)
    trace_file = tmp_path / "boot.trace"
    with vol.open(record_trace=str(trace_file)) as dev:  # the "workload": two small reads
        dev.pread(4096, 8192)
        dev.pread(9 * MiB + 2 * MiB + 8192, 65536)
    recs = decode(trace_file.read_bytes())
    assert recs and {r.layer for r in recs} == {0, 1}
    assert (tmp_path / "boot.trace.ok").exists()
    with registry(tmp_path / "reg") as host:
        push(vol, parse_reference(f"{host}/t/vol:v1"))
        proxy = FaultProxy(host)
        try:
            lazy = pull(parse_reference(f"{proxy.address}/t/vol:v1"), str(tmp_path / "lazy"), lazy=True,
                        prefetch=str(trace_file)).volume
            with lazy.open() as dev:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and threading_busy("trace-prefetch"):
                    time.sleep(0.05)
                before = proxy.blob_gets
                assert dev.pread(4096, 8192) == content[4096 : 4096 + 8192]
                off = 9 * MiB + 2 * MiB + 8192
                assert dev.pread(off, 65536) == content[off : off + 65536]
                assert proxy.blob_gets == before  # both reads were served from what the prefetch fetched
        finally:
            proxy.close()


def threading_busy(name: str) -> bool:
    import threading

    return any(t.name == name and t.is_alive() for t in threading.enumerate())


def test_redirects_are_followed_and_remembered(tmp_path: Path) -> None:
    from .registry import RangeFileServer

    vol, content = make_volume(tmp_path / "vol", snapshots=1)
    storage = RangeFileServer(tmp_path / "reg" / "storage")
    try:
        with registry(tmp_path / "reg", redirect_to=storage.url) as host:
            push(vol, parse_reference(f"{host}/r/vol:v1"))
            proxy = FaultProxy(host)
            try:
                lazy = pull(parse_reference(f"{proxy.address}/r/vol:v1"), str(tmp_path / "lazy"), lazy=True).volume
                with lazy.open() as dev:
                    registry_gets = proxy.blob_gets
                    assert dev.pread(0, dev.size) == content
                    assert storage.gets >= 2  # the bytes came from "blob storage"
                    assert proxy.blob_gets == registry_gets  # the redirect URL was reused, not asked again
            finally:
                proxy.close()
    finally:
        storage.close()


def test_http_proxy_from_the_environment_and_no_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY is honoured (the FaultProxy, passing everything, serves as a forward proxy: plain-HTTP requests
    reach it with absolute URLs), and NO_PROXY takes a host off it again."""
    vol, content = make_volume(tmp_path / "vol", snapshots=1)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with registry(tmp_path / "reg") as host:
        proxy = FaultProxy(host)
        try:
            monkeypatch.setenv("HTTP_PROXY", f"http://{proxy.address}")
            push(vol, parse_reference(f"{host}/p/vol:v1"))
            through_proxy = proxy.blob_gets
            lazy = pull(parse_reference(f"{host}/p/vol:v1"), str(tmp_path / "via-proxy"), lazy=True).volume
            assert device_bytes(lazy) == content
            assert proxy.blob_gets > through_proxy, "the lazy reads did not go through HTTP_PROXY"
            monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache2"))  # nothing cached: all must fetch
            monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
            before = proxy.blob_gets
            direct = pull(parse_reference(f"{host}/p/vol:v1"), str(tmp_path / "direct"), lazy=True).volume
            assert device_bytes(direct) == content
            assert proxy.blob_gets == before, "NO_PROXY did not take the registry off the proxy"
        finally:
            proxy.close()


def test_chunked_upload_and_background_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from overlaybd.remote import registry as registry_module

    monkeypatch.setattr(registry_module, "UPLOAD_CHUNK", 1 << 20)  # every layer here spans several chunks
    vol, content = make_volume(tmp_path / "vol", snapshots=2)
    with registry(tmp_path / "reg") as host:
        report = push(vol, parse_reference(f"{host}/c/vol:v1"))
        assert all(layer["size"] > 2 << 20 for layer in report.layers)
        bg = pull(parse_reference(f"{host}/c/vol:v1"), str(tmp_path / "bg"), lazy=True, background=True).volume
        with bg.open() as dev:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(os.path.exists(p) for p in bg.lowers):
                time.sleep(0.05)
            assert all(os.path.exists(p) for p in bg.lowers)  # downloaded and verified meanwhile
            assert dev.pread(0, dev.size) == content
        assert device_bytes(Volume(bg.path, opener=RemoteLayers())) == content  # next time: from the local files


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "docker-credential-fake"
    helper.write_text(f"#!/bin/sh\nread host\necho '{{\"Username\": \"{USER}\", \"Secret\": \"{PASSWORD}\"}}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper_dir}:{os.environ['PATH']}")
    vol, content = make_volume(tmp_path / "vol", snapshots=1)
    with registry(tmp_path / "reg", auth="basic") as host:
        docker = Path(os.environ["DOCKER_CONFIG"])
        docker.mkdir(parents=True, exist_ok=True)
        (docker / "config.json").write_text(json.dumps({"credHelpers": {host: "fake"}}))
        push(vol, parse_reference(f"{host}/h/vol:v1"))
        assert device_bytes(pull(parse_reference(f"{host}/h/vol:v1"), str(tmp_path / "p"), lazy=True).volume) == content


def test_tls_with_a_private_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from .registry import self_signed_cert

    cert, key = self_signed_cert(tmp_path)
    vol, content = make_volume(tmp_path / "vol", snapshots=1)
    with registry(tmp_path / "reg", tls=(cert, key)) as host:
        untrusted = cli("push", vol.path, f"{host}/tls/vol:v1")
        assert untrusted.returncode == 1 and "certificate verify failed" in untrusted.stderr
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        assert cli("push", vol.path, f"{host}/tls/vol:v1").returncode == 0
        lazy = pull(parse_reference(f"{host}/tls/vol:v1"), str(tmp_path / "lazy"), lazy=True).volume
        assert lazy.config["repoBlobUrl"].startswith("https://")
        assert device_bytes(lazy) == content
