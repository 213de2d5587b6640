"""Packaging as a newcomer meets it (issue 13, items 2 and 5), through pip, venv and the real CLI.

One sdist and wheel are built from a copy of this checkout (the checkout itself is never written);
the wheel is installed into a fresh venv, imported from a read-only site-packages, and uninstalled.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _copy_checkout(dest: Path) -> None:
    """The files a clone has (tracked + new, not ignored), or the whole tree of an unpacked sdist."""
    git = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True)
    if git.returncode == 0:
        names = [n for n in git.stdout.decode().split("\0") if n and (REPO / n).exists()]
    else:
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)]
    for name in names:
        src, dst = REPO / name, dest / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``python -m build`` of a copy of the checkout: {"sdist", "wheel", "log"}."""
    root = tmp_path_factory.mktemp("dist")
    src = root / "src"
    _copy_checkout(src)
    out = root / "out"
    p = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                       capture_output=True, text=True, timeout=600)
    log = root / "build.log"
    log.write_text(p.stdout + p.stderr)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (sdist,) = out.glob("cusedev-*.tar.gz")
    (wheel,) = out.glob("cusedev-*.whl")
    return {"sdist": sdist, "wheel": wheel, "log": log}


def test_build_has_no_deprecation_warning(dists: dict[str, Path]) -> None:
    log = dists["log"].read_text()
    assert "Deprecat" not in log, [line for line in log.splitlines() if "eprecat" in line]


def test_sdist_carries_what_its_tests_need(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(next(n for n in tar.getnames() if n.endswith("/PKG-INFO")))
        assert pkg_info is not None
        meta = pkg_info.read().decode()
    for need in ("LICENSE", "README.md", "pyproject.toml", "tests/conftest.py", "tests/_server.py",
                 "tests/c/luo_runner.c", "examples/vmm_demo.c", "examples/luo_client.c",
                 "examples/test_vmm_example.py", "examples/cusedev.service", "cdefs/luo_v3.h",
                 "docs/abi-v3.md", "scripts/install", "scripts/test-all", "cusedev/py.typed"):
        assert need in names, need
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "License-Expression: GPL-2.0-only" in meta
    assert "License-File: LICENSE" in meta
    assert "Classifier: Typing :: Typed" in meta


def test_license_file_is_the_declared_license() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text


def test_wheel_has_types_license_and_headers(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as z:
        names = set(z.namelist())
    assert "cusedev/py.typed" in names
    assert "cusedev/cdefs/luo_v3.h" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not [n for n in names if "_cusedev_ffi" in n or n.endswith(".pyc")]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, dists: dict[str, Path]) -> Iterator[Path]:
    """A fresh venv with the wheel (and pytest, for the plugin) installed from the machine's index."""
    root = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    vpy(root, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(dists["wheel"]), "pytest",
        check=True, timeout=600)
    yield root


def vpy(venv: Path, *args: str, env: dict[str, str] | None = None, check: bool = False,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The venv's python, run from / (a ``python -c`` in the checkout would import the checkout's cusedev)."""
    return subprocess.run([str(venv / "bin/python"), *args], capture_output=True, text=True, env=env, cwd="/",
                          check=check, timeout=timeout)


def _site(venv: Path) -> Path:
    return Path(vpy(venv, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", check=True).stdout.strip())


def _listing(d: Path) -> dict[str, float]:
    return {str(p.relative_to(d)): p.stat().st_mtime for p in d.rglob("*")}


IMPORT_ALL = "import cusedev, cusedev.uapi, cusedev.cli, cusedev.client"


ROOT_CACHE = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".cache"


def _private(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``script`` in a private mount namespace whose own user's ~/.cache is an empty tmpfs, so that
    the cache this machine's earlier runs made (read as a fallback) is out of the picture."""
    ROOT_CACHE.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs tmpfs {ROOT_CACHE} && {script}"],
                          capture_output=True, text=True, env=env, timeout=120, cwd="/")


def _mtimes(d: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in d.glob("_cusedev_ffi_*.py")}


def test_import_from_read_only_site_packages_prints_and_writes_nothing(venv: Path, tmp_path: Path) -> None:
    """A non-root client of a root install: site-packages read-only; the parse goes to the user's cache, once."""
    site = _site(venv)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    before = _listing(site)
    p = _private(f"mount --bind {site} {site} && mount -o remount,bind,ro {site} && "
                 f"for i in 1 2 3; do {venv}/bin/python -c '{IMPORT_ALL}' || exit 1; done", env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and p.stderr == ""
    assert _listing(site) == before
    cached = _mtimes(home / ".cache/cusedev")
    assert len(cached) >= 1, cached
    p = _private(f"{venv}/bin/python -c '{IMPORT_ALL}; import sys; print(\"pycparser\" in sys.modules)'", env)
    assert (p.returncode, p.stdout, p.stderr) == (0, "False\n", ""), "the cached parse was not used"
    assert _mtimes(home / ".cache/cusedev") == cached, "the cached parse was written again"


def test_cache_dir_follows_xdg_and_cusedev_cache_dir(venv: Path, tmp_path: Path) -> None:
    for var, where in (("XDG_CACHE_HOME", tmp_path / "xdg"), ("CUSEDEV_CACHE_DIR", tmp_path / "explicit")):
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "nohome"), var: str(where)}
        p = _private(f"{venv}/bin/python -c '{IMPORT_ALL}'", env)
        assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
        found = list(where.rglob("_cusedev_ffi_*.py"))
        assert found and {f.parent for f in found} <= {where, where / "cusedev"}, found
    assert not (tmp_path / "nohome").exists()


def test_a_foreign_home_reads_the_users_own_cache(venv: Path, tmp_path: Path) -> None:
    """The CI VM runs the host's files with a throw-away $HOME: the user's own cache is read, never written."""
    own = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT_CACHE.parent)}
    other = tmp_path / "other"
    check = f"{venv}/bin/python -c '{IMPORT_ALL}; import sys; print(\"pycparser\" in sys.modules)'"
    p = _private(f"HOME={ROOT_CACHE.parent} {check} && HOME={other} {check}", own)
    assert (p.returncode, p.stdout, p.stderr) == (0, "True\nFalse\n", ""), p.stderr
    assert not other.exists()


def test_the_pytest_plugin_costs_nothing_unused(venv: Path) -> None:
    """Every pytest run in an environment with cusedev loads the plugin: it must not import the emulator."""
    code = ("import importlib.metadata as m, sys\n"
            "(ep,) = [e for e in m.entry_points(group='pytest11') if e.name == 'cusedev']\n"
            "ep.load()\n"
            "print(sorted(n for n in sys.modules if n.startswith(('cusedev', 'cffi'))))\n")
    p = vpy(venv, "-c", code)
    assert p.returncode == 0, p.stderr
    loaded = eval(p.stdout)
    assert "cffi" not in loaded and "cusedev.uapi" not in loaded, loaded
    assert not [n for n in loaded if n.startswith(("cusedev.testing.emulator", "cusedev.control"))], loaded


def test_uninstall_leaves_nothing(venv: Path, tmp_path: Path) -> None:
    site = _site(venv)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    vpy(venv, "-c", IMPORT_ALL, env=env, check=True)  # used at least once
    vpy(venv, "-m", "pip", "uninstall", "-y", "-q", "cusedev", check=True)
    left = [p.name for p in site.iterdir() if "cusedev" in p.name]
    assert left == []
    assert not (venv / "bin/cusedev").exists()
    p = vpy(venv, "-c", "import cusedev", env=env)
    assert p.returncode == 1 and "ModuleNotFoundError" in p.stderr


def test_example_service_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` with ``cusedev`` where scripts/install links it (/usr/local/bin)."""
    exe = shutil.which("cusedev")
    assert exe, "cusedev is not on PATH"
    unit = tmp_path / "cusedev.service"
    shutil.copy(REPO / "examples/cusedev.service", unit)
    text = unit.read_text()
    assert "ExecStart=/usr/local/bin/cusedev serve" in text
    script = (f"mount -t tmpfs tmpfs /usr/local/bin && ln -s {os.path.realpath(exe)} /usr/local/bin/cusedev && "
              f"systemd-analyze verify {unit}")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def test_install_script_into_a_venv_python_and_uninstall(tmp_path: Path) -> None:
    """scripts/install with a venv's python: installed there, linked, and --uninstall removes both."""
    src = tmp_path / "src"
    _copy_checkout(src)
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    links = tmp_path / "bin"
    env = {**os.environ, "PYTHON": str(venv / "bin/python"), "CUSEDEV_LINK_DIR": str(links)}
    p = subprocess.run([str(src / "scripts/install")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(f"python with 'import cusedev': {venv}/bin/python"), p.stderr
    assert os.path.realpath(links / "cusedev") == str(venv / "bin/cusedev")
    v = subprocess.run([str(links / "cusedev"), "--version"], capture_output=True, text=True, cwd="/")
    assert v.returncode == 0 and v.stdout.startswith("cusedev ")
    p = subprocess.run([str(src / "scripts/install"), "--uninstall"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert not (links / "cusedev").exists() and not (venv / "bin/cusedev").exists()
    assert vpy(venv, "-c", "import cusedev").returncode == 1
