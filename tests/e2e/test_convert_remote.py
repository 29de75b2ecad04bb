"""Converted images through a real registry (docker-registry) and skopeo, pulled back, and mounted: lazily through
the kernel as root, rootless through fuse2fs, writable with an overlayfs upper."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from overlaybd.remote import reference as reference_module
from overlaybd.remote.reference import parse_reference
from overlaybd.remote.transfer import pull
from overlaybd.testing.ociimage import write_image

from .convert_trees import E, make_tar
from .nbd_helpers import OVERLAYBD, require, run
from .registry import registry

pytestmark = pytest.mark.slow
PAYLOAD = os.urandom(200_000)


def source_layout(tmp: Path) -> Path:
    src = tmp / "src"
    write_image(str(src), [make_tar([E("app/", "dir"), E("app/data.bin", data=PAYLOAD), E("etc/os", data=b"one")]),
                           make_tar([E("etc/os", data=b"two"), E("app/.wh.gone")])], name="v1",
                 flavour="oci")  # skopeo reads OCI manifests only from a layout
    return src


def overlaybd(*args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([*OVERLAYBD, *args], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_registry_and_skopeo_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    skopeo = require("skopeo")
    monkeypatch.setenv("OVERLAYBD_CACHE_DIR", str(tmp_path / "cache"))
    src = source_layout(tmp_path)
    with registry(tmp_path / "reg") as host:
        run(skopeo, "copy", "--dest-tls-verify=false", f"oci:{src}:v1", f"docker://{host}/app/plain:v1")
        report = json.loads(overlaybd("convert", f"{host}/app/plain:v1", f"{host}/app/obd:v1", "--vsize", "1",
                                      "--output", "json"))
        raw = run(skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{host}/app/obd:v1")
        manifest = json.loads(raw)
        assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert [d["digest"] for d in manifest["layers"]] == [d["digest"] for d in report["manifests"][0]["layers"]]
        # skopeo copies it as any image (blobs verified), keeping every digest
        run(skopeo, "copy", "--src-tls-verify=false", "--preserve-digests", "--dest-oci-accept-uncompressed-layers",
            f"docker://{host}/app/obd:v1", f"oci:{tmp_path / 'copy'}:v1")
        copied = json.loads((tmp_path / "copy" / "index.json").read_text())["manifests"][0]
        assert copied["digest"] == report["digest"]
        again = json.loads(overlaybd("convert", f"oci:{src}:v1", f"{host}/app/obd2:v1", "--vsize", "1",
                                     "--output", "json"))
        assert again["digest"] == report["digest"]  # the same source from a layout: the same image
        pulled = pull(parse_reference(f"{host}/app/obd:v1"), str(tmp_path / "vol")).volume
        assert pulled.size == 1 << 30  # upper layers say 0, as the reference's: the size is the first one given
        export = tmp_path / "export.raw"
        run(*OVERLAYBD, "export", str(tmp_path / "vol"), str(export))
        out = subprocess.run(["debugfs", "-R", "cat /app/data.bin", str(export)], capture_output=True).stdout
        assert out == PAYLOAD
        os_file = subprocess.run(["debugfs", "-R", "cat /etc/os", str(export)], capture_output=True).stdout
        assert os_file == b"two"


@pytest.fixture()
def converted_layout(tmp_path: Path) -> str:
    src = source_layout(tmp_path)
    overlaybd("convert", f"oci:{src}:v1", f"oci:{tmp_path / 'obd'}:v1", "--vsize", "1")
    return f"oci:{tmp_path / 'obd'}:v1"


def _mounts() -> str:
    return Path("/proc/self/mounts").read_text()


def test_mount_lazily_through_the_kernel(tmp_path: Path, converted_layout: str) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("a kernel mount needs root and /dev/fuse (the rootless mount is tested apart)")
    env = {**os.environ, "OVERLAYBD_MOUNTS": str(tmp_path / "mounts"), "OVERLAYBD_CACHE_DIR": str(tmp_path / "c")}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    overlaybd("mount", converted_layout, str(mnt), env=env)
    try:
        assert (mnt / "app" / "data.bin").read_bytes() == PAYLOAD
        assert (mnt / "etc" / "os").read_bytes() == b"two"
        with pytest.raises(OSError):
            (mnt / "new").write_bytes(b"x")  # read-only
        vol = next((tmp_path / "mounts").iterdir()) / "volume"
        lowers = json.loads((vol / "config.json").read_text())["lowers"]
        assert lowers and all("dir" in e and "file" not in e for e in lowers)  # lazy: still in the repository
    finally:
        overlaybd("umount", str(mnt), env=env)
    assert str(mnt) not in _mounts()
    assert not list((tmp_path / "mounts").iterdir())  # the pulled volume went with the mount


def test_mount_writable_with_an_overlay_upper(tmp_path: Path, converted_layout: str) -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("an overlayfs upper needs root")
    env = {**os.environ, "OVERLAYBD_MOUNTS": str(tmp_path / "mounts"), "OVERLAYBD_CACHE_DIR": str(tmp_path / "c")}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    overlaybd("mount", converted_layout, str(mnt), "--writable", env=env)
    try:
        (mnt / "etc" / "os").write_bytes(b"changed")
        (mnt / "new").write_bytes(b"new")
        assert (mnt / "etc" / "os").read_bytes() == b"changed"
    finally:
        overlaybd("umount", str(mnt), env=env)
    overlaybd("mount", converted_layout, str(mnt), env=env)  # the image itself is unchanged
    try:
        assert (mnt / "etc" / "os").read_bytes() == b"two" and not (mnt / "new").exists()
    finally:
        overlaybd("umount", str(mnt), env=env)


def test_mount_rootless_with_fuse2fs(tmp_path: Path, converted_layout: str) -> None:
    require("fuse2fs")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE is not available here")
    env = {**os.environ, "OVERLAYBD_MOUNTS": str(tmp_path / "mounts"), "OVERLAYBD_CACHE_DIR": str(tmp_path / "c")}
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    overlaybd("mount", "--rootless", converted_layout, str(mnt), env=env)
    try:
        assert (mnt / "app" / "data.bin").read_bytes() == PAYLOAD
        assert "fuse" in next(line for line in _mounts().splitlines() if f" {mnt} " in line)
        with pytest.raises(OSError):
            (mnt / "new").write_bytes(b"x")
    finally:
        overlaybd("umount", str(mnt), env=env)
    assert str(mnt) not in _mounts()
    bad = subprocess.run([*OVERLAYBD, "umount", str(mnt)], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "no overlaybd mount" in bad.stderr


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def test_mount_rootless_as_nobody(tmp_path: Path) -> None:
    require("fuse2fs")
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root to become nobody, and FUSE")
    fuse = subprocess.run([*NOBODY, "test", "-r", "/dev/fuse", "-a", "-w", "/dev/fuse"], capture_output=True)
    if fuse.returncode:
        pytest.skip("/dev/fuse is not open to other users on this machine (it usually is: mode 0666)")
    python, python_env = _python_for_nobody()
    nobody_overlaybd = [python, "-m", "overlaybd.cli.main"]
    shared = Path(tempfile.mkdtemp(prefix="overlaybd-nobody-"))
    try:
        shared.chmod(0o777)
        src = source_layout(shared)
        overlaybd("convert", f"oci:{src}:v1", f"oci:{shared / 'obd'}:v1", "--vsize", "1")
        for p in [shared, *shared.rglob("*")]:
            p.chmod(0o777 if p.is_dir() else 0o666)
        mnt = shared / "mnt"
        mnt.mkdir(mode=0o777)
        mnt.chmod(0o777)
        env = {**os.environ, **python_env, "HOME": str(shared), "OVERLAYBD_MOUNTS": str(shared / "mounts"),
               "OVERLAYBD_CACHE_DIR": str(shared / "cache")}
        out = subprocess.run([*NOBODY, *nobody_overlaybd, "mount", f"oci:{shared / 'obd'}:v1", str(mnt)],
                             capture_output=True, text=True, env=env, cwd="/")
        assert out.returncode == 0, out.stderr
        try:  # a FUSE mount without allow_other is its user's only: read it as nobody
            read = subprocess.run([*NOBODY, "cat", str(mnt / "app" / "data.bin")], capture_output=True)
            assert read.returncode == 0 and read.stdout == PAYLOAD
        finally:
            out = subprocess.run([*NOBODY, *nobody_overlaybd, "umount", str(mnt)], capture_output=True, text=True,
                                 env=env, cwd="/")
            assert out.returncode == 0, out.stderr
    finally:
        subprocess.run(["umount", "-l", str(shared / "mnt")], capture_output=True)
        shutil.rmtree(shared, ignore_errors=True)


def _python_for_nobody() -> tuple[str, dict[str, str]]:
    """An interpreter ``nobody`` can run with this checkout's packages: this one, or, where it lives in a folder
    that is root's alone (a pyenv under /root, mode 0700), the system's python3 of the same version with this
    venv's packages on its path; skips when neither can start the mount daemon (a Python that starts Python)."""
    probe = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import overlaybd, numpy'], check=True)"
    if subprocess.run([*NOBODY, sys.executable, "-c", probe], capture_output=True, cwd="/").returncode == 0:
        return sys.executable, {}
    system = shutil.which("python3", path="/usr/bin:/bin")
    paths = [sysconfig.get_paths()["purelib"], str(Path(reference_module.__file__).parents[2])]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    if system is not None:
        same = subprocess.run([system, "-c", f"import sys; sys.exit(sys.version_info[:2] != {sys.version_info[:2]})"])
        started = subprocess.run([*NOBODY, "env", f"PYTHONPATH={env['PYTHONPATH']}", system, "-c", probe],
                                 capture_output=True, cwd="/")
        if same.returncode == 0 and started.returncode == 0:
            return system, env
    pytest.skip(f"nobody can start neither this Python ({sys.executable}) nor a system python3 "
                f"{sys.version_info[0]}.{sys.version_info[1]} with its packages: the mount daemon would not start")
