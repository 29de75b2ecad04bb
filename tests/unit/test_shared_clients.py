"""One client per (scheme, host, credentials, settings) in the process, one repository object per (client, name),
whoever asks and from however many threads."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from overlaybd.remote.auth import Credentials
from overlaybd.remote.http import RetryPolicy
from overlaybd.remote.lazy import repository_for
from overlaybd.remote.registry import RegistryClient, RegistryRepository


@pytest.fixture(autouse=True)
def no_machine_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    monkeypatch.delenv("OVERLAYBD_REGISTRY_USERNAME", raising=False)
    monkeypatch.delenv("OVERLAYBD_REGISTRY_PASSWORD", raising=False)


def test_one_client_per_key() -> None:
    a = RegistryClient.shared("registry.test:5000", plain_http=True)
    assert RegistryClient.shared("registry.test:5000", plain_http=True) is a
    assert a.base == "http://registry.test:5000"
    assert RegistryClient.shared("registry.test:5000", plain_http=False) is not a  # https: another endpoint
    alice = RegistryClient.shared("registry.test:5000", plain_http=True, credentials=Credentials("alice", "pw"))
    assert alice is not a and alice.credentials == Credentials("alice", "pw")
    assert RegistryClient.shared("registry.test:5000", plain_http=True, credentials=Credentials("alice", "pw")) is alice
    assert RegistryClient.shared("registry.test:5000", plain_http=True, policy=RetryPolicy(attempts=2)) is not a
    assert "pw" not in repr(alice.credentials)


def test_credentials_from_the_environment_pick_their_client(monkeypatch: pytest.MonkeyPatch) -> None:
    anonymous = RegistryClient.shared("env.test", plain_http=True)
    monkeypatch.setenv("OVERLAYBD_REGISTRY_USERNAME", "bob")
    monkeypatch.setenv("OVERLAYBD_REGISTRY_PASSWORD", "pw")
    bob = RegistryClient.shared("env.test", plain_http=True)
    assert bob is not anonymous and bob.credentials == Credentials("bob", "pw")


def test_one_repository_per_client_and_name_from_every_door() -> None:
    url = "http://doors.test:5000/v2/team/vol/blobs"
    repo = RegistryRepository.from_blob_url(url)
    assert repo is RegistryRepository.from_blob_url(url)
    assert repo is repository_for(url)
    assert repo is RegistryRepository.shared(RegistryClient.shared("doors.test:5000", plain_http=True), "team/vol")
    assert repo.blob_url() == url
    assert RegistryRepository.from_blob_url("http://doors.test:5000/v2/team/other/blobs").client is repo.client


def test_many_threads_get_the_same_objects() -> None:
    clients: list[RegistryClient] = []
    repos: list[RegistryRepository] = []
    start = threading.Barrier(32)

    def ask() -> None:
        start.wait()
        clients.append(RegistryClient.shared("race.test", plain_http=True))
        repos.append(RegistryRepository.from_blob_url("http://race.test/v2/r/blobs"))

    threads = [threading.Thread(target=ask) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(clients) == 32 and len({id(c) for c in clients}) == 1
    assert len({id(r) for r in repos}) == 1 and repos[0].client is clients[0]
