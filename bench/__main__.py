"""cusedev benchmarks: the emulator next to a minimal C server on the same transport, same placement, same run.

Run as root from the repository: ``bench/run [--quick] [--runs N] [--vm]``
(see "Benchmarks" in README.md).  Not part of the test suite: nothing here asserts
a speed; it prints a table and writes ``bench/results/<date>-<host>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cusedev import control  # noqa: E402

OPS = ("get_state", "preserve", "event")
OP_LABEL = {"get_state": "GET_STATE", "preserve": "FD_PRESERVE+FD_UNPRESERVE", "event": "SET_EVENT PREPARE+CANCEL"}
#: session-ABI rows (profile 7.2, bench/session_client.c under `cusedev run`), measured beside the v3 rows
SESSION_OPS = ("get_name", "preserve", "create", "retrieve_fd")
SESSION_LABEL = {"get_name": "7.2 GET_NAME", "preserve": "7.2 PRESERVE_FD (new memfd)",
                 "create": "7.2 CREATE_SESSION (trap)", "retrieve_fd": "7.2 RETRIEVE_FD (trap, 1st)"}
#: the trapped, fd-returning session rows: each is also set against the kernel's floor of such a call
TRAPPED_OPS = ("create", "retrieve_fd")
#: the kernel's floor of a trapped fd-returning call (bench/seccomp_floor.c), measured beside the session rows
FLOOR_MODES = ("plain", "pvm")
FLOOR_LABEL = {"plain": "C seccomp ADDFD floor", "pvm": "C seccomp ADDFD+pvm floor"}
SESSION_ABI = "7.2"
ALL_CPUS = sorted(os.sched_getaffinity(0))
# free: the scheduler decides (on 2 vCPUs it either keeps both on one CPU or splits them, run by
# run); pinned: both on one CPU; split: server and client on different CPUs.  The last two are
# the two regimes "free" drifts between, measured deterministically.
PLACEMENTS = ("free", "pinned", "split") if len(ALL_CPUS) > 1 else ("free", "pinned")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build(out: Path) -> tuple[Path, Path]:
    """gcc the C client and baseline server into ``out``."""
    client, baseline = out / "client", out / "baseline_server"
    subprocess.run(["gcc", "-O2", "-Wall", "-I", str(REPO / "cdefs"), "-o", str(client),
                    str(REPO / "bench/client.c")], check=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(baseline), str(REPO / "bench/baseline_server.c")], check=True)
    return client, baseline


def build_session(out: Path) -> Path:
    """gcc the session-ABI client (its own header: luo_session.h and luo_v3.h share names) and the
    seccomp floor (bench/seccomp_floor.c, ``floor_exe``) beside it."""
    client = out / "session_client"
    if not client.exists():
        for name in ("session_client", "seccomp_floor"):
            subprocess.run(["gcc", "-O2", "-Wall", "-I", str(REPO / "cdefs"), "-o", str(out / name),
                            str(REPO / f"bench/{name}.c")], check=True)
    return client


def floor_exe(session_client: Path) -> Path:
    return session_client.parent / "seccomp_floor"


def cusedev_run(device: str) -> list[str]:
    """The argv prefix that runs a client under `cusedev run` (its fd-returning calls are trapped)."""
    return [sys.executable, "-m", "cusedev.cli", "run", "--device", device, "--"]


def set_affinity(pid: int, cpus: list[int]) -> None:
    """All threads of ``pid`` (sched_setaffinity on a pid only moves its main thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _raise_nofile() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _wait_ready(proc: subprocess.Popen[bytes], what: str, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    import select

    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            line = proc.stdout.readline().decode()
            if line:
                return line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"{what} did not start: {proc.stderr.read().decode() if proc.stderr else ''}")


class Emulator:
    """``cusedev serve`` in a subprocess (no sysfs: only the device path is measured)."""

    def __init__(self, device: str, transport: str, repo: Path = REPO, extra: tuple[str, ...] = ()):
        self.device = device
        self.repo = repo  # another checkout (--compare) to measure an older request path side by side
        self.argv = [sys.executable, "-m", "cusedev.cli", "serve", "--device", device, "--transport", transport,
                     "--no-sysfs", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Emulator:
        env = {**os.environ, "PYTHONPATH": str(self.repo)}
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     cwd=str(self.repo), preexec_fn=_raise_nofile)
        _wait_ready(self.proc, "emulator", 180)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Baseline:
    """bench/baseline_server.c on a FUSE mount (host) or as a CUSE device (VM).

    ``mode`` "fuse-pvm" adds the caller-memory syscalls the FUSE-file path needs
    (process_vm_readv of the struct, process_vm_writev for GET_STATE): the floor
    for any server of this ABI on that transport.  "python-pvm" is the same server
    in CPython (bench/python_floor.py): the floor for a Python one.
    """

    def __init__(self, exe: Path, mode: str, work: Path):
        self.exe, self.mode = exe, mode
        if mode == "cuse":
            self.arg = "cusedev-bench-baseline"
            self.device = f"/dev/{self.arg}"
        else:
            self.mnt = work / f"{mode}-mnt"
            self.mnt.mkdir(exist_ok=True)
            self.arg = str(self.mnt)
            self.device = str(self.mnt / "dev")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Baseline:
        argv = ([sys.executable, str(REPO / "bench/python_floor.py"), self.arg] if self.mode == "python-pvm"
                else [str(self.exe), self.mode, self.arg])
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_ready(self.proc, "baseline server", 30)
        for _ in range(100):
            if os.path.exists(self.device):
                break
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc: object) -> None:
        if self.mode != "cuse":
            subprocess.run(["umount", "-l", str(self.mnt)], stderr=subprocess.DEVNULL)
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def _placement(placement: str) -> tuple[list[int], list[int] | None]:
    """(server CPUs, client CPUs or None for unpinned) of a placement."""
    if placement == "pinned":
        return [ALL_CPUS[0]], [ALL_CPUS[0]]
    if placement == "split":
        return [ALL_CPUS[-1]], [ALL_CPUS[0]]
    return ALL_CPUS, None


def run_client(client: Path, *args: Any, cpus: list[int] | None = None, timeout: float = 600,
               wrap: list[str] | None = None) -> dict[str, Any]:
    pre = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    argv = [*(wrap or []), str(client), *map(str, args)]
    out = subprocess.run(argv, capture_output=True, timeout=timeout, preexec_fn=pre)
    if out.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)}: exit {out.returncode}: {out.stderr.decode().strip()}")
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


# -- the measurements --------------------------------------------------------------------------
def latency(client: Path, servers: dict[str, tuple[int, str]], runs: int, n: dict[str, int],
            session: tuple[Path, int, str] | None = None) -> dict[str, Any]:
    """Every op on every server (name -> (pid, device)), every placement, interleaved; medians of runs.

    ``session`` (client, pid, device of a 7.2 emulator): its rows run in the same loop, under `cusedev run`.
    """
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for r in range(runs):
        for placement in PLACEMENTS:
            server_cpus, client_cpus = _placement(placement)
            for name, (pid, dev) in servers.items():
                set_affinity(pid, server_cpus)
                for op in OPS:
                    res = run_client(client, "lat", dev, op, n[op], pid, cpus=client_cpus)
                    # together: the client ran (mostly) on the CPU the server answered its last calls on
                    res["together"] = res["cpu"] == res["server_cpu"] and res["cpu_share"] >= 0.9
                    raw.setdefault(placement, {}).setdefault(name, {}).setdefault(op, []).append(res)
            if session is not None:
                sclient, spid, sdev = session
                set_affinity(spid, server_cpus)
                for op in SESSION_OPS:  # retrieve_fd last: its kexec drops the emulator's sessions
                    args: list[Any] = [n["session_" + op]]
                    if op == "retrieve_fd":
                        args.append(_rfd_incoming(sclient, sdev, spid, f"bench-rfd-{r}-{placement}", args[0]))
                    res = run_client(sclient, "lat", sdev, op, *args, cpus=client_cpus, wrap=cusedev_run(sdev))
                    raw.setdefault(placement, {}).setdefault("session", {}).setdefault(op, []).append(res)
                # the kernel's part of a trapped call: a C supervisor answering with ADDFD + SEND
                split = [ALL_CPUS[-1]] if placement == "split" else []
                for mode in FLOOR_MODES:
                    res = run_client(floor_exe(sclient), n["session_create"], mode, *split, cpus=client_cpus)
                    raw[placement]["session"].setdefault("floor_" + mode, []).append(res)
            log(f"latency run {r + 1}/{runs} {placement}: GET_STATE median " + ", ".join(
                f"{name} {raw[placement][name]['get_state'][-1]['median_us']} µs" for name in servers))
    for pid, _dev in servers.values():
        set_affinity(pid, ALL_CPUS)
    out: dict[str, Any] = {}
    for placement, by_server in raw.items():
        by_sop = by_server.pop("session", None)
        if by_sop:
            srows = {op: {k: statistics.median(x[k] for x in results) for k in ("median_us", "p99_us", "ioctls_per_s")}
                     | {"runs": results} for op, results in by_sop.items()}
            out.setdefault(placement, {})["session"] = srows
        for name, by_op in by_server.items():
            for op, results in by_op.items():
                out.setdefault(placement, {}).setdefault(op, {})[name] = {
                    k: statistics.median(x[k] for x in results) for k in ("median_us", "p99_us", "ioctls_per_s")
                } | {"together_runs": sum(x["together"] for x in results), "runs": results}
        for op in OPS:
            row = out[placement][op]
            row["ratio_median"] = round(row["emulator"]["median_us"] / row["baseline"]["median_us"], 2)
            if "baseline_pvm" in row:
                row["ratio_median_vs_pvm"] = round(row["emulator"]["median_us"] / row["baseline_pvm"]["median_us"], 2)
            if "python_pvm" in row:
                row["ratio_median_vs_python"] = round(
                    row["emulator"]["median_us"] / row["python_pvm"]["median_us"], 2)
            if "emulator_traced" in row:
                row["trace_growth_pct"] = round(
                    100 * (row["emulator_traced"]["median_us"] / row["emulator"]["median_us"] - 1), 1)
        srows = out[placement].get("session")
        if srows:  # ratios against the plain round trips of the same run and placement
            v3 = out[placement]["get_state"]["emulator"]["median_us"]
            plain = srows["get_name"]["median_us"]
            for row in srows.values():
                row["ratio_vs_v3_get_state"] = round(row["median_us"] / v3, 2)
                row["ratio_vs_get_name"] = round(row["median_us"] / plain, 2)
            base = out[placement]["get_state"].get("baseline")
            for mode in FLOOR_MODES:
                floor = srows.get("floor_" + mode)
                if floor:  # the emulator's trapped calls over the kernel's floor; that floor over a C round trip
                    for op in TRAPPED_OPS:
                        if op in srows:
                            srows[op]["ratio_vs_floor_" + mode] = round(srows[op]["median_us"] / floor["median_us"], 2)
                    if base:
                        floor["ratio_vs_c_baseline"] = round(floor["median_us"] / base["median_us"], 2)
    return out


def _session_idle(device: str, timeout: float = 60) -> None:
    """Wait until the session emulator holds no session: the releases of the clients that exited
    (their session fds closed at exit) are answered asynchronously, and a session still there at a
    kexec would be carried into the next boot, one row's state leaking into the next."""
    deadline = time.monotonic() + timeout
    while True:
        st = control.request(device, "status")
        if not st.get("outgoing") and not st.get("incoming"):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{device}: sessions still held after {timeout:.0f} s: "
                               f"{len(st.get('outgoing', []))} outgoing, {len(st.get('incoming', []))} incoming")
        time.sleep(0.05)


def _rfd_incoming(client: Path, device: str, pid: int, name: str, n: int) -> str:
    """The state the RETRIEVE_FD row starts from, as after a real live update: a client under `cusedev
    run` makes the session ``name`` of the memfds `lat retrieve_fd` retrieves (``rfd-hold``), the
    emulator kexecs (its control socket; the holder dies with the old boot), and ``name`` is an
    incoming session none of whose files was retrieved yet.  Untimed; returns ``name``."""
    _session_idle(device)  # the earlier rows' sessions are gone: only ``name`` is carried
    _hold_and_kexec([*cusedev_run(device), str(client), "rfd-hold", device, name, str(n)], device, pid,
                    "RETRIEVE_FD row hold")
    return name


def _hold_and_kexec(argv: list[str], device: str, pid: int, what: str) -> tuple[dict[str, Any], int, float]:
    """Start a client that holds preserved state (its first stdout line is JSON), then time the kexec
    over the control socket; returns (that line, the emulator's RSS while held, kexec seconds)."""
    hold = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_raise_nofile)
    assert hold.stdout is not None and hold.stdin is not None
    line = hold.stdout.readline()
    if not line:
        hold.wait()
        raise RuntimeError(f"{what}: {hold.stderr.read().decode() if hold.stderr else ''}")
    held = json.loads(line)
    rss_held = rss_kib(pid)
    t0 = time.perf_counter()
    reply = control.request(device, "kexec")
    kexec_s = time.perf_counter() - t0
    if not reply.get("ok"):
        raise RuntimeError(f"kexec failed: {reply}")
    hold.stdin.close()
    hold.wait()
    return held, rss_held, kexec_s


def kexec_restore(client: Path, transport: str, device: str, count: int, kib: int) -> dict[str, Any]:
    """Preserve ``count`` memfds of ``kib`` KiB, PREPARE, kexec (control socket), restore all under `cusedev run`."""
    with Emulator(device, transport) as emu:
        rss0 = rss_kib(emu.pid)
        held, rss_prepared, kexec_s = _hold_and_kexec([str(client), "hold", device, str(count), str(kib)],
                                                      device, emu.pid, "hold")
        t0 = time.perf_counter()
        res = run_client(client, "restore", device, count,
                         wrap=[sys.executable, "-m", "cusedev.cli", "run", "--device", device, "--"])
        run_s = time.perf_counter() - t0
        if res["size"] != kib * 1024:
            raise RuntimeError(f"restored size {res['size']} != {kib * 1024}")
        return {"count": count, "bytes_each": kib * 1024, "preserve_s": held["preserve_s"],
                "prepare_s": held["prepare_s"], "kexec_s": kexec_s, "restore_s": res["restore_s"],
                "finish_s": res["finish_s"], "cusedev_run_total_s": run_s, "rss_kib_start": rss0,
                "rss_kib_prepared": rss_prepared, "rss_kib_after": rss_kib(emu.pid)}


def session_kexec(client: Path, transport: str, device: str, sessions: int, files: int,
                  kib: int) -> dict[str, Any]:
    """7.2: ``sessions`` sessions of ``files`` memfds of ``kib`` KiB held by a client under `cusedev run`,
    kexec (control socket, timed here), then RETRIEVE_SESSION + RETRIEVE_FD of all + FINISH under `cusedev
    run`.  Pages are allocated (fallocate) up to 1 GiB in all; beyond, the memfds are sized but sparse."""
    alloc = sessions * files * kib <= 1 << 20
    with Emulator(device, transport, extra=("--abi", SESSION_ABI)) as emu:
        held, rss_held, kexec_s = _hold_and_kexec(
            [*cusedev_run(device), str(client), "hold", device, str(sessions), str(files), str(kib),
             str(int(alloc))], device, emu.pid, "session hold")
        res = run_client(client, "restore", device, sessions, files, wrap=cusedev_run(device))
        if res["size"] != kib * 1024:
            raise RuntimeError(f"restored size {res['size']} != {kib * 1024}")
        return {"sessions": sessions, "files": files, "bytes_each": kib * 1024, "allocated": alloc,
                "hold_s": held["hold_s"], "kexec_s": kexec_s, "restore_s": res["restore_s"],
                "retrieve_session_s": res["retrieve_session_s"], "finish_s": res["finish_s"],
                "retrieve_fd_median_us": res["retrieve_fd_median_us"],
                "retrieve_fd_p99_us": res["retrieve_fd_p99_us"], "rss_kib_held": rss_held}


def memory_growth(client: Path, transport: str, device: str, big: int) -> dict[str, Any]:
    with Emulator(device, transport) as emu:
        run_client(client, "loop", device, 1000)
        after_1k = rss_kib(emu.pid)
        res = run_client(client, "loop", device, big - 1000, timeout=3600)
        after_big = rss_kib(emu.pid)
    return {"ioctls": big, "rss_kib_after_1000": after_1k, "rss_kib_after_all": after_big,
            "rss_growth_kib": after_big - after_1k, "loop_ioctls_per_s": res["ioctls_per_s"]}


# -- report ------------------------------------------------------------------------------------
def _rows(lat: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(placement, op, row) of the latency results, in table order."""
    for placement in PLACEMENTS:
        if placement in lat:
            for op in OPS:
                yield placement, op, lat[placement][op]


def _size_label(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def table(res: dict[str, Any]) -> str:
    lines = []
    lat = res["latency"]
    pvm = "baseline_pvm" in lat["free"]["get_state"]
    py = "python_pvm" in lat["free"]["get_state"]
    ref = "emulator_ref" in lat["free"]["get_state"]
    lines.append(f"{'placement':<8} {'ioctl':<26} {'emulator med/p99 µs':>20} {'C baseline med/p99':>19} "
                 f"{'ratio':>6}" + (f" {'C+pvm med':>9} {'ratio':>6}" if pvm else "")
                 + (f" {'Py+pvm med':>10} {'ratio':>6}" if py else "")
                 + f" {'emu ioctl/s':>11} {'base ioctl/s':>12}" + (f" {'ref med µs':>10}" if ref else ""))
    for placement, op, row in _rows(lat):
        e, b = row["emulator"], row["baseline"]
        extra = (f" {row['baseline_pvm']['median_us']:>9.1f} {row['ratio_median_vs_pvm']:>5.2f}x" if pvm else "")
        extra += (f" {row['python_pvm']['median_us']:>10.1f} {row['ratio_median_vs_python']:>5.2f}x"
                  if py else "")
        lines.append(f"{placement:<8} {OP_LABEL[op]:<26} {e['median_us']:>9.1f} / {e['p99_us']:>8.1f} "
                     f"{b['median_us']:>8.1f} / {b['p99_us']:>8.1f} {row['ratio_median']:>5.2f}x{extra} "
                     f"{e['ioctls_per_s']:>11.0f} {b['ioctls_per_s']:>12.0f}"
                     + (f" {row['emulator_ref']['median_us']:>10.1f}" if ref else ""))
    if "free" in lat:
        runs = len(lat["free"]["get_state"]["emulator"]["runs"])
        lines.append("free: runs with the client on the server's CPU (of " + str(runs) + "): " + ", ".join(
            f"{OP_LABEL[op].split('+')[0]} " + " ".join(
                f"{name} {row['together_runs']}" for name, row in lat["free"][op].items() if isinstance(row, dict)
                and "together_runs" in row) for op in OPS))
    if "emulator_traced" in lat["free"]["get_state"]:
        lines.append("")
        lines.append(f"{'placement':<8} {'ioctl':<26} {'untraced med µs':>15} {'traced med µs':>13} {'growth':>7} "
                     f"{'one CPU (runs): untraced':>24} {'traced':>6}")
        for placement, op, row in _rows(lat):
            e, t = row["emulator"], row["emulator_traced"]
            lines.append(f"{placement:<8} {OP_LABEL[op]:<26} {e['median_us']:>15.1f} "
                         f"{t['median_us']:>13.1f} {row['trace_growth_pct']:>+6.1f}% "
                         f"{e['together_runs']:>22}/{len(e['runs'])} {t['together_runs']:>4}/{len(t['runs'])}")
    if any("session" in lat[p] for p in PLACEMENTS if p in lat):
        lines.append("")
        lines.append(f"{'placement':<8} {'session ABI (7.2) ioctl':<28} {'emulator med/p99 µs':>20} "
                     f"{'vs v3 GET_STATE':>15} {'vs GET_NAME':>11} {'ioctl/s':>8}")
        for placement in PLACEMENTS:
            srows = lat.get(placement, {}).get("session")
            for op in SESSION_OPS if srows else ():
                if op not in srows:  # results of a bench from before the row (--compare, a guest's)
                    continue
                r = srows[op]
                lines.append(f"{placement:<8} {SESSION_LABEL[op]:<28} {r['median_us']:>9.1f} / {r['p99_us']:>8.1f} "
                             f"{r['ratio_vs_v3_get_state']:>14.2f}x {r['ratio_vs_get_name']:>10.2f}x "
                             f"{r['ioctls_per_s']:>8.0f}"
                             + "".join(f"  {r['ratio_vs_floor_' + m]:.2f}x {m} floor"
                                       for m in FLOOR_MODES if "ratio_vs_floor_" + m in r))
            for mode in FLOOR_MODES if srows else ():
                r = srows.get("floor_" + mode)
                if r:
                    lines.append(f"{placement:<8} {FLOOR_LABEL[mode]:<28} {r['median_us']:>9.1f} / {r['p99_us']:>8.1f} "
                                 f"{r['ratio_vs_v3_get_state']:>14.2f}x {r['ratio_vs_get_name']:>10.2f}x "
                                 f"{r['ioctls_per_s']:>8.0f}"
                                 + (f"  {r['ratio_vs_c_baseline']:.2f}x C baseline" if "ratio_vs_c_baseline" in r
                                    else ""))
    if res.get("session_kexec"):
        lines.append("")
        lines.append(f"{'7.2 carried':<30} {'hold ms':>8} {'kexec ms':>9} {'restore ms':>10} "
                     f"{'RETRIEVE_FD med/p99 µs':>22} {'RSS held MiB':>12}")
        for k in res["session_kexec"]:
            size = k["bytes_each"]
            label = f"{k['sessions']} sess x {k['files']} x {_size_label(size)}" + ("" if k["allocated"] else " sparse")
            lines.append(f"{label:<30} {k['hold_s'] * 1e3:>8.1f} {k['kexec_s'] * 1e3:>9.1f} "
                         f"{k['restore_s'] * 1e3:>10.1f} {k['retrieve_fd_median_us']:>10.1f} / "
                         f"{k['retrieve_fd_p99_us']:>9.1f} {k['rss_kib_held'] / 1024:>12.1f}")
    if res.get("kexec"):
        lines.append("")
        lines.append(f"{'preserved':<18} {'preserve ms':>11} {'prepare ms':>10} {'kexec ms':>9} {'restore ms':>10} "
                     f"{'RSS prepared MiB':>16}")
        for k in res["kexec"]:
            size = k["bytes_each"]
            label = f"{k['count']} x {_size_label(size)}"
            lines.append(f"{label:<18} {k['preserve_s'] * 1e3:>11.1f} {k['prepare_s'] * 1e3:>10.1f} "
                         f"{k['kexec_s'] * 1e3:>9.1f} {k['restore_s'] * 1e3:>10.1f} "
                         f"{k['rss_kib_prepared'] / 1024:>16.1f}")
    if res.get("memory"):
        m = res["memory"]
        lines.append("")
        lines.append(f"RSS after 1,000 ioctls: {m['rss_kib_after_1000']} KiB; after {m['ioctls']:,}: "
                     f"{m['rss_kib_after_all']} KiB (growth {m['rss_growth_kib']} KiB)")
    return "\n".join(lines)


def measure(args: argparse.Namespace, transport: str, work: Path) -> dict[str, Any]:
    client, baseline_exe = (work / "client", work / "baseline_server")
    if not client.exists():
        client, baseline_exe = build(work)
    in_vm = transport == "cuse"
    device = "/dev/liveupdate-bench" if in_vm else str(work / "liveupdate")
    scale = 0.1 if args.quick or in_vm else 1.0
    n = {"get_state": int(20000 * scale), "preserve": int(4000 * scale), "event": int(8000 * scale),
         "session_get_name": int(20000 * scale), "session_preserve": int(4000 * scale),
         "session_create": int(2000 * scale), "session_retrieve_fd": int(2000 * scale)}
    session_client = build_session(work)
    res: dict[str, Any] = {
        "host": socket.gethostname(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "transport": transport, "kernel": platform.release(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "git": _git_rev(), "runs": args.runs,
        "iterations": n,
    }
    with contextlib.ExitStack() as stack:
        emu = stack.enter_context(Emulator(device, transport))
        servers = {"emulator": (emu.pid, emu.device)}
        # the same emulator recording every call (--trace): what tracing costs a round trip
        traced = stack.enter_context(Emulator(device + "-traced", transport,
                                              extra=("--trace", str(work / "bench-trace.jsonl"))))
        servers["emulator_traced"] = (traced.pid, traced.device)
        if args.compare:
            ref = stack.enter_context(Emulator(str(work / "liveupdate-ref"), transport, Path(args.compare)))
            servers["emulator_ref"] = (ref.pid, ref.device)
            res["compare"] = {"repo": args.compare, "git": _git_rev(Path(args.compare))}
        for name, mode in (("baseline", transport), ("baseline_pvm", "fuse-pvm"), ("python_pvm", "python-pvm")):
            if mode != transport and in_vm:
                continue
            b = stack.enter_context(Baseline(baseline_exe, mode, work))
            servers[name] = (b.pid, b.device)
        sess = stack.enter_context(Emulator(device + "-session", transport, extra=("--abi", SESSION_ABI)))
        log(f"latency: {args.runs} run(s), {transport} transport")
        res["latency"] = latency(client, servers, args.runs, n, (session_client, sess.pid, sess.device))
    if args.latency_only:
        return res
    sizes = [1 << 10, 256 << 10] if in_vm else [1 << 10, 256 << 10, 2048 << 10]
    res["kexec"] = []
    for kib in sizes:
        log(f"kexec/restore: 1 memfd of {kib >> 10} MiB")
        res["kexec"].append(kexec_restore(client, transport, device, 1, kib))
    # the kernel's stress tests' sizes; 4 KiB against 64 MiB files: the cost must not follow the bytes
    shapes = [(2000, 1, 4), (1, 500, 4), (1, 500, 64 << 10)] if not in_vm else [(200, 1, 4), (1, 50, 4),
                                                                                 (1, 50, 64 << 10)]
    res["session_kexec"] = []
    for sessions, files, kib in shapes:
        log(f"7.2 kexec/retrieve: {sessions} session(s) of {files} memfd(s) of {kib} KiB")
        res["session_kexec"].append(session_kexec(session_client, transport, device, sessions, files, kib))
    many = 1000 if (args.quick or in_vm) else 10000
    log(f"kexec/restore: {many} memfds of 4 KiB")
    res["kexec"].append(kexec_restore(client, transport, device, many, 4))
    if not in_vm:
        big = 100_000 if args.quick else 1_000_000
        log(f"memory: RSS after 1,000 and {big:,} GET_STATE")
        res["memory"] = memory_growth(client, transport, device, big)
    return res


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_rev(repo: Path = REPO) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip()


# -- VM ------------------------------------------------------------------------------------------
def run_vm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Boot the test VM's LUO kernel (vm/run-guest, as scripts/test-all does) and run the CUSE benchmark inside."""
    if subprocess.run(["pgrep", "qemu-system"], capture_output=True).returncode == 0:
        raise SystemExit("another qemu is running: not booting a VM now (measurements would be meaningless)")
    build(work)
    guest = [sys.executable, "-m", "bench", "--guest", str(work), "--runs", str(args.vm_runs)]
    guest += ["--latency-only"] if args.latency_only else []
    log("VM: booting the LUO kernel (TCG, vm/run-guest)")
    subprocess.run([sys.executable, str(REPO / "vm/run-guest"), "--results", str(work),
                    "--timeout", str(args.vm_timeout + 300), "--env", "PYTHONDONTWRITEBYTECODE=1",
                    "--", "timeout", str(args.vm_timeout), *guest],
                   cwd=REPO, stdin=subprocess.DEVNULL, timeout=args.vm_timeout + 600)
    out = work / "guest.json"
    if not out.exists():
        raise SystemExit("the VM produced no results (see the console output above)")
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--runs", type=int, default=3, help="latency repeats; medians of runs are reported (3)")
    p.add_argument("--quick", action="store_true", help="10%% of the iterations, 1,000 memfds, 100k-ioctl RSS run")
    p.add_argument("--latency-only", action="store_true", help="only the latency/throughput table")
    p.add_argument("--vm", action="store_true", help="also run on CUSE inside the test VM (TCG, slow)")
    p.add_argument("--vm-runs", type=int, default=1, help="latency repeats inside the VM (1: TCG is slow)")
    p.add_argument("--vm-timeout", type=int, default=900, help="seconds for the guest's benchmark (900)")
    p.add_argument("--compare", metavar="CHECKOUT",
                   help="also measure the emulator of another checkout (e.g. a git worktree of an older commit)")
    p.add_argument("--out", help="JSON results file (default bench/results/<date>-<host>.json)")
    p.add_argument("--guest", metavar="DIR", help=argparse.SUPPRESS)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/run must run as root (FUSE mounts)")
    if args.guest:
        for _ in range(50):  # devtmpfs creates the node when cuse registers its misc device
            if os.path.exists("/dev/cuse"):
                break
            time.sleep(0.1)
        res = measure(args, "cuse", Path(args.guest))
        (Path(args.guest) / "guest.json").write_text(json.dumps(res, indent=1))
        print(table(res), flush=True)
        return 0
    work = Path(tempfile.mkdtemp(prefix="cusedev-bench-"))
    work.chmod(0o755)
    try:
        result: dict[str, Any] = {"host": measure(args, "fuse", work)}
        print(f"\nFUSE-file transport, {result['host']['host']} ({result['host']['cpu_model']}, "
              f"{result['host']['cpus']} CPUs, kernel {result['host']['kernel']}):")
        print(table(result["host"]), flush=True)
        if args.vm:
            vmwork = Path(tempfile.mkdtemp(prefix="cusedev-bench-vm-"))
            vmwork.chmod(0o755)
            try:
                result["vm"] = run_vm(args, vmwork)
            finally:
                shutil.rmtree(vmwork, ignore_errors=True)
            print(f"\nCUSE in the VM (TCG, kernel {result['vm']['kernel']}):")
            print(table(result["vm"]), flush=True)
    finally:
        for mode in ("fuse", "fuse-pvm", "python-pvm"):
            subprocess.run(["umount", "-l", str(work / f"{mode}-mnt")], stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out) if args.out else (
        REPO / "bench/results" / f"{datetime.date.today().isoformat()}-{socket.gethostname()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
