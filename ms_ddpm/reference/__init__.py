"""PyTorch re-implementations of ms_ddpm's networks, for equivalence tests and as the benchmark's yardstick.

Test- and benchmark-only: importing a module of this package imports torch, which ms_ddpm itself never needs.
"""
