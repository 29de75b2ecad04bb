"""``overlaybd layer create|commit|merge``: what ``overlaybd-create``, ``-commit`` and ``-merge`` do."""

from __future__ import annotations

import argparse
from contextlib import ExitStack

from .. import operations
from ..errors import UsageError
from ..formats.detect import open_layer
from ..formats.output import Compression, Written
from .common import emit_json, human, parse_size, progress_bar


def _compression_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4", help="ZFile codec (default lz4)")
    p.add_argument("--bs", type=int, default=4, metavar="KB", help="ZFile block size in KiB: 4..64 (default 4)")
    p.add_argument("--compress-threads", type=int, default=None, metavar="N", help="default: all cores")
    p.add_argument("-t", "--tar", action="store_true", help="wrap the output in the overlaybd tar envelope")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing output")
    p.add_argument("--output", choices=("human", "json"), default="human")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("layer", help="create, commit, seal and merge LSMT layers")
    lsub = p.add_subparsers(dest="layer_command", required=True, metavar="ACTION")

    c = lsub.add_parser("create", help="a new empty writable layer (data + index files)")
    c.add_argument("data")
    c.add_argument("index")
    c.add_argument("size", help="virtual size: 10G, 512M, or bytes")
    c.add_argument("-u", "--parent-uuid")
    c.add_argument("--uuid", help="default: random")
    c.add_argument("-s", "--sparse", action="store_true", help="sparse writable layer (raw image after a header)")
    c.set_defaults(run=run_create)

    m = lsub.add_parser("commit", help="compact a writable (or sealed) layer into a committed layer file")
    m.add_argument("files", nargs="+", metavar="FILE",
                   help="DATA INDEX OUT, or SEALED_OR_SPARSE OUT, or with --seal: DATA INDEX")
    m.add_argument("-m", "--message", default="", help="commit message (user tag, at most 256 bytes)")
    m.add_argument("--uuid", help="UUID of the new layer (default: null, as the reference)")
    m.add_argument("-p", "--parent-uuid", help="default: the source header's parent UUID")
    m.add_argument("-z", "--compress", action="store_true", help="ZFile the output (header overwritten, CRC on)")
    m.add_argument("--seal", action="store_true", help="seal the writable data file in place instead")
    _compression_options(m)
    m.set_defaults(run=run_commit)

    g = lsub.add_parser("merge", help="flatten layers (bottom to top) into one committed layer")
    g.add_argument("layers", nargs="+", metavar="LAYER")
    g.add_argument("-o", "--out", required=True)
    g.add_argument("--uuid")
    g.add_argument("-m", "--message", default="")
    g.add_argument("--no-compress", dest="compress", action="store_false",
                   help="write a plain LSMT (default: ZFile, as overlaybd-merge)")
    _compression_options(g)
    g.set_defaults(run=run_merge)


def _compression(args: argparse.Namespace, overwrite_header: bool) -> Compression | None:
    if not args.compress:
        return None
    return Compression(args.algorithm, args.bs * 1024, True, args.compress_threads, overwrite_header)


def _report(args: argparse.Namespace, w: Written) -> None:
    data = {"path": w.path, "size": w.size}
    if w.zfile is not None:
        data.update(algorithm=args.algorithm, block_size=w.zfile.block_size,
                    original_size=w.zfile.header.original_file_size, blocks=w.zfile.header.index_size)
    if args.output == "json":
        emit_json(data)
    else:
        print(f"{w.path}: {human(w.size)}" + (f" (ZFile {args.algorithm}, {w.zfile.block_size // 1024} KiB blocks, "
                                             f"{w.zfile.ratio:.1%} of {human(w.zfile.header.original_file_size)})"
                                             if w.zfile else ""))


def run_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    if size <= 0 or size % 512:
        raise UsageError(f"virtual size {size} must be a positive multiple of 512")
    operations.create(args.data, args.index, size, parent_uuid=args.parent_uuid, uuid=args.uuid, sparse=args.sparse)
    return 0


def run_commit(args: argparse.Namespace) -> int:
    files = args.files
    if args.seal:
        if len(files) not in (1, 2):
            raise UsageError("--seal takes DATA [INDEX]")
        operations.seal(files[0], files[1] if len(files) == 2 else None)
        return 0
    if len(files) == 3:
        data, index, out = files
    elif len(files) == 2:
        (data, out), index = files, None
    else:
        raise UsageError("commit takes DATA INDEX OUT, or SEALED_OR_SPARSE OUT")
    with ExitStack() as owned, progress_bar("commit", args.output == "human") as progress:
        layer = open_layer(data, index, owned=owned)
        w = operations.commit(layer, out, uuid=args.uuid, parent_uuid=args.parent_uuid, message=args.message,
                              compression=_compression(args, overwrite_header=True), tar=args.tar, force=args.force,
                              progress=progress)
    _report(args, w)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    with ExitStack() as owned, progress_bar("merge", args.output == "human") as progress:
        layers = [open_layer(p, owned=owned) for p in args.layers]
        w = operations.merge(layers, args.out, uuid=args.uuid, message=args.message,
                             compression=_compression(args, overwrite_header=False), tar=args.tar, force=args.force,
                             progress=progress)
    _report(args, w)
    return 0
