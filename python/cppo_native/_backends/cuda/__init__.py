"""CUDA backend: kernels in ``kernels/*.cu`` compiled and launched through CuPy."""
