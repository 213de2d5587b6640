"""The ``cusedev`` command: argparse subcommands, each a few lines over a module that does the work.

Adding a subcommand: write ``def _add_NAME(sub)`` that registers its parser
with ``set_defaults(func=...)`` and append it to ``SUBCOMMANDS``.  A ``func``
takes the parsed args and returns the exit code; raising ``CliError`` (or
``ServeError``) prints one ``cusedev: error: ...`` line and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import json
import logging
import pwd
import sys
from collections.abc import Callable

from . import __version__


class CliError(Exception):
    """A one-line user error."""


def _uid(name: str) -> int:
    try:
        return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid
    except KeyError:
        raise CliError(f"unknown user {name!r}") from None


def _gid(name: str) -> int:
    try:
        return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise CliError(f"unknown group {name!r}") from None


def _mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return mode


# -- serve -------------------------------------------------------------------
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="emulate the device until SIGINT/SIGTERM")
    p.add_argument("--device", default="/dev/liveupdate", metavar="PATH",
                   help="device path (default %(default)s)")
    p.add_argument("--transport", choices=("auto", "cuse", "fuse"), default="auto",
                   help="auto: CUSE if usable, else a FUSE file (default %(default)s)")
    p.add_argument("--mode", type=_mode, default=0o600, help="node permissions, octal (default 0600)")
    p.add_argument("--owner", default="root", help="node owner (default %(default)s)")
    p.add_argument("--group", default="root", help="node group (default %(default)s)")
    p.add_argument("--memory", choices=("retry", "process_vm"), default="retry",
                   help="CUSE ioctl memory: FUSE_IOCTL_RETRY iovecs or process_vm_* (default %(default)s)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep the emulated machine's state (and preserved bytes after a kexec) in DIR")
    p.add_argument("--sysfs-root", metavar="DIR",
                   help="serve kernel/liveupdate/{state,update_count} under DIR "
                        "(default /run/cusedev/<device name>/sys)")
    p.add_argument("--sysfs", choices=("auto", "fuse", "files"), default="auto",
                   help="sysfs tree: a pollable FUSE mount, or plain files replaced atomically (no poll); "
                        "auto: FUSE if usable (default %(default)s)")
    p.add_argument("--no-sysfs", dest="sysfs", action="store_const", const=None, help="no sysfs tree")
    p.add_argument("--handler", metavar="MODULE:FACTORY", help=argparse.SUPPRESS)  # tests: a stub device
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .server import load_handler, print_ready, serve

    uid, gid = _uid(args.owner), _gid(args.group)
    handler = load_handler(args.handler) if args.handler else None
    asyncio.run(serve(args.device, args.transport, on_ready=print_ready, handler=handler, mode=args.mode,
                      uid=uid, gid=gid, memory=args.memory, state_dir=args.state_dir, sysfs=args.sysfs,
                      sysfs_root=args.sysfs_root))
    return 0


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="/dev/liveupdate", metavar="PATH",
                   help="the emulator's device path (default %(default)s)")


def _control(device: str, cmd: str) -> dict:
    from .control import ControlError, request

    try:
        return request(device, cmd)
    except ControlError as e:
        raise CliError(str(e)) from None


# -- status ------------------------------------------------------------------
def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the emulator's state, counter, files and opener")
    _device_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from .runtime import format_status

    st = _control(args.device, "status")
    if args.json:
        st.pop("ok", None)
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    return 0


# -- kexec -------------------------------------------------------------------
def _add_kexec(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kexec", help="what reboot(LINUX_REBOOT_CMD_KEXEC) does, on the emulated machine")
    _device_arg(p)
    p.set_defaults(func=_run_kexec)


def _run_kexec(args: argparse.Namespace) -> int:
    r = _control(args.device, "kexec")
    if not r.get("ok"):
        print(f"cusedev: kexec failed: {r.get('error')} (errno {r.get('errno')}); state is back to normal",
              file=sys.stderr)
        return 1
    kind = "live update" if r["live"] else "plain kexec"
    print(f"{kind}: state={r['state']} update_count={r['update_count']}")
    return 0


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_serve, _add_status, _add_kexec]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cusedev",
                                     description="Userspace /dev/liveupdate (LUO v3) emulator")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="cusedev: %(levelname)s: %(message)s", stream=sys.stderr)
    from .server import ServeError

    try:
        return args.func(args)
    except (CliError, ServeError) as e:
        print(f"cusedev: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
