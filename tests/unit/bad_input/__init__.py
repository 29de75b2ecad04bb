"""Bad input gets a clear error and loses nothing.

Systematic mutations of the reference fixtures (truncation, byte flips, absurd counts, wrong magics) and of
writable layers (torn records, torn data writes, locking, a full disk). Every outcome must be either a typed
:class:`overlaybd.errors.OverlaybdError` naming the file (and, for format errors, the offset), or a successful read
of exactly the bytes an independent reading of the spec predicts (``tests/oracle.py``). Never another exception type,
never wrong bytes where a CRC, a magic or a bound could have told.
"""

