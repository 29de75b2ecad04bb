"""A volume served over NBD: the volume itself and each of its snapshots as exports, and, while the volume is
served writable or counted (``metrics``), its control socket: through it ``overlaybd snapshot VOL`` has this process
take the snapshot between requests and export it at once, and ``overlaybd stats VOL`` reads the figures.

    with ServedVolume(Volume("vol")) as served:
        asyncio.run(served.serve("unix:/run/vol.sock", stop=stop_event))
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from types import TracebackType
from typing import Any

from ..errors import LockedError
from ..formats.output import Compression
from ..metrics import Recorder
from ..source.base import BlockSource, Extent
from ..volume import Snapshot, Volume, VolumeError
from .control import ControlSocket, socket_path
from .control import request as control_request
from .nbd.limits import Limits
from .nbd.server import Export, NbdServer, serve

log = logging.getLogger(__name__)


class ServedVolume:
    def __init__(self, volume: Volume, *, readonly: bool = False, name: str = "",
                 record_trace: str | None = None) -> None:
        self.volume = volume
        self.readonly = readonly
        self._owned = ExitStack()
        try:
            main = self._owned.enter_context(volume.open(writable=not readonly, record_trace=record_trace))
            #: no lazily pulled layer to wait for: small requests can be served on the event loop
            self.local = all(os.path.exists(path) for path in volume.lowers)
            self.main = Export(name, main, readonly=readonly, description=f"volume {volume.path}", inline=self.local)
            self.exports = [self.main] + [self._snapshot_export(snap) for snap in volume.snapshots()]
        except BaseException:
            self._owned.close()
            raise
        self.server: NbdServer | None = None
        self.metrics: Recorder | None = None
        self._control: ControlSocket | None = None

    def _snapshot_export(self, snap: Snapshot) -> Export:
        return Export(snap.uuid, SnapshotSource(self.volume, snap, self._owned), readonly=True, inline=self.local,
                      description=f"snapshot {snap.number}: {snap.message}".strip())

    # -- serving -------------------------------------------------------------------------------------------------
    async def serve(self, listen: str, *, ready: Callable[[str], None] | None = None,
                    stop: asyncio.Event | None = None, workers: int = 8, limits: Limits | None = None,
                    metrics: Recorder | None = None) -> None:
        """Serve the exports on ``listen`` until ``stop`` is set (see :func:`.nbd.server.serve`); ``metrics``
        counts, and ``overlaybd stats`` reads it through the control socket."""
        self.metrics = metrics
        try:
            await serve(self.exports, listen, ready=ready, stop=stop, workers=workers, limits=limits,
                        started=self._started, metrics=metrics)
        finally:
            self.server = None
            self.metrics = None
            if self._control is not None:
                await self._control.close()
                self._control = None

    async def _started(self, server: NbdServer) -> None:
        self.server = server
        if not self.readonly:
            self._control = ControlSocket(socket_path(self.volume.path), self._on_request)
            try:
                await self._control.start()
            except LockedError:  # a read-only server that counts holds it: it gives it up to the writer
                loop = asyncio.get_running_loop()
                reply = await loop.run_in_executor(None, control_request, self.volume.path, {"op": "release"}, 10.0)
                if not (reply or {}).get("ok"):
                    raise
                await self._control.start()
        elif self.metrics is not None:  # read-only servers of one volume may be several: the first answers
            control = ControlSocket(socket_path(self.volume.path), self._on_request)
            try:
                await control.start()
                self._control = control
            except LockedError:
                log.warning("%s: another process answers on the control socket; 'overlaybd stats' reads that "
                            "one's figures, not these", self.volume.path)

    async def _on_request(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("op") == "stats":
            if self.metrics is None:
                return {"ok": False, "error": "the server counts nothing: it was started without --metrics"}
            return {"ok": True, "stats": self.metrics.figures()}
        if request.get("op") == "release" and self.readonly and self._control is not None:
            await self._control.stop_listening()  # a writable server of the volume wants the socket
            log.warning("%s: a writable server took the control socket; 'overlaybd stats' reads its figures",
                        self.volume.path)
            return {"ok": True}
        if request.get("op") != "snapshot":
            return {"ok": False, "error": f"unknown operation {request.get('op')!r}"}
        if self.readonly:
            return {"ok": False, "error": "the volume is served read-only"}
        compression = Compression(request["compress"], 4096) if request.get("compress") else None
        snap = await self.snapshot(str(request.get("message", "")), compression)
        return {"ok": True, "snapshot": {"number": snap.number, "uuid": snap.uuid, "file_size": snap.file_size}}

    # -- snapshots -----------------------------------------------------------------------------------------------
    async def snapshot(self, message: str = "", compression: Compression | None = None) -> Snapshot:
        """Take a snapshot between requests (none in progress on the volume; replies waiting for slow clients do
        not count) and export it. Raises :class:`~.nbd.gate.BusyError` if requests in progress outlast the
        server's ``quiesce_timeout``."""
        if self.server is None:
            raise RuntimeError("the volume is not being served")
        return await self.server.quiesced(lambda: self._snapshot_now(message, compression))

    def _snapshot_now(self, message: str, compression: Compression | None) -> Snapshot:
        main = self.main
        main.source.flush()
        main.source.close()  # releases the upper and the volume lock for the snapshot
        try:
            snap = self.volume.snapshot(message, compression)
        finally:
            main.source = self._owned.enter_context(self.volume.open(writable=True))
        export = self._snapshot_export(snap)
        self.exports.append(export)
        if self.server is not None:
            self.server.exports[export.name] = export
        return snap

    # -- the end -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush what was written and close every layer."""
        try:
            if not self.readonly:
                self.main.source.flush()
        finally:
            self._owned.close()

    def __enter__(self) -> ServedVolume:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class SnapshotSource(BlockSource):
    """A snapshot's bytes, its layers opened at the first read: a volume of many snapshots is served without an
    index held for each until a client reads that snapshot (a 64-snapshot volume opened 64 stacks, 1 to 64
    layers deep, before the first client came)."""

    def __init__(self, volume: Volume, snap: Snapshot, owned: ExitStack) -> None:
        self.volume = volume
        self.number = snap.number
        self.name = f"{volume.path}@{snap.number}"
        self.size = snap.virtual_size
        self._owned = owned
        self._stack: BlockSource | None = None
        self._lock = threading.Lock()

    def _open(self) -> BlockSource:
        stack = self._stack
        if stack is None:
            with self._lock:
                if self._stack is None:
                    opened = self._owned.enter_context(self.volume.open(snapshot=self.number))
                    if opened.size != self.size:
                        raise VolumeError(f"snapshot {self.number} holds {opened.size} bytes, its record says "
                                          f"{self.size}", path=self.volume.path)
                    self._stack = opened
                stack = self._stack
        return stack

    def _read_aligned(self, offset: int, buf: memoryview) -> None:
        self._open().readinto(offset, buf)

    def _extents(self, offset: int, length: int) -> Iterator[Extent]:
        return self._open().extents(offset, length)

    def invalidate(self, offset: int, length: int) -> None:
        if self._stack is not None:
            self._stack.invalidate(offset, length)
