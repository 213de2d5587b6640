"""The split between the phases (docs/testing.md, "Which tests run where, and why") stays as documented.

The VM phase runs ``pytest -m vm`` only, so a test losing its marker would silently stop checking
CUSE in CI, and a heavy test gaining one would cost minutes of TCG time.  One collection of the
suite (no test runs) tells both; this runs on the host only.
"""

from __future__ import annotations

import subprocess
import sys

from _server import REPO

#: must run over real CUSE in every CI run (a module name means all of its tests)
MUST_BE_VM = [
    "test_environment.py",
    "test_transport.py",
    "test_abi_v3.py",
    "test_fuzz.py::test_fuzz_ioctls",
    "test_examples.py::test_c_client_tour",
    "test_examples.py::test_c_client_prepare_kexec_restore",
    "test_examples.py::test_guest_ram_survives_live_update",
    "test_lifecycle.py::test_restore_under_run",
    "test_lifecycle.py::test_vmm_demo_256mib",
    "test_crash.py::test_client_killed_at_random_times",
    "test_crash.py::test_emulator_sigterm_sigint[ioctl-loop]",
    "test_trace.py::test_record_and_replay_every_ioctl",
    "test_load.py::test_threads_of_one_opener",
    "test_session_errno.py::test_real_syscalls[7.2-dev_nr_out_of_range_einval]",
    "test_session_errno_c.py::test_every_row_from_c",
    "test_session_node.py::test_session_node_refuses_every_open_but_the_emulators_and_goes_at_stop",
    "test_session_node.py::test_kexec_ends_a_run_daemon_holding_only_session_fds",
]
#: transport-independent, and costly under TCG: the host runs them once
MUST_BE_HOST_ONLY = [
    "test_typecheck.py",
    "test_sysfs.py",
    "test_core.py",
    "test_uapi_layout.py",
    "test_examples.py::test_plugin_session_and_failure_report",
    "test_lifecycle.py::test_state_dir_restart",
    "test_trace.py::test_replay_restores_under_cusedev_run",
    "test_crash.py::test_killed_during_restore_under_run",
    "test_load.py::test_tight_loop_with_sysfs_and_status",
    "test_session_errno.py::test_model_harness",
    "test_session_errno.py::test_real_syscalls[6.19-dev_nr_out_of_range_einval]",
    "test_session_errno_c.py::test_row_list_is_the_clients",
]


def _collect(*args: str) -> list[str]:
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", *args,
                        "tests"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return [line.removeprefix("tests/") for line in p.stdout.splitlines() if line.startswith("tests/")]


def _matches(ids: list[str], pattern: str) -> list[str]:
    return [i for i in ids if i == pattern or i.startswith(pattern + "::") or i.startswith(pattern + "[")]


def test_vm_selection_is_as_documented() -> None:
    everything, vm = _collect(), set(_collect("-m", "vm"))
    for pattern in MUST_BE_VM:
        ids = _matches(everything, pattern)
        assert ids, f"{pattern} no longer exists: update this list and docs/testing.md"
        assert not [i for i in ids if i not in vm], f"{pattern} lost its `vm` marker"
    for pattern in MUST_BE_HOST_ONLY:
        ids = _matches(everything, pattern)
        assert ids, f"{pattern} no longer exists: update this list and docs/testing.md"
        assert not vm.intersection(ids), f"{pattern} is marked `vm`: it does not need CUSE"
    # the VM phase costs what it proves: a clear minority of the suite
    assert 0 < len(vm) < len(everything) / 3, (len(vm), len(everything))
