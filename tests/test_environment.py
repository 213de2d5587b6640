"""The machine really is what the test phase claims (see scripts/test-all); in both phases (``vm``)."""

from __future__ import annotations

import os
import stat

import pytest

pytestmark = pytest.mark.vm

DEVICE_FOR = {"cuse": "/dev/cuse", "fuse": "/dev/fuse"}


def test_transport_device_is_present(transport_name: str) -> None:
    path = DEVICE_FOR[transport_name]
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pytest.fail(f"transport {transport_name!r} claimed but {path} does not exist")
    assert stat.S_ISCHR(st.st_mode), f"{path} is not a character device (mode {st.st_mode:o})"
