"""The typed client of /dev/liveupdate: ``cusedev.client.LiveUpdateDevice`` (public API).

It lives with its profile (``cusedev.profiles.v3.client``); this name stays for users.
"""

from .profiles.v3.client import *  # noqa: F403
from .profiles.v3.client import Event, LiveUpdateDevice, State, new_struct

__all__ = ["Event", "LiveUpdateDevice", "State", "new_struct"]
