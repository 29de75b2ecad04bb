"""The ``overlaybd`` command: one small module per command."""
