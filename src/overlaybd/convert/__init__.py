"""Container images into overlaybd images: each OCI layer (a tar, plain, gzip or zstd) applied to an ext4 with the
reference's semantics, without root, committed as the reference convertor commits it.

| module | concept |
|---|---|
| ``ext2fs`` | libext2fs through ctypes: the library, its structures, its calls and errors |
| ``ext4`` | an ext4 in a sparse raw image: made as the reference's ``make_extfs``, changed inode by inode |
| ``tarlayer`` | a layer's tar stream (plain, gzip, zstd) as entries |
| ``applier`` | a tar applied with the reference's semantics (whiteouts, replacement, parents, directory times) |
| ``delta`` | the blocks a layer changed, written into a writable layer |
| ``gojson`` | JSON as Go's ``encoding/json`` writes it |
| ``imagespec`` | OCI manifests, configs and indexes read as the reference reads them, written as it writes them |
| ``source`` | the image to convert: manifests, multi-arch indexes, configs, layer streams |
| ``pipeline`` | one manifest converted layer by layer; an index converted manifest by manifest |
"""
