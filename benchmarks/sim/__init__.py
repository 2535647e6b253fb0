"""The simulated-GPU harness: drivers of the CUDA kernels and ``python -m benchmarks.sim.run``."""
