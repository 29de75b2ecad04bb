"""``overlaybd convert SRC DST``: an OCI or Docker image (gzip, zstd or plain layers; one manifest or a multi-arch
index) into an overlaybd image, without root, as the reference convertor makes it (the work is in
``overlaybd.convert``)."""

from __future__ import annotations

import argparse
import logging

from ..convert import baselayer
from ..convert.pipeline import GiB, Options, convert
from ..remote.reference import parse_reference
from .common import emit_json, hosts_dir_option, human

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("convert", help="convert a container image (oci:PATH[:TAG] or HOST[:PORT]/REPO[:TAG]) into an "
                       "overlaybd image, without root")
    c.add_argument("source", metavar="SRC")
    c.add_argument("destination", metavar="DST", help="tagged DST's tag, 'latest' if it has none")
    c.add_argument("--vsize", type=int, default=64, metavar="GiB", help="size of the device (default 64)")
    c.add_argument("--algorithm", choices=("lz4", "zstd"), default="lz4", help="ZFile compression (default lz4)")
    c.add_argument("--bs", type=int, default=4, choices=(4, 8, 16, 32, 64), metavar="KiB",
                   help="ZFile block size (default 4)")
    c.add_argument("--oci", action="store_true", help="OCI media types (default: Docker's, as the reference)")
    c.add_argument("--mkfs", action=argparse.BooleanOptionalAction, default=True,
                   help="make the ext4 in the first layer (default); --no-mkfs puts overlaybd's base layer under "
                   "the image instead")
    c.add_argument("--base-layer", default=baselayer.DEFAULT_PATH, metavar="PATH",
                   help=f"with --no-mkfs: the ext4_64 base layer file (default {baselayer.DEFAULT_PATH})")
    c.add_argument("--concurrency", type=int, default=4, metavar="N",
                   help="manifests of a multi-arch index converted at once (default 4)")
    c.add_argument("--workdir", metavar="DIR", help="where the working files go (default: $TMPDIR); it needs "
                   "room for the image's files, a layer's tar and blobs")
    c.add_argument("--insecure", action="store_true", help="plain HTTP to a registry that is not on localhost")
    c.add_argument("--output", choices=("human", "json"), default="human")
    hosts_dir_option(c)
    c.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    src = parse_reference(args.source)
    dst = parse_reference(args.destination)
    options = Options(vsize=args.vsize * GiB, algorithm=args.algorithm, block_size=args.bs * 1024, oci=args.oci,
                      mkfs=args.mkfs, base_layer=args.base_layer, concurrency=args.concurrency,
                      workdir=args.workdir)
    report = convert(src, dst, options, insecure=args.insecure, events=log.info)
    if args.output == "json":
        emit_json(report.as_json())
        return 0
    for m in report.manifests:
        platform = "/".join(str(v) for v in (m.platform or {}).values() if isinstance(v, str)) or "image"
        size = sum(layer.size for layer in m.layers)
        print(f"{platform}: {m.digest} ({len(m.layers)} layers, {human(size)})")
    for digest in report.dropped:
        print(f"dropped attestation manifest {digest}")
    print(f"{report.reference}: {report.digest}")
    return 0
