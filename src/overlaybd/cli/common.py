"""What every command shares: sizes, JSON output, progress drawing."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from ..sizes import human, parse_size

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without loading typing (mypy reads the name alone)
if TYPE_CHECKING:
    from typing import Any

    from ..metrics import Recorder
    from ..volume import Volume

_verbose = False


def configure_logging(verbose: bool | None = None) -> None:
    """The command line's log format (``overlaybd: LEVEL: message``; INFO with -v), set once the logging module
    is loaded: at once with -v, else when the command's modules brought it in. Called after parsing, and again
    by a command after its late imports; the first configuration stays."""
    global _verbose
    if verbose is not None:
        _verbose = verbose
    if _verbose or "logging" in sys.modules:
        import logging

        logging.basicConfig(level=logging.INFO if _verbose else logging.WARNING,
                            format="overlaybd: %(levelname)s: %(message)s")


__all__ = ["configure_logging", "emit_json", "hosts_dir_option", "human", "open_volume", "parse_size", "progress_bar",
           "split_volume_ref", "start_metrics"]


class _HostsDir(argparse.Action):
    """--hosts-dir: set as it is parsed, for this process and the ones it starts (through the environment)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from ..remote.hosts import use_hosts_dir  # only when given: parsing loads no registry code

        use_hosts_dir(os.path.abspath(str(values)))
        setattr(namespace, self.dest, values)


def hosts_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hosts-dir", metavar="DIR", action=_HostsDir,
                   help="registry hosts (mirrors) as containerd reads them: DIR/HOST[:PORT]/hosts.toml (default: "
                   "$OVERLAYBD_HOSTS_DIR, else /etc/containerd/certs.d)")


def open_volume(path: str, *, remote: bool = True) -> Volume:
    """A volume whose snapshots may still be in their repository (pulled lazily). ``remote=False`` (for a command
    that only reads the volume as it is now): the repository readers (requests, the cache) are loaded only when
    a snapshot is not here."""
    from .. import volume_config
    from ..volume import Volume

    if not remote:
        config = volume_config.read_config(os.path.abspath(path))
        if all(os.path.exists(p) for p in volume_config.lower_paths(os.path.abspath(path), config)):
            configure_logging()
            return Volume(path)
    from ..remote.lazy import RemoteLayers  # loaded by the commands that open such volumes, not by every command

    configure_logging()
    return Volume(path, opener=RemoteLayers())


def split_volume_ref(text: str) -> tuple[str, str | None]:
    """``VOL@SNAP`` -> (VOL, SNAP); a plain path -> (path, None)."""
    if "@" in text and not os.path.exists(text):
        vol, _, ref = text.rpartition("@")
        return vol, ref
    return text, None


def emit_json(data: Any) -> None:
    import json  # loaded by the commands that print JSON

    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# a copy of less data than this ends before a bar would help: loading rich (about 0.1 s) would cost more than the
# copy (a few MiB of a sparse image: 10-20 ms)
BAR_BYTES = 64 << 20


@contextmanager
def progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A progress callback drawn with rich on a terminal (stderr), or None."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    try:  # an extra (pyoverlaybd[progress]), loaded when a bar is drawn; without it, no bar
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
    except ImportError:
        yield None
        return
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def start_metrics(spec: str, owned: ExitStack) -> tuple[Recorder, str]:
    """A recorder that keeps the figures, the process's, served over HTTP at ``spec``; (it, its URL)."""
    from .. import metrics
    from ..errors import UsageError

    try:  # prometheus-client is an extra (pyoverlaybd[metrics]), loaded only when asked for
        from ..export.prometheus import Endpoint, PrometheusMetrics
    except ImportError as exc:
        raise UsageError(f"--metrics needs prometheus-client (pip install 'pyoverlaybd[metrics]'): {exc}") from None
    recorder = PrometheusMetrics()
    endpoint = Endpoint(recorder, spec)
    owned.callback(endpoint.close)
    metrics.set_default(recorder)
    owned.callback(metrics.set_default, None)
    return recorder, endpoint.url
