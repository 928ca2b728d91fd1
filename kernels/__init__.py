"""golong Triton kernels."""
