"""Describing and checking layers and stacks (what ``info`` and ``check`` print), as plain data."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import numpy as np

from .errors import FormatError
from .formats.detect import open_layer, peel
from .formats.lsmt import glance
from .formats.lsmt.layer import LsmtLayer
from .formats.lsmt.spec import SECTOR, format_uuid
from .formats.lsmt.stack import LsmtStack
from .formats.lsmt.writable import SparseLayer, WritableBase, WritableLayer
from .formats.zfile.reader import ZFileSource
from .source.base import ExtentKind
from .source.file import FileSource


def _zfile_info(z: ZFileSource) -> dict[str, Any]:
    info = z.info
    stored = z.stored_lengths()
    return {
        "algorithm": info.algo_name,
        "block_size": info.block_size,
        "blocks": z.nblocks,
        "crc": z.verify,
        "header_overwritten": info.overwritten,
        "original_size": info.original_file_size,
        "compressed_size": sum(stored),
        "largest_stored_block": max(stored, default=0),
    }


def layer_kind(layer: LsmtLayer | WritableBase) -> str:
    if isinstance(layer, LsmtLayer):
        return "lsmt-sealed-in-place" if not layer.header.is_sealed else "lsmt-committed"
    if isinstance(layer, SparseLayer):
        return "lsmt-sparse-writable"
    return "lsmt-writable"


def describe_layer(path: str, index: str | None = None) -> dict[str, Any]:
    with ExitStack() as owned:
        f = owned.enter_context(FileSource(path))
        peeled = peel(f)
        out: dict[str, Any] = {"path": path, "file_size": f.size, "wrappers": peeled.wrappers}
        if peeled.tar is not None:
            out["tar"] = {"member": peeled.tar.name, "payload_offset": peeled.tar.offset,
                          "payload_size": peeled.tar.size}
        if peeled.zfile is not None:
            out["zfile"] = _zfile_info(peeled.zfile)
        if not peeled.is_lsmt:
            out["format"] = "zfile" if peeled.zfile is not None else "raw"
            out["size"] = peeled.source.size
            return out
        f.close()
        layer = open_layer(path, index, owned=owned)
        seg = layer.segments()
        zeroed = int(seg.zeroed.sum())
        mapped, zeroed_sectors = int(seg.length[~seg.zeroed].sum()), int(seg.length[seg.zeroed].sum())
        if isinstance(layer, LsmtLayer) and not out["wrappers"]:  # the shape the numpy-free reader gives too
            ends = glance.Ends(layer.header, layer.trailer, out["file_size"])
            return glance.sealed_info(path, ends, glance.IndexTotals(len(seg), zeroed, mapped, zeroed_sectors))
        out["format"] = layer_kind(layer)
        out["virtual_size"] = layer.virtual_size
        out["header"] = glance.header_info(layer.header)
        if isinstance(layer, LsmtLayer):
            out["trailer"] = glance.header_info(layer.trailer)
            out["index"] = {"offset": layer.trailer.index_offset, "records_on_disk": layer.trailer.index_size}
        if isinstance(layer, WritableLayer):
            out["index_file"] = layer.index_path
            out["torn_records_ignored"] = layer.torn_records
        out["records"] = len(seg)
        out["zeroed_records"] = zeroed
        out["mapped_bytes"] = mapped * SECTOR
        out["zeroed_bytes"] = zeroed_sectors * SECTOR
        return out


def describe_stack(stack: LsmtStack) -> dict[str, Any]:
    layers = [{"layer": k, "path": layer.name, "virtual_size": layer.virtual_size,
               "uuid": format_uuid(layer.uuid), "parent_uuid": format_uuid(layer.parent_uuid)}
              for k, layer in enumerate(stack.lowers)]
    out: dict[str, Any] = {"format": "lsmt-stack", "virtual_size": stack.size, "layers": layers,
                           "merged_records": len(stack.lower_index), "index_bytes": stack.lower_index.nbytes}
    if stack.upper is not None:
        out["upper"] = {"layer": len(stack.lowers), "path": stack.upper.name, "records": stack.upper.records()}
    totals = {k.value: 0 for k in ExtentKind}
    for ext in stack.extents():
        totals[ext.kind.value] += ext.length
    out["bytes"] = totals
    return out


def check_layer(path: str, index: str | None = None) -> dict[str, Any]:
    """Every check the format allows: headers, index order and bounds, and every ZFile block CRC. A file that is
    neither an LSMT layer nor a ZFile (its magic gone) is reported as corrupt, not as fine."""
    report: dict[str, Any] = {"path": path, "errors": [], "warnings": []}
    try:
        with ExitStack() as owned:
            f = owned.enter_context(FileSource(path))
            peeled = peel(f)
            report["format"] = "+".join(peeled.wrappers + (["lsmt"] if peeled.is_lsmt else [])) or "raw"
            if peeled.zfile is not None:
                z = peeled.zfile
                if not z.verify:
                    report["warnings"].append("ZFile has no per-block CRCs: blocks were only decompressed")
                report["blocks_checked"] = z.verify_all()
            if not peeled.is_lsmt and peeled.zfile is not None:
                return report  # a ZFile of any bytes: its blocks were all there is to check
            f.close()  # below: an LSMT layer, or what open_layer says is none
            layer = open_layer(path, index, owned=owned)
            report["format"] = "+".join(peeled.wrappers + [layer_kind(layer)])
            seg = layer.segments()
            report["records"] = len(seg)
            if isinstance(layer, LsmtLayer):
                h, t = layer.header, layer.trailer
                if h.is_sealed and (h.uuid != t.uuid or h.virtual_size != t.virtual_size):
                    report["warnings"].append("header and trailer disagree on uuid or virtual size")
                if len(seg):
                    last = int((seg.offset[-1] + seg.length[-1]) * SECTOR)
                    if last > layer.virtual_size:
                        report["warnings"].append(f"records map up to byte {last}, beyond the virtual size "
                                                  f"{layer.virtual_size}")
            if isinstance(layer, WritableLayer) and layer.torn_records:
                report["warnings"].append(f"{layer.torn_records} index record(s) at the end are torn (they point "
                                          f"past the data file, or are all zeros: an unflushed write cut off by a "
                                          f"crash); they are ignored")
            if isinstance(layer, WritableLayer) and layer.zeroed_past_end:
                report["warnings"].append(f"{layer.zeroed_past_end} zeroed record(s) point past the end of the data "
                                          f"file: they read as zeros, but the reference tools refuse to open the "
                                          f"layer (overlaybd layer commit commits it)")
            if len(seg) and not bool(np.all(seg.length > 0)):
                report["warnings"].append("index holds records of length 0")
    except FormatError as exc:  # corruption is the result; a file that cannot be read is an error (exit 1)
        report["errors"].append(str(exc))
    return report
