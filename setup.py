"""The one compiled part: runs of ZFile blocks in C over the system liblz4 and libzstd (Debian liblz4-dev and
libzstd-dev, which scripts/setup.sh installs). It is optional: without a compiler or those headers the build goes
on, and overlaybd uses its pure-Python block path, which gives the same bytes more slowly (`overlaybd version`
says which one is in use). Everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "overlaybd.formats.zfile._blocks",
            sources=["src/overlaybd/formats/zfile/_blocks.c"],
            libraries=["lz4", "zstd", "dl"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ]
)
