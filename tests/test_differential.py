"""The differential fuzzer (issue 16, item 3) on the host: deterministic against the emulator.

In the VM, vm/guest-differential runs the same sequences against the real
kernel's /dev/liveupdate and against the emulator and compares them; a
comparison only means something if a sequence is a function of its seed, so
here two recorded runs against the emulator (profile 7.2, FUSE file, under
`cusedev run`) must agree seed by seed, and a changed answer must be found.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _server import ServerProc

from cusedev.testing import differential
from cusedev.tracing.record import read_records

CLI = [sys.executable, "-m", "cusedev"]
SEEDS, CALLS = "1-6", 30
REPO = Path(__file__).resolve().parent.parent


def _fuzz_recorded(emulator: ServerProc, out: Path) -> subprocess.CompletedProcess[str]:
    dev = emulator.device
    return subprocess.run(
        [*CLI, "trace", "record", "-o", str(out), "--device", dev, "--abi", "7.2", "--",
         *CLI, "run", "--device", dev, "--",
         sys.executable, "-m", "cusedev.testing.differential", "exec", "--device", dev, "--seeds", SEEDS,
         "--calls", str(CALLS)],
        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("emulator", [("--abi", "7.2", "--no-sysfs")], indirect=True)
def test_sequences_are_deterministic_against_the_emulator(emulator: ServerProc, tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for out in (a, b):
        p = _fuzz_recorded(emulator, out)
        assert p.returncode == 0, p.stdout + p.stderr
        assert [line for line in p.stdout.splitlines() if line.startswith("seed ")] == \
            [f"seed {s}" for s in differential.parse_seeds(SEEDS)]
    c = subprocess.run([sys.executable, "-m", "cusedev.testing.differential", "compare", str(a), str(b)],
                       capture_output=True, text=True, timeout=120)
    assert c.returncode == 0, c.stdout + c.stderr
    lines = c.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:-1]] == [f"seed {s}" for s in differential.parse_seeds(SEEDS)]
    summary = lines[-1]
    assert summary.startswith("differential: 6 sequences, ") and "0 divergent sequences" in summary
    ioctls = int(summary.split(", ")[1].split()[0])
    assert ioctls >= 40, summary

    recs = list(read_records(str(a)))
    kinds = {(r.get("name"), r.get("err")) for r in recs if r.get("type") == "ioctl"}
    # the sequences reach the kernel's rules, not only the happy path
    errs = {e for _n, e in kinds}
    assert {"EINVAL", "EFAULT", None} <= errs, kinds
    assert any(r.get("on") == "session" for r in recs)

    # a changed answer in one sequence is a divergence of that sequence only
    changed = [dict(r) for r in recs]
    victim = next(r for r in changed if r.get("type") == "ioctl" and r.get("comm") == "luo-seed-3")
    victim["errno"] = 0 if victim.get("errno") else 22
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in changed))
    c = subprocess.run([sys.executable, "-m", "cusedev.testing.differential", "compare", str(a), str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert c.returncode == 1
    assert "seed 3: DIVERGED" in c.stdout and "1 divergent sequences" in c.stdout
    assert "differ in errno" in c.stdout


def test_a_sequence_is_a_function_of_its_seed() -> None:
    """The steps drawn for a seed do not depend on anything but the seed."""
    def draws(seed: int) -> list[float]:
        s = differential.Sequence_(seed, 0, "/nonexistent")
        return [s.rng.random() for _ in range(5)]

    assert draws(7) == draws(7) and draws(7) != draws(8)
    assert differential.parse_seeds("1-3,9") == [1, 2, 3, 9]


def test_guest_script_parses() -> None:
    for name in ("guest-differential", "guest-differential-kexec"):
        script = REPO / "vm" / name
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
        assert script.stat().st_mode & 0o111


def test_the_agreeing_subset_is_answered_alike_by_6_19_and_7_2(public_dir: Path, transport_name: str,
                                                               tmp_path: Path) -> None:
    """``--agree`` leaves out what spec section 12 lists as different; what is left, 6.19 and 7.2 emulators
    answer call for call alike (so in the VM, 6.19 is judged by the 7.2 kernel on those calls).  Without
    ``--agree`` the same seeds tell the profiles apart: the comparison can fail."""
    traces: dict[tuple[str, bool], Path] = {}
    for abi in ("7.2", "6.19"):
        with ServerProc(str(public_dir / f"dev-{abi}"), transport_name, "--abi", abi, "--no-sysfs") as srv:
            srv.start()
            for agree in (True, False):
                out = traces[abi, agree] = tmp_path / f"{abi}-{agree}.jsonl"
                p = subprocess.run(
                    [*CLI, "trace", "record", "-o", str(out), "--device", srv.device, "--abi", abi, "--",
                     *CLI, "run", "--device", srv.device, "--", sys.executable, "-m", "cusedev.testing.differential",
                     "exec", "--device", srv.device, "--seeds", "1-12", "--calls", "40", *(["--agree"] * agree)],
                    capture_output=True, text=True, timeout=300)
                assert p.returncode == 0, p.stdout + p.stderr
    agreed = list(read_records(str(traces["7.2", True])))
    assert not [r for r in agreed if r.get("name") == "LIVEUPDATE_SESSION_GET_NAME" and r.get("on") == "session"]
    assert any(r.get("on") == "session" and r.get("errno") == 0 for r in agreed)

    def compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cusedev.testing.differential", "compare", str(a), str(b)],
                              capture_output=True, text=True, timeout=120)

    c = compare(traces["7.2", True], traces["6.19", True])
    assert c.returncode == 0, c.stdout
    summary = c.stdout.splitlines()[-1]
    assert summary.startswith("differential: 12 sequences, ") and "0 divergent sequences" in summary, summary
    assert int(summary.split(", ")[1].split()[0]) >= 200, summary
    c = compare(traces["7.2", False], traces["6.19", False])
    assert c.returncode == 1 and "DIVERGED" in c.stdout, c.stdout


KX_SEEDS, KX_CALLS = "1-4", 40


def test_two_part_sequences_across_cusedev_kexec(public_dir: Path, transport_name: str, tmp_path: Path) -> None:
    """The two-part sequences (part 1, the live update, part 2) against the emulator, as the VM runs them
    against the kernel: part 1 recorded by `trace record` and left holding its sessions (`record-hold`),
    `cusedev kexec`, part 2 recorded; the emulator's own trace of the same run, cut at its kexec record,
    says the same call for call (`compare --part`), and part 2 finds what part 1 left."""
    own, p1, p2 = tmp_path / "own.jsonl", tmp_path / "p1.jsonl", tmp_path / "p2.jsonl"
    holders: list[int] = []
    with ServerProc(str(public_dir / "dev-kx"), transport_name, "--abi", "7.2", "--no-sysfs",
                    "--trace", str(own)) as srv:
        srv.start()
        dev = srv.device
        try:
            h = subprocess.run([sys.executable, "-m", "cusedev.testing.differential", "record-hold", "-o", str(p1),
                                "--device", dev, "--run", dev, "--seeds", KX_SEEDS, "--calls", str(KX_CALLS)],
                               capture_output=True, text=True, timeout=300)
            assert h.returncode == 0, h.stdout + h.stderr + (tmp_path / "p1.jsonl.log").read_text()
            line = h.stdout.strip().splitlines()[-1]
            holders = [int(p) for p in line.split("(pids ")[1].split(")")[0].split(",")]
            assert len(holders) == 4, line  # one holder per sequence, each still alive
            assert all(Path(f"/proc/{p}").exists() for p in holders)
            k = subprocess.run([*CLI, "kexec", "--device", dev], capture_output=True, text=True, timeout=60)
            assert k.returncode == 0 and "live update" in k.stdout, k.stdout + k.stderr
            r = subprocess.run(
                [*CLI, "run", "--device", dev, "--", *CLI, "trace", "record", "-o", str(p2), "--abi", "7.2",
                 "--device", dev, "--", sys.executable, "-m", "cusedev.testing.differential", "exec", "--part", "2",
                 "--device", dev, "--seeds", KX_SEEDS, "--calls", str(KX_CALLS)],
                capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            for p in holders:  # the kexec ends them; on a failure before it, so does this
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
    readback = [ln for ln in r.stdout.splitlines() if ln.startswith("readback ")]
    assert any(" size " in ln for ln in readback), r.stdout  # a memfd crossed, retrieved and read back

    totals = []
    for part, mine in ((1, p1), (2, p2)):
        c = subprocess.run([sys.executable, "-m", "cusedev.testing.differential", "compare", "--part", str(part),
                            str(mine), str(own)], capture_output=True, text=True, timeout=120)
        assert c.returncode == 0, c.stdout
        summary = c.stdout.splitlines()[-1]
        assert summary.startswith("differential: 4 sequences, ") and " 0 divergent" in summary, summary
        totals.append(int(summary.split(", ")[1].split()[0]))
    assert totals[0] >= 80 and totals[1] >= 80, totals

    recs1, recs2 = list(read_records(str(p1))), list(read_records(str(p2)))
    ok = {(r.get("name"), r.get("on")) for r in recs2 if r.get("type") == "ioctl" and not r.get("errno")}
    # part 2 retrieves sessions by name and files by token: what part 1 left crossed
    assert ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", "device") in ok, ok
    assert ("LIVEUPDATE_SESSION_RETRIEVE_FD", "session") in ok, ok
    assert any(r.get("name") == "LIVEUPDATE_SESSION_PRESERVE_FD" and not r.get("errno") for r in recs1)
    assert [r for r in read_records(str(own)) if r.get("type") == "kexec"]
