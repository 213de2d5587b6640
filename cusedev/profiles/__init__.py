"""ABI profiles: each folder is one ABI of /dev/liveupdate; ``base`` is the ``Profile`` and the registry.

``get(name)`` and ``names()`` are re-exported here; see ``cusedev.profiles.base``
for how a profile is written.
"""

from .base import DEFAULT, Kind, Profile, get, names, register

__all__ = ["DEFAULT", "Kind", "Profile", "get", "names", "register"]
