"""CUDA sources of the kernels that beat their Triton versions (see README.md)."""
