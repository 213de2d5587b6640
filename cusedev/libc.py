"""The one place that loads libc, and turns an errno into ``OSError``.

Every ctypes call into libc in the package goes through ``libc`` here, so the
``use_errno`` setting and the errno-to-exception rule are the same everywhere.
"""

from __future__ import annotations

import ctypes
import os

#: libc with errno saved after each call (``ctypes.get_errno``)
libc = ctypes.CDLL(None, use_errno=True)


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
