"""``overlaybd.frozen.Frozen``: the records that replaced ``@dataclass(frozen=True, slots=True)`` on the paths of
the fast-starting commands behave as those dataclasses did."""

from __future__ import annotations

import pickle

import pytest

from overlaybd.formats.output import Compression, Written
from overlaybd.formats.tarwrap import TarMember
from overlaybd.formats.zfile.spec import ALGO_ZSTD, ZFileHeader
from overlaybd.source.base import Extent, ExtentKind


def test_equal_and_hashed_by_fields_within_one_class() -> None:
    a, b = Extent(0, 4096, ExtentKind.DATA), Extent(0, 4096, ExtentKind.DATA, None)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Extent(0, 4096, ExtentKind.ZERO) and a != Extent(0, 4096, ExtentKind.DATA, 1)
    assert a != (0, 4096, ExtentKind.DATA, None)  # another class is never equal
    assert TarMember("x", 512, 3) == TarMember("x", 512, 3) != TarMember("x", 512, 4)


def test_fields_cannot_be_assigned_or_deleted() -> None:
    e = Extent(0, 1, ExtentKind.HOLE)
    with pytest.raises(AttributeError):
        e.offset = 5
    with pytest.raises(AttributeError):
        del e.length
    with pytest.raises(AttributeError):
        e.other = 1
    assert e.end == 1


def test_replace_repr_pickle_and_defaults() -> None:
    h = ZFileHeader(flags=3)
    z = h.with_(algo=ALGO_ZSTD, block_size=65536)
    assert (z.algo, z.block_size, z.flags, h.algo) == (ALGO_ZSTD, 65536, 3, 1)
    assert repr(Extent(1, 2, ExtentKind.DATA, 0)) == ("Extent(offset=1, length=2, kind=<ExtentKind.DATA: 'data'>, "
                                                      "layer=0)")
    assert Compression() == Compression("lz4", 4096, True, None, False)
    w = Written("p", 10, 10)
    assert w.zfile is None and w.replace(size=11).size == 11 and w.size == 10
    for obj in (h, z, w, Compression("zstd", 65536), Extent(0, 1, ExtentKind.ZERO), TarMember("n", 0, 0)):
        assert pickle.loads(pickle.dumps(obj)) == obj
