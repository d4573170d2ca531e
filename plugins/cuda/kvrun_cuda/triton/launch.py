"""One Triton kernel, launchable compiled (on a GPU) or in Triton's interpreter (on CPU).

Why not plain ``@triton.jit``: Triton decides between compiling and interpreting
when the decorator runs, that is when the kernel's module is first imported
(``triton.jit`` reads TRITON_INTERPRET then, and never again). In one test process
that imports the kernels early (a platform test, a GPU test) and sets
TRITON_INTERPRET=1 later, or the other way round, half the tests would launch the
wrong variant. :class:`Kernel` keeps both variants of the same Python function and
picks one at each launch from Triton's own ``knobs.runtime.interpret`` (which
follows TRITON_INTERPRET at the time of the launch).

The price: a kernel body may call no jitted function, its own or Triton's standard
library's (``tl.sum``, ``tl.max``, ``tl.zeros``, ...): those were bound compiled or
interpreted when triton itself was imported, and the other variant cannot call them.
Kernels use only Triton's builtins (``tl.full``, ``tl.reduce``, ``tl.dot``, ...) and
reduce with the two combine functions below, which the interpreter recognises by
identity (and runs as numpy reductions) and the compiler compiles like any jitted
function, whichever way triton was imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

__all__ = ["MAX", "SUM", "Kernel", "compile_blocker", "interpreting", "kernel"]

# Combine functions for tl.reduce: what tl.sum and tl.max pass (private in triton, but
# the interpreter matches these very objects, so they are as stable as it is).
SUM = tl.standard._sum_combine
MAX = tl.standard._elementwise_max


def interpreting() -> bool:
    """Whether launches run in Triton's interpreter (TRITON_INTERPRET=1, read by Triton)."""
    return bool(triton.knobs.runtime.interpret)


def compile_blocker() -> str | None:
    """Why no kernel can be compiled in this process, or None when they can."""
    if not isinstance(SUM, JITFunction):
        return (
            "triton was imported with TRITON_INTERPRET=1, so its standard library is "
            "interpreter-only in this process; unset it before triton is imported to compile"
        )
    return None


class Kernel:
    """A kernel body with a compiled and an interpreted variant; ``k[grid](*args)`` launches."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.__name__ = fn.__name__
        self.jit: JITFunction[Any] = JITFunction(fn)  # what triton.jit would have made
        self._interpreted: Any = None

    @property
    def arg_names(self) -> list[str]:
        return list(self.jit.arg_names)

    def interpreted(self) -> Any:
        """The interpreter's variant, built on first use (it imports numpy-backed machinery)."""
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., Any]:
        if interpreting():
            # The interpreter drops launch options (num_warps, ...) it has no use for.
            run: Callable[..., Any] = self.interpreted()[grid]
            return run
        blocker = compile_blocker()
        if blocker is not None:
            raise RuntimeError(f"cannot launch {self.__name__} compiled: {blocker}")
        launch = self.jit[grid]
        # FP fusion (FMA) on, said explicitly: Triton 3.9 warns when the default is relied on.
        return lambda *args, **kwargs: launch(*args, enable_fp_fusion=True, **kwargs)


def kernel(fn: Callable[..., None]) -> Kernel:
    """Decorator for a kernel body (instead of ``@triton.jit``)."""
    return Kernel(fn)
