"""The one place that loads libc, and turns an errno into ``OSError``.

Every ctypes call into libc in the package goes through ``libc`` here, so the
``use_errno`` setting and the errno-to-exception rule are the same everywhere.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

#: libc with errno saved after each call (``ctypes.get_errno``)
libc = ctypes.CDLL(None, use_errno=True)


def function(name: str, argtypes: Sequence[Any] | None = None, restype: Any = ctypes.c_int) -> Any:
    """A libc function object of its own (``libc[name]`` is a new one each time), so that argtypes
    set by one module never change another's."""
    fn = libc[name]
    if argtypes is not None:
        fn.argtypes = tuple(argtypes)
    fn.restype = restype
    return fn


def fail(code: int) -> OSError:
    """The exception for ``code``, as the kernel's ``-code`` reaches a caller."""
    return OSError(code, os.strerror(code))


def check(ret: int) -> int:
    """``ret`` if it is not negative, else ``OSError`` from the saved errno."""
    if ret < 0:
        raise fail(ctypes.get_errno())
    return ret


def last_error() -> OSError:
    """The saved errno of the last failed call as ``OSError``."""
    return fail(ctypes.get_errno())
