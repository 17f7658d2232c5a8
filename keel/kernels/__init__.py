"""Triton kernels. On a machine without a GPU they run under TRITON_INTERPRET=1 (the tests set it)."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    from keel.kernels.interpreter import patch_nested_calls

    patch_nested_calls()
