"""The ``Profile`` objects of the session ABI: ``"6.19"`` and ``"7.2"`` (alias ``"mainline"``).

Two kinds of open file.  ``device``: every open() of the node by a client,
exclusive (EBUSY), base 0, CREATE/RETRIEVE_SESSION; closing it changes
nothing (sessions outlive it).  ``session``: the open files our fd-returning
commands make of our own node, bound to one LUO session, base 0x40; 7.2 adds
the kind check; the last reference gone is the session's release (outgoing:
torn down, incoming: implicit FINISH).
"""

from __future__ import annotations

import functools
from typing import Any

from ..base import Kind, OpenFileContext, Profile, register
from . import codecs, ops
from .memfd import prepare_ahead
from .model import RULES_6_19, RULES_7_2, Rules, SessionModel


def _release_session(file: OpenFileContext) -> None:
    file.model.release(file.bound)


def _client() -> type:
    from .client import SessionDevice

    return SessionDevice


def _state_dir(path: str, model: SessionModel) -> Any:
    from .statedir import SessionStateDir

    return SessionStateDir(path, model)


def _replay(*args: Any, **kwargs: Any) -> int:
    from .replay import replay

    return replay(*args, **kwargs)


def make(rules: Rules, aliases: tuple[str, ...] = ()) -> Profile:
    kinds = {
        "device": Kind("device", base=0, ops=ops.DEVICE_OPS, exclusive=True),
        "session": Kind(
            "session",
            base=ops.uapi.SESSION_BASE,
            ops=ops.session_ops(rules),
            check=ops.kind_check if rules.kind_check else None,
            release=_release_session,
        ),
    }
    model: Any = functools.partial(SessionModel, rules, prepare=prepare_ahead)
    return Profile(
        name=rules.name,
        summary=f"session ABI of Linux {rules.name}: CREATE/RETRIEVE_SESSION, session fds (PRESERVE_FD, RETRIEVE_FD,"
        f" FINISH{', GET_NAME' if rules.get_name else ''})",
        kinds=kinds,
        model=model,
        fd_commands=ops.FD_COMMANDS,
        trace=codecs.TRACE,
        status=codecs.status,
        format_status=codecs.format_status,
        sysfs=codecs.sysfs_attributes,
        client=_client(),
        fault_points=("session_alloc", "file_preserve", "file_restore"),
        state_dir=_state_dir,  # type: ignore[arg-type]
        cdefs=("luo_session.h",),
        aliases=aliases,
        replay=_replay,
    )


PROFILE_6_19 = register(make(RULES_6_19))
PROFILE_7_2 = register(make(RULES_7_2, aliases=("mainline",)))
