"""``overlaybd zfile compress|decompress|verify``: what ``overlaybd-zfile`` does, for any file."""

from __future__ import annotations

import argparse

from .common import emit_json, human, progress_bar

# Each action imports what it runs: compress and decompress load no numpy and no LSMT reader.


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("zfile", help="compress, decompress or verify ZFiles")
    zsub = p.add_subparsers(dest="zfile_command", required=True, metavar="ACTION")

    c = zsub.add_parser("compress", help="ZFile any file (blocks compressed on all cores)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4")
    c.add_argument("--bs", type=int, default=4, metavar="KB", help="block size in KiB: 4..64 (default 4)")
    c.add_argument("--no-crc", dest="crc", action="store_false", help="no per-block CRC (not recommended)")
    c.add_argument("--threads", type=int, default=None, help="default: all cores")
    c.add_argument("-t", "--tar", action="store_true", help="wrap in the overlaybd tar envelope")
    c.add_argument("-f", "--force", action="store_true")
    c.add_argument("--output", choices=("human", "json"), default="human")
    c.set_defaults(run=run_compress)

    d = zsub.add_parser("decompress", help="the original bytes of a ZFile (tar envelope peeled)")
    d.add_argument("src")
    d.add_argument("dst")
    d.add_argument("-f", "--force", action="store_true")
    d.add_argument("--output", choices=("human", "json"), default="human")
    d.set_defaults(run=run_decompress)

    v = zsub.add_parser("verify", help="check every block CRC; exit 2 on a mismatch")
    v.add_argument("path")
    v.add_argument("--output", choices=("human", "json"), default="human")
    v.set_defaults(run=run_verify)


def run_compress(args: argparse.Namespace) -> int:
    from ..formats.output import Compression, compress_to
    from ..source.file import FileSource

    comp = Compression(args.algorithm, args.bs * 1024, args.crc, args.threads)
    with progress_bar("compress", args.output == "human") as progress:
        with FileSource(args.src) as src:
            w = compress_to(args.dst, src, comp, tar=args.tar, force=args.force, progress=progress)
    z = w.zfile
    assert z is not None
    if args.output == "json":
        emit_json({"path": w.path, "size": w.size, "original_size": z.header.original_file_size,
                   "block_size": z.block_size, "blocks": z.header.index_size, "algorithm": args.algorithm})
    else:
        print(f"{w.path}: {human(w.size)} ({z.ratio:.1%} of {human(z.header.original_file_size)}, "
              f"{z.block_size // 1024} KiB blocks)")
    return 0


def run_decompress(args: argparse.Namespace) -> int:
    from ..formats.zfile.extract import decompress_file

    with progress_bar("decompress", args.output == "human") as progress:
        size = decompress_file(args.src, args.dst, force=args.force, progress=progress)
    if args.output == "json":
        emit_json({"path": args.dst, "size": size})
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .. import operations
    from ..errors import FormatError

    try:
        with progress_bar("verify", args.output == "human") as progress:
            z = operations.verify_zfile(args.path, progress)
    except FormatError as exc:
        if args.output == "json":
            emit_json({"path": args.path, "ok": False, "error": str(exc)})
        else:
            print(f"{args.path}: corrupt: {exc}")
        return 2
    if args.output == "json":
        emit_json({"path": args.path, "ok": True, "blocks": z.nblocks})
    else:
        print(f"{args.path}: ok ({z.nblocks} blocks, every CRC matches)")
    return 0
