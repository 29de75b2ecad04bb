"""The persistent block cache for remote blobs."""
