"""Every errno row of the session spec from a compiled C client (issue 14, item 5), for 6.19 and 7.2.

``tests/c/session_errno.c`` is built with gcc against ``cdefs/luo_session.h``
and run under `cusedev run` against the emulator: stage 1 (the rows that need
no live update, and the sessions stage 2 needs, held by a daemon), `cusedev
kexec`, stage 2 (the rows on carried sessions).  On the host this is the FUSE
file, in the VM real CUSE; ``vm/guest-steps`` runs the same binary against the
real kernel's /dev/liveupdate across a real kexec (the KERNEL phase).

``ROWS`` is the list of rows the client must print, so a dropped row fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from session_emulator import SessionEmulator  # noqa: E402

_BOTH_1 = [
    "dev_nr_out_of_range_einval", "dev_size_unreadable_efault", "dev_cmd_mismatch_enotty",
    "dev_size_below_min_einval", "dev_tail_e2big_zero_tail_ok", "dev_struct_fault_efault",
    "create_copyout_fault_efault", "dev_exclusive_open_ebusy", "files_reopen_and_read_write",
    "create_ok_struct_and_fd", "create_emfile_first", "create_empty_name",
    "create_no_nul_in_64", "create_63_bytes_ok", "create_duplicate_eexist", "retrieve_before_update_enoent",
    "sess_nr_out_of_range_einval", "sess_size_unreadable_efault", "sess_cmd_mismatch_enotty",
    "sess_size_below_min_einval", "sess_tail_e2big_zero_tail_ok", "sess_kind_outgoing",
    "preserve_token_eexist_first", "preserve_bad_fd_ebadf", "preserve_not_a_memfd_enoent",
    "preserve_ok_size_0_token_0", "preserve_twice_ebusy", "close_outgoing_unpreserves",
]  # fmt: skip
_STAGE_2 = [
    "retrieve_name_matching", "retrieve_twice_einval", "retrieve_session_emfile_first",
    "retrieve_copyout_fault_efault", "retrieve_fd_copyout_fault_efault",
    "released_before_update_enoent", "outgoing_may_reuse_incoming_name", "sess_kind_incoming",
    "retrieve_fd_rules", "finish_rules", "finish_empty_session",
]  # fmt: skip

#: (abi, stage) -> the rows the client prints
ROWS: dict[tuple[str, int], list[str]] = {
    ("6.19", 1): [*_BOTH_1, "create_session_cap_619_enomem", "preserve_file_cap_619_enospc", "stage1_carry"],
    ("7.2", 1): [*_BOTH_1, "get_name_reserved_einval", "get_name_written_back", "stage1_carry"],
    ("6.19", 2): _STAGE_2,
    ("7.2", 2): _STAGE_2,
}


def build(outdir: Path) -> Path:
    exe = outdir / "session_errno"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Werror", "-I", str(ROOT / "cdefs"), "-o", str(exe),
         str(ROOT / "tests/c/session_errno.c")],
        check=True,
    )  # fmt: skip
    return exe


def parse(out: str) -> tuple[list[str], list[str], str]:
    """(row names in order, failure lines, summary line) of one stage's output."""
    names, fails, summary = [], [], ""
    for line in out.splitlines():
        if line.startswith("ok "):
            names.append(line[3:])
        elif line.startswith("FAIL "):
            names.append(line[5:].split(":", 1)[0])
            fails.append(line)
        elif line.startswith("session_errno stage "):
            summary = line
    return names, fails, summary


@pytest.fixture(scope="module")
def exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("cerrno"))


@pytest.mark.vm  # the C rows on real CUSE too (the VM phase)
@pytest.mark.parametrize("abi", ["6.19", "7.2"])
def test_every_row_from_c(abi: str, exe: Path) -> None:
    with SessionEmulator(abi) as emu:
        for stage in (1, 2):
            if stage == 2:
                emu.kexec()
            r = emu.run([str(exe), "--abi", abi, "--stage", str(stage), "--device", emu.path],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
            names, fails, summary = parse(r.stdout)
            ctx = f"stage {stage}, rc {r.returncode}\n{r.stdout}\n{r.stderr}"
            assert not fails, ctx
            assert sorted(names) == sorted(ROWS[(abi, stage)]), ctx
            assert summary == f"session_errno stage {stage} abi {abi}: {len(names)} rows, 0 failed", ctx
            assert r.returncode == 0, ctx


def test_row_list_is_the_clients() -> None:
    """Every ROW() of the C source is in ROWS and the other way round: the list cannot drift."""
    src = (ROOT / "tests/c/session_errno.c").read_text()
    called = {line.strip()[4:-2] for line in src.splitlines() if line.strip().startswith("ROW(")}
    listed = {n for rows in ROWS.values() for n in rows}
    assert called == listed
