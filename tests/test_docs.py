"""The docs cannot rot: every link resolves inside the repository, and every command they show is run.

Commands are the lines of ```sh blocks and the prompt lines (``# `` / ``$ ``) of ```console blocks
in README.md and docs/*.md (```text blocks are synopses and output).  ``HOW`` says, for each one,
how it is exercised: run here against a real emulator (``run``), run by a named test
(``test:FILE::NAME``, which must exist), or — for the set-up and benchmark drivers whose whole run
is CI itself or a benchmark — every option shown is one the program offers (``flags:PROGRAM``).
A command added to the docs without an entry here fails the suite, and so does a stale entry.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from _server import ServerProc

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

VMM_DEMO = "test:tests/test_lifecycle.py::test_vmm_demo_256mib"
ERRNO_ROWS = "test:tests/test_session_errno_c.py::test_every_row_from_c"
KEXEC_DIFF = "test:tests/test_differential.py::test_two_part_sequences_across_cusedev_kexec"
HOW: dict[str, str] = {
    "scripts/install && cusedev serve": "test:tests/test_newcomer_debian.py::test_readme_first_command_on_fresh_debian",
    "scripts/test-all": "flags:scripts/test-all",
    "scripts/test-all -k preserve -x": "flags:scripts/test-all",
    "scripts/test-all tests/test_core.py": "flags:scripts/test-all",
    "scripts/test-all --host-only": "flags:scripts/test-all",
    "scripts/test-all --vm-only": "flags:scripts/test-all",
    "cusedev serve --device /tmp/liveupdate": "run",
    "cusedev serve": "run",
    "cusedev serve --sysfs-root /srv/emu/sys": "run",
    "cusedev serve --sysfs files": "run",
    "cusedev serve --no-sysfs": "run",
    "cusedev serve --trace /var/log/luo.jsonl": "run",
    "cusedev serve --inject FD_PRESERVE:error=ENOSPC:when=2+ --inject prepare:error=EIO:when=1": "run",
    "cusedev trace start /var/log/luo.jsonl": "run",
    "cusedev trace stop": "run",
    "cusedev inject SET_EVENT:error=EAGAIN": "run",
    "cusedev inject --list": "run",
    "cusedev inject --clear": "run",
    "cusedev status": "run",
    "cusedev trace record -o luo.jsonl -- ./vmm stage1":
        "test:tests/test_trace_record.py::test_the_same_run_recorded_both_ways_is_equal",
    "cusedev trace show luo.jsonl": "test:tests/test_trace_record.py::test_the_same_run_recorded_both_ways_is_equal",
    "cusedev trace diff kernel.jsonl emulator.jsonl":
        "test:tests/test_trace_diff.py::test_the_same_run_from_both_recorders_is_equal",
    "gcc -O2 -Wall -I cdefs -o vmm_demo examples/vmm_demo.c": VMM_DEMO,
    "cusedev serve &": VMM_DEMO,
    "cusedev run -- ./vmm_demo stage1": VMM_DEMO,
    "cusedev run -- ./vmm_demo stage2": VMM_DEMO,
    "gcc -O2 -Wall -I cdefs -o session_errno tests/c/session_errno.c": ERRNO_ROWS,
    "cusedev serve --abi 7.2 &": ERRNO_ROWS,
    "cusedev run -- ./session_errno --abi 7.2 --stage 1": ERRNO_ROWS,
    "cusedev kexec": ERRNO_ROWS,
    "cusedev serve --abi 7.2 --trace own.jsonl &": KEXEC_DIFF,
    "python3 -m cusedev.testing.differential record-hold -o part1.jsonl --run /dev/liveupdate --seeds 1-3": KEXEC_DIFF,
    "cusedev run -- cusedev trace record -o part2.jsonl -- python3 -m cusedev.testing.differential exec --part 2 "
    "--seeds 1-3": KEXEC_DIFF,
    "python3 -m cusedev.testing.differential compare --part 1 part1.jsonl own.jsonl": KEXEC_DIFF,
    "python3 -m cusedev.testing.differential compare --part 2 part2.jsonl own.jsonl": KEXEC_DIFF,
    "cusedev run -- ./session_errno --abi 7.2 --stage 2": ERRNO_ROWS,
    "cp examples/cusedev.service /etc/systemd/system/":
        "test:tests/test_newcomer_packaging.py::test_example_service_unit_verifies",
    "systemctl daemon-reload && systemctl enable --now cusedev.service":
        "test:tests/test_newcomer_packaging.py::test_example_service_unit_verifies",
    "bench/run": "flags:bench/run",
    "bench/run --quick": "flags:bench/run",
    "bench/run --runs 5": "flags:bench/run",
    "bench/run --latency-only": "flags:bench/run",
    "bench/run --compare DIR": "flags:bench/run",
    "bench/run --vm": "flags:bench/run",
}


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    out, info, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if info is None:
                info, body = line[3:].strip(), []
            else:
                out.append((info, body))
                info = None
        elif info is not None:
            body.append(line)
    assert info is None, "an unclosed code block"
    return out


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


def doc_commands() -> list[str]:
    seen: list[str] = []
    for page in PAGES:
        for info, body in _blocks(page.read_text()):
            for line in body:
                if info == "sh" and line.strip() and not line.lstrip().startswith("#"):
                    cmd = _strip_comment(line)
                elif info == "console" and line.startswith(("# ", "$ ")):
                    cmd = _strip_comment(line[2:])
                else:
                    continue
                if cmd not in seen:
                    seen.append(cmd)
    return seen


def test_every_command_in_the_docs_has_a_test() -> None:
    shown = doc_commands()
    assert [c for c in shown if c not in HOW] == [], "new commands in the docs: add them to HOW"
    assert [c for c in HOW if c not in shown] == [], "HOW lists commands the docs no longer show"


def test_named_tests_exist() -> None:
    for how in set(HOW.values()):
        if how.startswith("test:"):
            path, name = how[5:].split("::")
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M), how


def test_flags_shown_are_offered() -> None:
    """test-all passes what it does not know to pytest: such a flag must be one of pytest's."""
    pytest_help = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True).stdout
    for cmd, how in HOW.items():
        if not how.startswith("flags:"):
            continue
        prog = REPO / how[6:]
        assert os.access(prog, os.X_OK), prog
        text = prog.read_text()
        if prog.name != "test-all":  # a driver in front of its real parser: ask it
            text += subprocess.run([str(prog), "--help"], capture_output=True, text=True, cwd=str(REPO),
                                   timeout=120).stdout
        for word in shlex.split(cmd)[1:]:
            if word.startswith("-"):
                pattern = rf"(^|[\s|(\"',]){re.escape(word)}([\s|)=\"',]|$)"
                offered = re.search(pattern, text, re.M) or (
                    prog.name == "test-all" and re.search(pattern, pytest_help, re.M))
                assert offered, (cmd, word)
            elif "/" in word:
                assert (REPO / word).exists(), (cmd, word)


# -- links --------------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def test_links_stay_inside_the_repository_and_resolve() -> None:
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            assert not re.match(r"[a-z]+:", target), f"{page.name}: external link {target}"
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.is_relative_to(REPO), f"{page.name}: {target} leaves the repository"
            assert dest.exists(), f"{page.name}: {target} does not exist"
            if anchor:
                assert anchor in _anchors(dest), f"{page.name}: no heading for #{anchor} in {dest.name}"


def test_readme_fits_on_two_screens() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 140


# -- running the commands -----------------------------------------------------------------------
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cusedev.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def _localise(cmd: str, tmp: Path, device: str) -> list[str]:
    """The command as run here: paths outside the test's own directory moved into it, our device."""
    argv = [{"/var/log/luo.jsonl": str(tmp / "luo.jsonl"), "/srv/emu/sys": str(tmp / "sys")}.get(w, w)
            for w in shlex.split(cmd)]
    assert argv[0] == "cusedev"
    return argv[1:] if "--device" in argv else [*argv[1:], "--device", device]


def test_serve_commands_of_the_docs(tmp_path: Path, transport_name: str) -> None:
    serves = [c for c, how in HOW.items() if how == "run" and c.startswith("cusedev serve")]
    assert len(serves) >= 6
    for cmd in serves:
        args = _localise(cmd, tmp_path, str(tmp_path / "liveupdate"))
        dev = args[args.index("--device") + 1]
        with ServerProc(dev, transport_name, *args[1:]) as srv:
            srv.start()
            assert "ready" in srv.ready_line, cmd
            st = _cli("status", "--device", dev)
            assert st.returncode == 0 and "normal" in st.stdout, (cmd, st.stdout, st.stderr)
            assert srv.stop() == 0, (cmd, srv.stderr())
        assert not os.path.exists(dev) or dev == str(tmp_path / "liveupdate"), f"{cmd}: {dev} left behind"


def test_runtime_commands_of_the_docs(tmp_path: Path, transport_name: str) -> None:
    device = str(tmp_path / "liveupdate")
    runtime = [c for c, how in HOW.items() if how == "run" and not c.startswith("cusedev serve")]
    assert len(runtime) >= 5
    with ServerProc(device, transport_name) as srv:
        srv.start()
        for cmd in runtime:
            p = _cli(*_localise(cmd, tmp_path, device))
            assert p.returncode == 0, (cmd, p.stdout, p.stderr)
        assert srv.stop() == 0
    assert (tmp_path / "luo.jsonl").stat().st_size > 0  # `trace start` wrote the header at least


def _snippet(page: str, lang: str) -> str:
    (body,) = [b for info, b in _blocks((REPO / page).read_text()) if info == lang]
    return "\n".join(body) + "\n"


def test_readme_python_client(tmp_path: Path, transport_name: str) -> None:
    device = str(tmp_path / "liveupdate")
    code = _snippet("README.md", "python").replace('"/dev/liveupdate"', repr(device))
    with ServerProc(device, transport_name) as srv:
        srv.start()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert p.stdout == "prepared\n", "print(dev.state) shows the state's name"
        assert srv.stop() == 0


def test_readme_c_client(tmp_path: Path, transport_name: str) -> None:
    device = str(tmp_path / "liveupdate")
    src = tmp_path / "get_state.c"
    src.write_text(_snippet("README.md", "c").replace('"/dev/liveupdate"', f'"{device}"'))
    exe = tmp_path / "get_state"
    subprocess.run(["gcc", "-Wall", "-Werror", "-I", str(REPO / "cdefs"), "-o", str(exe), str(src)], check=True)
    with ServerProc(device, transport_name) as srv:
        srv.start()
        p = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
        assert (p.returncode, p.stdout) == (0, "state 1\n"), p.stderr
        assert srv.stop() == 0


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_page_has_no_stale_module_paths(page: str) -> None:
    """Paths of files named in the docs (`cusedev/…`, `tests/…`, `examples/…`) exist."""
    path = next(p for p in PAGES if p.name == page)
    for ref in re.findall(r"`((?:cusedev|tests|examples|cdefs|scripts|bench|vm)/[\w./-]+\.(?:py|c|h|md|service))`",
                          path.read_text()):
        assert (REPO / ref).exists(), f"{page}: {ref}"


def test_synopses_match_the_cli() -> None:
    """Every option of a `cusedev SUBCOMMAND` synopsis (```text blocks) is one that subcommand offers."""
    helps: dict[str, str] = {}
    checked = 0
    for page in PAGES:
        for info, body in _blocks(page.read_text()):
            for line in body if info == "text" else []:
                m = re.match(r"cusedev (\w+)\s+(\w+)?", line)
                if not m or line.startswith("cusedev: "):
                    continue
                sub = [m.group(1)] + ([m.group(2)] if m.group(1) == "trace" and m.group(2) else [])
                key = " ".join(sub)
                if key not in helps:
                    p = _cli(*sub, "--help")
                    assert p.returncode == 0, (line, p.stderr)
                    helps[key] = p.stdout
                for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", _strip_comment(line)):
                    assert flag in helps[key], f"{page.name}: `{line.strip()}`: {flag} is not an option of {key}"
                    checked += 1
    assert checked > 20
