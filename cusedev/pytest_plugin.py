"""The pytest plugin's registered name (entry point ``pytest11`` ``cusedev``, and ``-p cusedev.pytest_plugin``).

The fixtures and hooks live in ``cusedev.testing.pytest_plugin``; this module only
re-exports them, so that exactly one module object is the plugin.
"""

from .testing.pytest_plugin import (
    EMULATOR_KEY,
    failure_section,
    liveupdate_device,
    liveupdate_emulator,
    pytest_addoption,
    pytest_configure,
    pytest_runtest_makereport,
)

__all__ = [
    "EMULATOR_KEY",
    "failure_section",
    "liveupdate_device",
    "liveupdate_emulator",
    "pytest_addoption",
    "pytest_configure",
    "pytest_runtest_makereport",
]
