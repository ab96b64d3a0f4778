"""Triton kernels for plugin ops (imported lazily: set TRITON_INTERPRET=1 before importing to run on CPU)."""
