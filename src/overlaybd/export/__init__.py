"""Exporting a BlockSource as a block device: the NBD server."""
