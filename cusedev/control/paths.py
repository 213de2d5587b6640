"""Where an emulator keeps its runtime files: one private directory per device path.

Several emulators run side by side, so everything (FUSE mount point, sysfs
tree, control socket) is named after the device path it serves.
"""

from __future__ import annotations

import os

RUN_DIR = "/run/cusedev"


def escape(path: str) -> str:
    """A directory name for ``path`` (unique per absolute path, readable)."""
    return path.strip("/").replace("_", "__").replace("/", "_") or "_"


def runtime_dir(device_path: str, run_dir: str = RUN_DIR) -> str:
    return os.path.join(run_dir, escape(os.path.abspath(device_path)))


def control_socket(device_path: str, run_dir: str = RUN_DIR) -> str:
    """The control socket of the emulator serving ``device_path``."""
    return os.path.join(run_dir, escape(os.path.abspath(device_path)) + ".control")


def make_private_dir(device_path: str, run_dir: str = RUN_DIR) -> str:
    """Create (or fix up) ``runtime_dir(device_path)``, mode 0711 like its parent.

    Traversable but not listable: the sysfs tree below it must be readable by
    everyone, as /sys is, while the device's own mount stays guarded by the
    node's mode (the FUSE mount uses default_permissions).
    """
    path = runtime_dir(device_path, run_dir)
    for d in (run_dir, path):
        os.makedirs(d, mode=0o711, exist_ok=True)
        os.chmod(d, 0o711)
    return path
