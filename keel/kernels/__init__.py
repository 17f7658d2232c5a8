"""Triton kernels. On a machine without a GPU they run under TRITON_INTERPRET=1 (the tests set it)."""
