"""Hypothesis profiles for the property tests.

Every test states its own ``max_examples`` (sized so the whole folder runs in well under 90 s on two cores) and
``deadline=None`` (file I/O and first-call imports make timings noisy). The profiles set what the tests do not:

* ``pyoverlaybd`` (default): no deadline, print the reproduction blob of a failure, no too-slow health check.
* ``ci``: the same, derandomized, so a run is repeatable from the commit alone.

Pick one with ``HYPOTHESIS_PROFILE=ci``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("pyoverlaybd", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("pyoverlaybd"), derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pyoverlaybd"))
