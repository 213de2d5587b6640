"""The kernel's own LUO selftests, unchanged, pass against the emulator serving "7.2" (issue 14, item 6).

Built from Debian's linux-source-7.2 (``kselftest_build``), run by
``kselftest_run`` in a private mount namespace where the emulator's node is
``/dev/liveupdate``, each under `cusedev run`, with `cusedev kexec` between
stage 1 and stage 2 of the two-stage tests.  The TAP summary lines are
printed to the terminal.

On the host every binary runs.  On real CUSE (the VM phase) the same binaries
run from ``vm/guest-steps`` instead, all of them, beside the real kernel's own
run of them, and their result lines must be the kernel's; so nothing here is
``vm``-marked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kselftest_build import BINARIES, TWO_STAGE  # noqa: E402

#: what the VM phase runs (see the module text)
VM_BINARIES = ("luo_kexec_simple", "luo_multi_session")

_RESULTS: dict[str, Any] = {}


def _results() -> dict[str, Any]:
    if not _RESULTS:
        transport = os.environ.get("CUSEDEV_TEST_TRANSPORT", "fuse")
        env = {**os.environ, "CUSEDEV_TEST_TRANSPORT": transport, "PYTHONPATH": str(HERE.parent)}
        which = VM_BINARIES if transport == "cuse" else BINARIES
        r = subprocess.run(
            ["unshare", "-m", "--propagation", "private", sys.executable, str(HERE / "kselftest_run.py"),
             "--abi", "7.2", *which],
            capture_output=True, text=True, timeout=3000, env=env,
        )  # fmt: skip
        assert r.returncode == 0, f"kselftest_run failed (rc {r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        _RESULTS.update(json.loads(r.stdout.strip().splitlines()[-1]))
    return _RESULTS


def _show(capsys: pytest.CaptureFixture[str], name: str, steps: list[dict[str, Any]]) -> None:
    with capsys.disabled():
        for st in steps:
            print(f"\n[{name}] {' '.join(st['argv'])}: rc={st['rc']} ({st.get('seconds', 0)}s)")
            for line in st.get("tap", []):
                print(f"    {line}")


def _why(steps: list[dict[str, Any]]) -> str:
    return "\n".join(f"{' '.join(s['argv'])} rc={s['rc']}\n  " + "\n  ".join(s.get("tail", [])) for s in steps)


def test_liveupdate_15_cases_pass(capsys: pytest.CaptureFixture[str]) -> None:
    steps = _results()["liveupdate"]
    _show(capsys, "liveupdate", steps)
    (st,) = steps
    totals = [t for t in st["tap"] if t.startswith("# Totals:")]
    assert st["rc"] == 0, _why(steps)
    assert totals and "pass:15 " in totals[0] and "fail:0 " in totals[0] and "skip:0 " in totals[0], totals


@pytest.mark.parametrize(
    "binary", TWO_STAGE
)
def test_two_stage_across_kexec(binary: str, capsys: pytest.CaptureFixture[str]) -> None:
    steps = _results()[binary]
    _show(capsys, binary, steps)
    stage1, kexec, stage2 = steps
    assert stage1["rc"] == 0 and any("[STAGE 1]" in t for t in stage1["tap"]), _why(steps)
    assert kexec["update_count"] >= 1
    assert stage2["rc"] == 0 and any("TEST PASSED" in t for t in stage2["tap"]), _why(steps)


def test_every_binary_ran() -> None:
    assert set(BINARIES) <= set(_results())
