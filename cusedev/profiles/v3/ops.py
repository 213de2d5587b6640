"""ABI profile "v3": the /dev/liveupdate ioctls of the LUO v3 series (spec sections 1, 5).

One row per command, in nr order; each handler is a few lines against the
pure core.  ``ctx`` is the device session (``cusedev.device.openfiles.OpenFile``): it
supplies the core, pulls the caller's fds and installs restored ones.
"""

from __future__ import annotations

from typing import Any

from ...device.dispatch import Op, make_op
from . import uapi

NAME = "v3"
TYPE = uapi.LIVEUPDATE_IOCTL_TYPE


def fd_preserve(ctx: Any, caller: Any, v: tuple) -> None:
    _size, fd, token = v
    ctx.preserve(caller, fd, token)


def fd_unpreserve(ctx: Any, caller: Any, v: tuple) -> None:
    ctx.core.unpreserve(v[-1])


def fd_restore(ctx: Any, caller: Any, v: tuple) -> dict[str, int]:
    return {"fd": ctx.restore(caller, v[-1])}


def get_state(ctx: Any, caller: Any, v: tuple) -> dict[str, int]:
    return {"state": int(ctx.core.state)}


def set_event(ctx: Any, caller: Any, v: tuple) -> None:
    ctx.core.event(v[1])


def get_fd_state(ctx: Any, caller: Any, v: tuple) -> dict[str, int]:
    _size, incoming, token, _state = v
    return {"state": int(ctx.core.file_state(token, incoming != 0))}


def set_fd_event(ctx: Any, caller: Any, v: tuple) -> None:
    _size, event, token = v
    ctx.core.file_event(token, event)


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
