"""The ``Profile`` object of the v3 ABI, registered as ``"v3"`` (the default).

It ties together this folder: the model (``model``), the one table of the
device kind (``ops``), the trace rules, the status, state-dir and sysfs codecs
(``codecs``) and the client.  v3 has one kind of open file, the device: only
one may exist at a time, and closing it drops the outgoing files.
"""

from __future__ import annotations

from ..base import Kind, OpenFileContext, Profile, register
from . import codecs
from .client import LiveUpdateDevice
from .model import LiveUpdateCore
from .ops import OPS
from .uapi import LIVEUPDATE_IOCTL_FD_RESTORE


def _release(file: OpenFileContext) -> None:
    """close() of the device: every outgoing file is unpreserved; the global state stays."""
    file.model.drop_outgoing()


DEVICE = Kind("device", base=0, ops=OPS, exclusive=True, release=_release)

PROFILE = register(Profile(
    name="v3",
    summary="LUO v3 series (LKML 2025-08-07): global state machine, FD_PRESERVE/FD_RESTORE by token",
    kinds={"device": DEVICE},
    model=LiveUpdateCore,
    fd_commands=(LIVEUPDATE_IOCTL_FD_RESTORE,),
    trace=codecs.TRACE,
    status=codecs.status,
    format_status=codecs.format_status,
    sysfs=codecs.sysfs_attributes,
    client=LiveUpdateDevice,
    fault_points=("prepare", "kexec"),
    state_dir=codecs.state_dir,
    cdefs=("luo_v3.h",),
    replay=codecs.replay,
    control={"kho": codecs.kho},
))
