"""``overlaybd stats VOL``: the figures of the server running on a volume (``serve VOL --metrics ...``), asked
through the volume's control socket."""

from __future__ import annotations

import argparse
from typing import Any

from ..export import control
from ..volume import VolumeError
from .common import emit_json, human, open_volume


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = sub.add_parser("stats", help="requests, bytes, latency, errors, cache and registry figures of the server "
                                     "running on a volume (serve --metrics)")
    s.add_argument("volume")
    s.add_argument("--output", choices=("human", "json"), default="human")
    s.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    vol = open_volume(args.volume)
    reply = control.request(vol.path, {"op": "stats"}, timeout=30.0)
    if reply is None:
        raise VolumeError("no server answers for this volume (start one with 'overlaybd serve VOL --metrics "
                          "HOST:PORT')", path=vol.path)
    if not reply.get("ok"):
        raise VolumeError(str(reply.get("error")), path=vol.path)
    figures: dict[str, Any] = reply["stats"]
    if args.output == "json":
        emit_json(figures)
    else:
        print(render(figures))
    return 0


def render(figures: dict[str, Any]) -> str:
    """The figures for a person: a line per command, then the gauges, the cache and each registry."""
    lines = [f"{'command':<14}{'requests':>10}{'bytes':>12}{'errors':>8}{'mean latency':>14}"]
    for name, c in sorted(figures.get("requests", {}).items()):
        mean = f"{c['seconds'] / c['count'] * 1e6:.0f} us" if c["count"] else "-"
        errors = sum(c["errors"].values())
        lines.append(f"{name:<14}{c['count']:>10}{human(c['bytes']):>12}{errors:>8}{mean:>14}")
        for code, n in sorted(c["errors"].items()):
            lines.append(f"  {code}: {n}")
    if "connections" in figures:
        lines.append(f"connections open: {figures['connections']}")
    if "inflight_bytes" in figures:
        lines.append(f"bytes in flight: {human(figures['inflight_bytes'])} of "
                     f"{human(figures.get('inflight_bytes_limit', 0))}")
    cache = figures.get("cache", {})
    lines.append(f"cache: {cache.get('hits', 0)} hits, {cache.get('misses', 0)} misses")
    for host, r in sorted(figures.get("registries", {}).items()):
        lines.append(f"registry {host}: {human(r['bytes'])} received, {r['retries']} retries")
    return "\n".join(lines)
