"""Repositories for snapshots: OCI image-layout directories and OCI registries; lazy blob reads."""
