"""Living with native runtimes inside the Python process.

OpenVINO's CPU plugin installs its own signal stack (`sigaltstack`) on the thread that compiles a
model, and puts back the one it found when the plugin is destroyed. Two plugins destroyed in the
order they were made leave the thread on a freed stack, and the next signal Python handles there
(SIGCHLD from a DataLoader worker, with faulthandler on, as under pytest) kills the process with
SIGSEGV. `signal_stack_kept` puts the thread's own stack back as soon as the call returns.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator


class _Stack(ctypes.Structure):  # Linux's stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _sigaltstack():
    if sys.platform != "linux":  # other systems lay stack_t out differently; the plugin issue is Linux's
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), "sigaltstack", None)


def signal_stack() -> tuple[int, int] | None:
    """The calling thread's signal stack as (address, size): (0, 0) when it has none; None where
    this cannot be read (not Linux)."""
    call = _sigaltstack()
    if call is None:
        return None
    current = _Stack()
    call(None, ctypes.byref(current))
    return (current.ss_sp or 0, current.ss_size) if not current.ss_flags & 4 else (0, 0)  # SS_DISABLE


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Run the body, then give the calling thread back the signal stack it had before."""
    call = _sigaltstack()
    if call is None:
        yield
        return
    saved = _Stack()
    call(None, ctypes.byref(saved))
    try:
        yield
    finally:
        saved.ss_flags &= 4  # only SS_DISABLE may be passed back (SS_ONSTACK is a read-only state)
        call(ctypes.byref(saved), None)
