"""``overlaybd push`` / ``pull`` / ``cache`` / ``gc``: snapshots to and from repositories, the cache of remote
blocks, and the layer store."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os

from ..cache.store import BlobCache
from ..layerstore import LayerStore, StoreError
from ..remote.reference import parse_reference
from ..remote.transfer import pull, push
from .common import emit_json, hosts_dir_option, human, open_volume, parse_size, progress_bar, split_volume_ref

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("push", help="push a volume's snapshots (VOL@N: up to snapshot N) to oci:PATH[:TAG] or "
                       "HOST[:PORT]/REPO[:TAG]")
    p.add_argument("volume", metavar="VOL[@SNAP]")
    p.add_argument("reference")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to a registry that is not on localhost")
    p.add_argument("--output", choices=("human", "json"), default="human")
    _store_options(p)
    hosts_dir_option(p)
    p.set_defaults(run=run_push)

    g = sub.add_parser("pull", help="make a volume from an image (eager: download everything; --lazy: on demand)")
    g.add_argument("reference")
    g.add_argument("volume")
    g.add_argument("--lazy", action="store_true", help="fetch only indexes now; data blocks when read")
    g.add_argument("--background", action="store_true", help="with --lazy: also download whole layers meanwhile")
    g.add_argument("--prefetch", metavar="TRACE", help="with --lazy: a trace recorded by 'serve --record-trace'; "
                   "its blocks are fetched first, concurrently, whenever the volume is opened")
    g.add_argument("--insecure", action="store_true")
    g.add_argument("--upper", choices=("keep", "discard"),
                   help="updating a volume with writes not in a snapshot: keep them on top of the new snapshots, or "
                   "discard them (without it, such a pull is refused)")
    g.add_argument("--output", choices=("human", "json"), default="human")
    _store_options(g)
    hosts_dir_option(g)
    g.set_defaults(run=run_pull)

    gc = sub.add_parser("gc", help="remove layer-store blobs that no volume uses")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.add_argument("--output", choices=("human", "json"), default="human")
    gc.add_argument("--store", help="the layer store (default: $OVERLAYBD_LAYER_STORE, else CACHE/layers)")
    gc.set_defaults(run=run_gc)

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


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="the layer store shared by volumes (default: $OVERLAYBD_LAYER_STORE, else "
                        "CACHE/layers)")
    parser.add_argument("--no-store", action="store_true", help="neither use nor fill the layer store")


def _store(args: argparse.Namespace) -> LayerStore | None:
    """The layer store, or None (--no-store, or one that cannot be used: the command goes on without it)."""
    if getattr(args, "no_store", False):
        return None
    try:
        return LayerStore(args.store)
    except StoreError as exc:
        if args.store:
            raise
        log.warning("layer store not used: %s", exc)
        return None


def run_push(args: argparse.Namespace) -> int:
    vol_path, snap = split_volume_ref(args.volume)
    vol = open_volume(vol_path)
    upto = vol.resolve(snap) if snap is not None else None
    with progress_bar("push", args.output == "human") as progress:
        report = push(vol, parse_reference(args.reference), insecure=args.insecure, progress=progress, upto=upto,
                      store=_store(args))
    if args.output == "json":
        emit_json({"reference": report.reference, "manifest": report.manifest_digest, "layers": report.layers})
    else:
        for layer in report.layers:
            print(f"snapshot {layer['snapshot']}: {layer['digest'][:19]} {human(layer['size'])} {layer['action']}")
        print(f"{report.reference}: {report.manifest_digest}")
    return 0


def run_pull(args: argparse.Namespace) -> int:
    with progress_bar("pull", not args.lazy and args.output == "human") as progress:
        done = pull(parse_reference(args.reference), args.volume, lazy=args.lazy, background=args.background,
                    insecure=args.insecure, progress=progress, store=_store(args), upper=args.upper,
                    prefetch=os.path.abspath(args.prefetch) if args.prefetch else None)
    vol = done.volume
    if args.output == "json":
        emit_json({"volume": vol.path, "up_to_date": done.up_to_date, "snapshots": len(vol.lowers),
                   "size": vol.size, "layers": done.layers, "fetched_bytes": done.fetched_bytes})
        return 0
    if done.up_to_date:
        print(f"{vol.path}: up to date ({len(vol.lowers)} snapshot(s))")
        return 0
    for layer in done.layers:
        print(f"snapshot {layer['snapshot']}: {layer['digest'][:19]} {human(layer['size'])} {layer['action']}")
    mode = "lazily (blocks fetched on demand)" if args.lazy else "every fetched blob verified"
    print(f"{vol.path}: {len(vol.lowers)} snapshot(s), {human(vol.size)}; {len(done.layers)} new, "
          f"{human(done.fetched_bytes)} fetched, {mode}")
    return 0


def run_gc(args: argparse.Namespace) -> int:
    store = LayerStore(args.store)
    removed = store.gc(dry_run=args.dry_run)
    left = [b for b in store.entries() if b.links]
    if args.output == "json":
        emit_json({"store": store.root, "removed": [{"digest": b.digest, "size": b.size} for b in removed],
                   "dry_run": args.dry_run, "kept": len(left), "kept_bytes": sum(b.size for b in left)})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    for b in removed:
        print(f"{verb} {b.digest[:19]} {human(b.size)}")
    print(f"{store.root}: {verb} {len(removed)} blob(s), {human(sum(b.size for b in removed))}; "
          f"{len(left)} in use, {human(sum(b.size for b in left))}")
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
