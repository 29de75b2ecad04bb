"""hosts.toml as containerd reads it: folders looked for, hosts in file order, the server last, each key's forms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlaybd.cli.main import main
from overlaybd.errors import UsageError
from overlaybd.remote import hosts
from overlaybd.remote.client import RegistryClient
from overlaybd.remote.hosts import ALL, HostsFileError, RegistryHost, host_paths, load, parse, parse_duration
from overlaybd.remote.registry import RegistryRepository


def test_folders_looked_for_in_containerd_order() -> None:
    assert host_paths("/d", "reg.example:5000") == ["/d/reg.example_5000_", "/d/reg.example:5000", "/d/_default"]
    assert host_paths("/d", "docker.io") == ["/d/docker.io", "/d/_default"]


def test_no_folder_means_the_server_alone(tmp_path: Path) -> None:
    got = load("reg.example", str(tmp_path))
    assert got.hosts == (RegistryHost("", "reg.example", "/v2", mirror=False),)
    assert not got.has_mirrors


def test_mirrors_in_file_order_then_the_server(tmp_path: Path) -> None:
    folder = tmp_path / "reg.example_5000_"
    folder.mkdir()
    (folder / "hosts.toml").write_text('''
server = "https://reg.example:5000"
capabilities = ["pull", "resolve", "push"]

[host."http://zmirror:5001"]
  capabilities = ["pull"]
  header = { x-mirror = "z", x-two = ["a", "b"] }

[host."amirror.example/cache"]
  capabilities = ["pull", "resolve"]
  ca = "ca.pem"
  client = [["c.cert", "/abs/c.key"], "both.pem"]
  skip_verify = true

[host."https://raw.example/api"]
  override_path = true
  proxy = "socks5h://127.0.0.1:1080"
''')
    got = load("reg.example:5000", str(tmp_path))
    z, a, raw, server = got.hosts
    assert (z.scheme, z.host, z.path, z.capabilities, z.mirror) == ("http", "zmirror:5001", "/v2",
                                                                    frozenset({"pull"}), True)
    assert z.header == (("x-mirror", "z"), ("x-two", "a, b"))
    assert z.api == "http://zmirror:5001/v2"
    assert (a.scheme, a.host, a.path) == ("https", "amirror.example", "/cache/v2")
    assert a.capabilities == frozenset({"pull", "resolve"}) and a.skip_verify is True
    assert a.ca == (str(folder / "ca.pem"),)
    assert a.client == ((str(folder / "c.cert"), "/abs/c.key"), (str(folder / "both.pem"), ""))
    assert raw.api == "https://raw.example/api" and raw.capabilities == ALL
    assert raw.proxy == "socks5h://127.0.0.1:1080"
    assert (server.host, server.path, server.mirror) == ("reg.example:5000", "/v2", False)
    assert got.for_capability("resolve") == (a, raw, server)
    assert got.for_capability("push") == (raw, server)


def test_server_left_out_is_the_host_asked_for_with_every_capability(tmp_path: Path) -> None:
    folder = tmp_path / "_default"
    folder.mkdir()
    (folder / "hosts.toml").write_text('capabilities = ["pull"]\nheader = {x-a = "1"}\n'
                                       '[host."http://m:1"]\ncapabilities = ["pull", "resolve"]\n')
    got = load("other.example", str(tmp_path))
    assert got.hosts[-1] == RegistryHost("", "other.example", "/v2", ALL, header=(("x-a", "1"),), mirror=False)
    assert got.hosts[0].host == "m:1"


def test_a_url_ending_in_v2_keeps_its_path(tmp_path: Path) -> None:
    got = parse('[host."https://m.example/v2"]\n', "r", str(tmp_path))
    assert got.hosts[0].path == "/v2"


def test_docker_certs_folder(tmp_path: Path) -> None:
    folder = tmp_path / "reg.example"
    folder.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lone.cert", "other.txt"):
        (folder / name).write_text("x")
    (server,) = load("reg.example", str(tmp_path)).hosts
    assert server.ca == (str(folder / "ca.crt"),)
    assert server.client == ((str(folder / "client.cert"), str(folder / "client.key")), (str(folder / "lone.cert"), ""))


@pytest.mark.parametrize("text", [
    "server = [1]",
    '[host."http://m"]\ncapabilities = ["pull", "fly"]',
    '[host."http://m"]\ncapabilities = "pull"',
    '[host."http://m"]\nca = 3',
    '[host."http://m"]\nclient = [["a"]]',
    '[host."http://m"]\nskip_verify = "yes"',
    '[host."http://m"]\nheader = { "bad header" = "x" }',
    '[host."http://m"]\nheader = { x-a = "one\\r\\ntwo" }',
    '[host."http://m"]\nproxy = "ftp://p:1"',
    '[host."http://m"]\ndial_timeout = "5 seconds"',
    '[host."http://m"]\ndial_timeout = 5',
    '[host."ftp://m"]',
    '[host."http://"]',
    'host = 3',
    "not toml = = =",
])
def test_bad_files_are_typed_errors(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "hosts.toml").write_text(text)
    with pytest.raises(HostsFileError) as info:
        load("r", str(tmp_path))
    assert str(folder / "hosts.toml") in str(info.value)


def test_hosts_dir_chosen_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hosts.ENV, raising=False)
    monkeypatch.setattr(hosts, "_chosen", None)
    assert hosts.hosts_dir() == "/etc/containerd/certs.d"
    monkeypatch.setenv(hosts.ENV, "/from/env")
    assert hosts.hosts_dir() == "/from/env"
    hosts.use_hosts_dir("/chosen")
    try:
        assert hosts.hosts_dir() == "/chosen"
        assert os.environ[hosts.ENV] == "/chosen"  # processes started from here read the same
    finally:
        hosts.use_hosts_dir(None)


def test_a_bad_hosts_file_is_one_line_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(hosts, "_chosen", None)
    monkeypatch.setenv(hosts.ENV, "/nonexistent")  # --hosts-dir sets it: restored after the test
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    (tmp_path / "hosts" / "reg.example").mkdir(parents=True)
    (tmp_path / "hosts" / "reg.example" / "hosts.toml").write_text('[host."http://m"]\ncapabilities = ["fly"]\n')
    code = main(["pull", "--hosts-dir", str(tmp_path / "hosts"), "reg.example/team/vol:v1", str(tmp_path / "vol")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"overlaybd: error: {tmp_path / 'hosts' / 'reg.example' / 'hosts.toml'}: ")
    assert "unknown capability 'fly'" in err and not (tmp_path / "vol").exists()


@pytest.mark.parametrize(("text", "seconds"), [
    ("5s", 5.0), ("250ms", 0.25), ("1m30s", 90.0), ("1.5h", 5400.0), ("0", 0.0), ("2us", 2e-6), ("10ns", 1e-8),
    ("", None), ("5", None), ("s", None), ("5 s", None), ("-1s", None), ("5sec", None),
])
def test_go_durations(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_dial_timeout_is_the_connect_timeout_of_that_host_only(tmp_path: Path) -> None:
    got = parse('dial_timeout = "2s"\n[host."http://m:1"]\n  dial_timeout = "250ms"\n[host."http://n:1"]\n',
                "reg.example:5000", str(tmp_path))
    assert [h.dial_timeout for h in got.hosts] == [0.25, None, 2.0]
    server = RegistryClient.shared("reg.example:5000", plain_http=True)
    repo = RegistryRepository.shared(server, "team/dial", got)
    m, n, top = (e.client.policy.connect_timeout for e in repo.endpoints)
    assert (m, top) == (0.25, 2.0) and n == server.policy.connect_timeout


def test_reads_from_a_mirror_name_the_registry_they_are_for(tmp_path: Path) -> None:
    got = parse('[host."http://m:1"]\n', "reg.example:5000", str(tmp_path))
    repo = RegistryRepository.shared(RegistryClient.shared("reg.example:5000", plain_http=True), "team/ns", got)
    mirror, server = repo.endpoints
    assert mirror.url("/blobs/sha256:ab", "GET") == "http://m:1/v2/team/ns/blobs/sha256:ab?ns=reg.example%3A5000"
    assert mirror.url("/manifests/v1", "HEAD").endswith("/manifests/v1?ns=reg.example%3A5000")
    assert mirror.url("/blobs/uploads/x?digest=sha256:ab", "PUT") == "http://m:1/v2/team/ns/blobs/uploads/x?digest=sha256:ab"
    assert mirror.url("/blobs/uploads/?mount=a", "GET").endswith("?mount=a&ns=reg.example%3A5000")
    assert server.url("/blobs/sha256:ab", "GET") == "http://reg.example:5000/v2/team/ns/blobs/sha256:ab"


def test_a_client_certificate_file_that_is_missing_is_one_line(tmp_path: Path) -> None:
    got = parse('[host."https://m:1"]\n  client = ["gone.pem"]\n', "reg.example:5000", str(tmp_path))
    with pytest.raises(UsageError, match="no such file") as info:
        RegistryRepository.shared(RegistryClient.shared("reg.example:5000", plain_http=True), "team/gone", got)
    assert str(tmp_path / "gone.pem") in str(info.value)
