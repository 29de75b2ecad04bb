"""On-disk formats: LSMT layers, ZFile, the tar envelope, and format detection."""
