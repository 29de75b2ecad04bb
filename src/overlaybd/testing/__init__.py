"""Test support shipped with the package: the BlockSource contract suite and Hypothesis strategies."""
