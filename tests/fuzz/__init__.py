"""A mutational fuzzer over the reference fixtures: structure-aware damage (fields edited with their digests
and CRCs recomputed, so the damage reaches past the header checks), run through ``info``, ``check``, ``map`` and
``cat`` on both ZFile block paths (C and Python), judged by invariants that hold for any input.

* ``seeds``: the files mutated, from ../shared/fixtures.
* ``locate``: finding the structures of a file (tar envelope, ZFile, LSMT) with the oracle's parsers, and
  rebuilding a ZFile or envelope around changed contents.
* ``mutations``: the mutation steps (replayable from their arguments) and their random generation.
* ``harness``: one mutant through the commands on both paths, and the invariants.
* ``worker``: a child process (address space capped) that runs mutants and reports one JSON line each.
* ``regressions``: every problem found, kept and replayed every run.
"""
