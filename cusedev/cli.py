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
import os
import pwd
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .device.seam import DeviceHandler


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
    p.add_argument("--trace", metavar="FILE", help="record every device event to FILE (JSON Lines, mode 0600)")
    p.add_argument("--inject", metavar="RULE", action="append", default=[],
                   help="fault injection, strace style: CMD:error=ERRNO[:when=N|N+|N+S][:delay=DUR], "
                        "prepare:error=ERRNO, kexec:error=ERRNO (repeatable)")
    p.add_argument("--abi", default="v3", metavar="NAME",
                   help="the ABI profile to emulate (default %(default)s); `--abi list` prints them")
    p.add_argument("--handler", metavar="MODULE:FACTORY", help=argparse.SUPPRESS)  # tests: a stub device
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from .control.server import load_handler, print_ready, serve

    if args.abi == "list":
        _list_profiles()
        return 0
    uid, gid = _uid(args.owner), _gid(args.group)
    handler = load_handler(args.handler) if args.handler else _device(args.abi)
    if args.trace or args.inject:
        handler = _traced_handler(handler, args.trace, args.inject)
    asyncio.run(serve(args.device, args.transport, on_ready=print_ready, handler=handler, mode=args.mode,
                      uid=uid, gid=gid, memory=args.memory, state_dir=args.state_dir, sysfs=args.sysfs,
                      sysfs_root=args.sysfs_root))
    return 0


def _list_profiles() -> None:
    from . import profiles

    seen: dict[str, list[str]] = {}
    for name in profiles.names():
        seen.setdefault(profiles.get(name).name, []).append(name)
    for name, called in seen.items():
        p = profiles.get(name)
        aliases = [n for n in called if n != name]
        default = " (default)" if name == profiles.DEFAULT else ""
        also = f" (also: {', '.join(aliases)})" if aliases else ""
        print(f"{name}{default}{also}: {p.summary}")


def _device(abi: str) -> DeviceHandler:
    """The emulated device of ABI profile ``abi``; a one-line error for an unknown name."""
    from .device.openfiles import EmulatedDevice

    try:
        return EmulatedDevice(profile=abi)
    except ValueError as e:
        raise CliError(f"--abi: {e}; `cusedev serve --abi list` shows them") from None


def _traced_handler(handler: DeviceHandler | None, trace_path: str | None, rules: list[str]) -> DeviceHandler:
    """The LUO device with its rules and trace set up before serving (bad rules fail here, not later)."""
    from .device.openfiles import EmulatedDevice
    from .tracing import record as trace
    from .tracing.inject import RuleError

    dev = handler if handler is not None else EmulatedDevice()
    if not isinstance(dev, EmulatedDevice):
        raise CliError("--trace/--inject need the LUO device")
    try:
        for rule in rules:
            dev.injector.add(rule)
    except RuleError as e:
        raise CliError(f"--inject: {e}") from None
    if trace_path:
        try:
            trace.start(dev, os.path.abspath(trace_path))
        except OSError as e:
            raise CliError(f"--trace {trace_path}: {e.strerror}") from None
    return dev


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="/dev/liveupdate", metavar="PATH",
                   help="the emulator's device path (default %(default)s)")


def _control(device: str, cmd: str, **args: object) -> dict:
    from .control.channel import ControlError, request

    try:
        return request(device, cmd, **args)
    except ControlError as e:
        raise CliError(str(e)) from None


# -- status ------------------------------------------------------------------
def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the emulator's state, counter, files and opener")
    _device_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from . import profiles

    st = _control(args.device, "status")
    if args.json:
        st.pop("ok", None)
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(profiles.get(st.get("abi", profiles.DEFAULT)).format_status(st))
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


# -- trace -------------------------------------------------------------------
def _add_trace(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record, show and replay ioctl traces")
    tsub = p.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    s = tsub.add_parser("start", help="start recording a running emulator to FILE")
    s.add_argument("file", metavar="FILE")
    _device_arg(s)
    s.set_defaults(func=_run_trace_start)
    s = tsub.add_parser("stop", help="stop recording")
    _device_arg(s)
    s.set_defaults(func=_run_trace_stop)
    s = tsub.add_parser("show", help="print a trace, one strace-style line per event")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="pass the matching records through as JSON Lines")
    s.add_argument("--pid", type=int, help="only this pid (or tid)")
    s.add_argument("--cmd", help="only this ioctl (FD_PRESERVE, LIVEUPDATE_IOCTL_GET_STATE, 0xba03)")
    s.set_defaults(func=_run_trace_show)
    s = tsub.add_parser("replay", help="re-issue a trace's calls against a device and report divergences")
    s.add_argument("file", metavar="FILE")
    _device_arg(s)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--stop-at-kexec", action="store_true",
                   help="replay up to the kexec, then hold the device open until the kexec (or a signal)")
    g.add_argument("--after-kexec", action="store_true", help="replay only what follows the kexec")
    s.add_argument("-q", "--quiet", action="store_true", help="only divergences and the summary")
    s.set_defaults(func=_run_trace_replay)


def _run_trace_start(args: argparse.Namespace) -> int:
    r = _control(args.device, "trace", action="start", path=os.path.abspath(args.file))
    if not r.get("ok"):
        raise CliError(str(r.get("error")))
    print(f"tracing {args.device} to {r['path']}")
    return 0


def _run_trace_stop(args: argparse.Namespace) -> int:
    r = _control(args.device, "trace", action="stop")
    print(f"stopped tracing to {r['path']}" if r.get("path") else "was not tracing")
    return 0


def _run_trace_show(args: argparse.Namespace) -> int:
    from .tracing import record as trace
    from .tracing.inject import RuleError, parse_cmd

    try:
        cmd = parse_cmd(args.cmd) if args.cmd else None
    except RuleError as e:
        raise CliError(str(e)) from None
    try:
        trace.show(args.file, as_json=args.json, pid=args.pid, cmd=cmd)
    except OSError as e:
        raise CliError(f"{args.file}: {e.strerror}") from None
    except BrokenPipeError:
        pass
    return 0


def _run_trace_replay(args: argparse.Namespace) -> int:
    from .tracing.replay import ReplayError, replay

    try:
        return replay(args.file, args.device, stop_at_kexec=args.stop_at_kexec, after_kexec=args.after_kexec,
                      quiet=args.quiet)
    except ReplayError as e:
        raise CliError(str(e)) from None


# -- inject ------------------------------------------------------------------
def _add_inject(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inject", help="add fault-injection rules to a running emulator (or list/clear them)")
    p.add_argument("rules", nargs="*", metavar="RULE",
                   help="CMD:error=ERRNO[:when=N|N+|N+S][:delay=DUR], prepare:error=ERRNO, kexec:error=ERRNO")
    p.add_argument("--clear", action="store_true", help="remove every rule first")
    _device_arg(p)
    p.set_defaults(func=_run_inject)


def _run_inject(args: argparse.Namespace) -> int:
    from .tracing.inject import RuleError, parse_rule

    try:
        for rule in args.rules:
            parse_rule(rule)
    except RuleError as e:
        raise CliError(str(e)) from None
    r = _control(args.device, "inject", rules=args.rules, clear=args.clear)
    if not r.get("ok"):
        raise CliError(str(r.get("error")))
    for row in r["rules"]:
        print(f"{row['rule']}  (hits {row['hits']})")
    return 0


# -- run ---------------------------------------------------------------------
def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run CMD so that FD_RESTORE installs fds and reboot(KEXEC) is emulated")
    _device_arg(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from .control.channel import ControlError
    from .run.command import run_under

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CliError("run: no command given (cusedev run [--device PATH] -- CMD ARGS)")
    try:
        return asyncio.run(run_under(args.device, argv))
    except ControlError as e:
        raise CliError(str(e)) from None
    except FileNotFoundError as e:
        raise CliError(f"run: {argv[0]}: {e.strerror}") from None


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_serve, _add_status, _add_kexec, _add_run, _add_trace, _add_inject,
]


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
    from .control.server import ServeError

    try:
        return args.func(args)
    except (CliError, ServeError) as e:
        print(f"cusedev: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
