"""Cheaper nested calls under TRITON_INTERPRET=1 (CPU runs of the kernels: the tests, debugging).

Triton's interpreter patches triton.language for each kernel launch, and again on every call of a nested
@triton.jit function (a helper, or tl.zeros itself), scanning the modules with inspect.getmembers each time:
about 2 ms per call, a third of a CPU test's time in keel's kernels, which call helpers in every program. A
nested call needs no patch when the launch in progress already patched the language modules it sees; only then
is it skipped, so what runs is unchanged. Applied only where the interpreter has the function this wraps.
"""

from __future__ import annotations

import inspect

import triton


def patch_nested_calls() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "keel_wrapped", False):
        return
    patched: list[set[int]] = []  # the language modules patched by the launch in progress; empty between launches

    def modules_seen(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang(fn):
        seen = modules_seen(fn)
        if patched and seen <= patched[0]:
            return _NoPatch()
        scope = original(fn)
        if patched:  # a nested call that sees a module the launch did not patch (as the interpreter, never undone)
            patched[0] |= seen
            return scope
        patched.append(seen)
        restore = scope.restore

        def restore_and_end() -> None:
            patched.clear()
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang.keel_wrapped = True
    interpreter._patch_lang = patch_lang


class _NoPatch:
    def restore(self) -> None:
        pass


# Under the interpreter each program costs a millisecond or more of Python, and a block of rows little more than
# one row (RMSNorm of 394 rows: 371 ms one row per program, 52 ms 32 rows per program), so the row-wise kernels
# (RMSNorm, SiLU) take up to this many rows per program there; on a GPU one row per program fills the SMs.
INTERPRETED_ROWS_PER_PROGRAM = 32


def rows_per_program(device_type: str, rows: int) -> int:
    if device_type == "cuda":
        return 1
    return min(INTERPRETED_ROWS_PER_PROGRAM, triton.next_power_of_2(rows))
