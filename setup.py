"""The compiled parts, all optional: runs of ZFile blocks in C over the system liblz4 and libzstd (Debian
liblz4-dev and libzstd-dev, which scripts/setup.sh installs), the merged index's one-record read, the cache's
hit path, the reads of the /dev/fuse export, and plain NBD reads and writes. Without a compiler or those
headers the build goes on, and overlaybd uses the Python code that does the same, more slowly (`overlaybd
--version` says which paths are in use). Everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "overlaybd.formats.zfile._blocks",
            sources=["src/overlaybd/formats/zfile/_blocks.c"],
            libraries=["lz4", "zstd", "dl", "m"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "overlaybd.formats.lsmt._lookup",
            sources=["src/overlaybd/formats/lsmt/_lookup.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "overlaybd.formats.lsmt._appender",
            sources=["src/overlaybd/formats/lsmt/_appender.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "overlaybd.cache._hits",
            sources=["src/overlaybd/cache/_hits.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "overlaybd.export._fusedev",
            sources=["src/overlaybd/export/_fusedev.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "overlaybd.export.nbd._nbdwrite",
            sources=["src/overlaybd/export/nbd/_nbdwrite.c"],
            depends=["src/overlaybd/export/nbd/_nbdwire.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "overlaybd.export.nbd._nbdread",
            sources=["src/overlaybd/export/nbd/_nbdread.c"],
            depends=["src/overlaybd/export/nbd/_nbdwire.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
