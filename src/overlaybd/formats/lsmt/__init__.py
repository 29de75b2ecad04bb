"""LSMT layers: sealed files, writable data+index pairs, stacks, commit and merge."""
