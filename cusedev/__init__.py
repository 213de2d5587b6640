"""cusedev: a userspace /dev/liveupdate (Linux Live Update Orchestrator, ABI v3)."""

__version__ = "0.1.0"
