"""``pytest bench/ --benchmark-only``: the benchmark suite runs halo-ops' torch path on CPU and Triton on CUDA."""
