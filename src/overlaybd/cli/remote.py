"""``overlaybd push`` / ``pull`` / ``cache``: snapshots to and from repositories."""

from __future__ import annotations

import argparse
import datetime as dt
import os

from ..cache.store import BlobCache
from ..remote.reference import parse_reference
from ..remote.transfer import pull, push
from .common import emit_json, human, open_volume, parse_size, progress_bar


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("push", help="push a volume's snapshots to oci:PATH[:TAG] or HOST[:PORT]/REPO[:TAG]")
    p.add_argument("volume")
    p.add_argument("reference")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to a registry that is not on localhost")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.set_defaults(run=run_push)

    g = sub.add_parser("pull", help="make a volume from an image (eager: download everything; --lazy: on demand)")
    g.add_argument("reference")
    g.add_argument("volume")
    g.add_argument("--lazy", action="store_true", help="fetch only indexes now; data blocks when read")
    g.add_argument("--background", action="store_true", help="with --lazy: also download whole layers meanwhile")
    g.add_argument("--prefetch", metavar="TRACE", help="with --lazy: a trace recorded by 'serve --record-trace'; "
                   "its blocks are fetched first, concurrently, whenever the volume is opened")
    g.add_argument("--insecure", action="store_true")
    g.set_defaults(run=run_pull)

    c = sub.add_parser("cache", help="the shared cache of remote blocks")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = csub.add_parser("ls", help="cached blobs, how much of each, last used")
    ls.add_argument("--output", choices=("human", "json"), default="human")
    ls.set_defaults(run=run_cache_ls)
    pr = csub.add_parser("prune", help="evict least recently used blobs down to a size (default: the bound); "
                         "clears the marks of repositories caught serving wrong bytes")
    pr.add_argument("--max-size", help="e.g. 1G; 0 empties the cache")
    pr.set_defaults(run=run_cache_prune)
    ve = csub.add_parser("verify", help="hash whole cached blobs: share the ones that match their digest, evict "
                         "the others")
    ve.set_defaults(run=run_cache_verify)
    for q in (ls, pr, ve):
        q.add_argument("--cache-dir", help="default: $OVERLAYBD_CACHE_DIR, /var/cache/overlaybd as root")


def run_push(args: argparse.Namespace) -> int:
    with progress_bar("push", args.output == "human") as progress:
        report = push(open_volume(args.volume), parse_reference(args.reference), insecure=args.insecure,
                      progress=progress)
    if args.output == "json":
        emit_json({"reference": report.reference, "manifest": report.manifest_digest, "layers": report.layers})
    else:
        for layer in report.layers:
            print(f"snapshot {layer['snapshot']}: {layer['digest'][:19]} {human(layer['size'])} {layer['action']}")
        print(f"{report.reference}: {report.manifest_digest}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    with progress_bar("pull", not args.lazy) as progress:
        vol = pull(parse_reference(args.reference), args.volume, lazy=args.lazy, background=args.background,
                   insecure=args.insecure, progress=progress,
                   prefetch=os.path.abspath(args.prefetch) if args.prefetch else None)
    mode = "lazily (blocks fetched on demand)" if args.lazy else "fully, every blob verified"
    print(f"{vol.path}: {len(vol.lowers)} snapshot(s), {human(vol.size)}, pulled {mode}")
    return 0


def _cache(args: argparse.Namespace) -> BlobCache:
    return BlobCache(args.cache_dir)


def run_cache_ls(args: argparse.Namespace) -> int:
    entries = _cache(args).entries()
    if args.output == "json":
        emit_json([{"digest": e.digest, "size": e.size, "cached": e.cached_bytes, "last_used": e.last_used,
                    "state": e.state, "origin": e.origin or None} for e in entries])
        return 0
    for e in entries:
        when = dt.datetime.fromtimestamp(e.last_used).isoformat(timespec="seconds")
        where = "all repositories" if e.state == "verified" else e.origin
        if e.state == "bad":
            print(f"{e.digest[:19]}  BAD: {where} served bytes that do not match it; reads from there are stopped")
            continue
        print(f"{e.digest[:19]}  {human(e.cached_bytes):>10} of {human(e.size):>10}  {when}  {e.state:<8}  {where}")
    print(f"{len(entries)} entries, {human(sum(e.cached_bytes for e in entries))} cached")
    return 0


def run_cache_prune(args: argparse.Namespace) -> int:
    cache = _cache(args)
    freed = cache.prune(parse_size(args.max_size) if args.max_size is not None else None, clear_bad=True)
    print(f"freed {human(freed)}; {human(cache.usage())} left in {os.path.abspath(cache.root)}")
    return 0


def run_cache_verify(args: argparse.Namespace) -> int:
    results = _cache(args).verify()
    bad = 0
    for e, state in results:
        print(f"{e.digest[:19]}  {state}  {e.origin or 'verified'}")
        bad += state.startswith("corrupt") or state == "bad"
    return 2 if bad else 0
