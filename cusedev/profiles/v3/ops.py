"""ABI profile "v3": the /dev/liveupdate ioctls of the LUO v3 series (spec sections 1, 5).

One row per command, in nr order; each handler is a few lines against the
pure model.  ``file`` is the open file (``cusedev.profiles.base.OpenFileContext``):
its ``model``, and its ``device`` that pulls the caller's fds and installs
restored ones.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from ...device.dispatch import Op, make_op
from ...device.memfd import ShmemFile
from ...device.seam import Caller
from ...libc import fail
from ..base import OpenFileContext
from . import uapi

NAME = "v3"
TYPE = uapi.LIVEUPDATE_IOCTL_TYPE


def fd_preserve(file: OpenFileContext, caller: Caller, v: tuple) -> None:
    """FD_PRESERVE: EBADF (fd), then the model's EBUSY / ENOENT (not shmem) / EEXIST."""
    _size, fd, token = v
    ours = file.device.take_fd(caller, fd)
    probed = False

    def probe() -> ShmemFile:
        nonlocal probed
        probed = True
        return ShmemFile.probe(ours)

    try:
        file.model.preserve(token, probe)
    except OSError:
        if not probed:
            os.close(ours)
        raise


def fd_unpreserve(file: OpenFileContext, caller: Caller, v: tuple) -> None:
    file.model.unpreserve(v[-1])


def fd_restore(file: OpenFileContext, caller: Caller, v: tuple) -> dict[str, int]:
    """FD_RESTORE: reserve the caller's fd (EMFILE), the model's checks, then install a new open file
    of the same pages; outside `cusedev run` EOPNOTSUPP once every check passed."""
    installer = file.device.installer_for(caller)
    if installer is not None:
        installer.reserve(caller)
    pf = file.model.restore(v[-1])
    if installer is None:
        file.device.warn_no_installer("FD_RESTORE")
        raise fail(errno.EOPNOTSUPP)
    fd = pf.ops.reopen()
    try:
        newfd = installer.install(caller, fd)
    finally:
        os.close(fd)
    file.model.mark_restored(pf)
    return {"fd": newfd}


def get_state(file: OpenFileContext, caller: Caller, v: tuple) -> dict[str, int]:
    return {"state": int(file.model.state)}


def set_event(file: OpenFileContext, caller: Caller, v: tuple) -> None:
    file.model.event(v[1])


def get_fd_state(file: OpenFileContext, caller: Caller, v: tuple) -> dict[str, int]:
    _size, incoming, token, _state = v
    return {"state": int(file.model.file_state(token, incoming != 0))}


def set_fd_event(file: OpenFileContext, caller: Caller, v: tuple) -> None:
    _size, event, token = v
    file.model.file_event(token, event)


def _op(nr: int, name: str, last: str, handler: Any, outputs: tuple[str, ...] = ()) -> Op:
    return make_op(
        TYPE,
        nr,
        f"LIVEUPDATE_IOCTL_{name}",
        f"struct liveupdate_ioctl_{name.lower()}",
        last,
        handler,
        outputs,
    )


OPS: tuple[Op, ...] = (
    _op(uapi.LIVEUPDATE_CMD_FD_PRESERVE, "FD_PRESERVE", "token", fd_preserve),
    _op(uapi.LIVEUPDATE_CMD_FD_UNPRESERVE, "FD_UNPRESERVE", "token", fd_unpreserve),
    _op(uapi.LIVEUPDATE_CMD_FD_RESTORE, "FD_RESTORE", "token", fd_restore, ("fd",)),
    _op(uapi.LIVEUPDATE_CMD_GET_STATE, "GET_STATE", "state", get_state, ("state",)),
    _op(uapi.LIVEUPDATE_CMD_SET_EVENT, "SET_EVENT", "event", set_event),
    _op(uapi.LIVEUPDATE_CMD_GET_FD_STATE, "GET_FD_STATE", "token", get_fd_state, ("state",)),
    _op(uapi.LIVEUPDATE_CMD_SET_FD_EVENT, "SET_FD_EVENT", "token", set_fd_event),
)
assert all(op.nr == i for i, op in enumerate(OPS)), "OPS must be indexed by command nr"
