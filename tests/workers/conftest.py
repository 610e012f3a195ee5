"""Engine tests share the one-thread fixture of tests/conftest.py (tiny tensors: one intra-op thread is faster
and steadier on a small CI machine; a 200-particle exact-energy step took 2 ms on one thread, 3-13 ms on two)."""
