"""Replay a trace against a device (an emulator or a real kernel) and report divergences.

The trace's header names its ABI profile; that profile's replay rules
(``Profile.replay``) re-issue the calls and compare.  Checked here: the file
is a trace of this format, from a machine of this byte order.
"""

from __future__ import annotations

import sys
from typing import TextIO

from .. import profiles
from .record import FORMAT_VERSION
from .show import read_records


class ReplayError(Exception):
    """The trace cannot be replayed here; the message is one line for the user."""


def replay(path: str, device: str, *, stop_at_kexec: bool = False, after_kexec: bool = False,
           quiet: bool = False, out: TextIO | None = None) -> int:
    """Replay ``path`` against ``device``; 0 when nothing diverged, 1 otherwise."""
    try:
        records = list(read_records(path))
    except OSError as e:
        raise ReplayError(f"{path}: {e.strerror}") from None
    if not records or records[0].get("type") != "header":
        raise ReplayError(f"{path}: not a cusedev trace (no header record)")
    head = records[0]
    if head.get("format") != FORMAT_VERSION:
        raise ReplayError(f"{path}: trace format {head.get('format')}, this cusedev reads {FORMAT_VERSION}")
    try:
        profile = profiles.get(str(head.get("abi")))
    except ValueError:
        raise ReplayError(f"{path}: ABI profile {head.get('abi')!r} is not known here") from None
    if profile.replay is None:
        raise ReplayError(f"{path}: ABI profile {profile.name!r} has no replay rules")
    if head.get("endian") != sys.byteorder:
        raise ReplayError(f"{path}: recorded on a {head.get('endian')}-endian machine")
    return profile.replay(records, device, stop_at_kexec=stop_at_kexec, after_kexec=after_kexec, quiet=quiet,
                          out=out, path=path)
