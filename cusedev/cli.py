"""The ``cusedev`` command: argparse subcommands, each a few lines over a module that does the work.

Adding a subcommand: write ``def _add_NAME(sub)`` that registers its parser
with ``set_defaults(func=...)`` and append it to ``SUBCOMMANDS``.  A ``func``
takes the parsed args and returns the exit code; raising ``CliError`` (or
``ServeError``) prints one ``cusedev: error: ...`` line and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import grp
import json
import logging
import os
import pwd
import shutil
import signal
import socket
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
    handler = load_handler(args.handler) if args.handler else None
    if args.trace or args.inject:
        handler = _traced_handler(handler or _device(args.abi), args.trace, args.inject)
    asyncio.run(serve(args.device, args.transport, on_ready=print_ready, handler=handler, mode=args.mode,
                      uid=uid, gid=gid, memory=args.memory, state_dir=args.state_dir, sysfs=args.sysfs,
                      sysfs_root=args.sysfs_root, abi=args.abi))
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
        raise _control_error(device, e) from None


def _control_error(device: str, e: Exception) -> CliError:
    """The one-line error for a failed control request: a stale socket is not a missing one."""
    stale = _stale_socket(device)
    if stale:
        return CliError(f"the emulator of {device} is not running: {stale} is a stale control socket "
                        f"(left by an emulator that was killed; the next `cusedev serve --device {device}` "
                        "clears it)")
    return CliError(str(e))


def _stale_socket(device: str) -> str | None:
    """The control socket's path when it exists but nobody listens (its emulator was SIGKILLed)."""
    from .control.paths import control_socket

    path = control_socket(device)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        return path
    except OSError:
        return None
    finally:
        s.close()
    return None


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
    s.add_argument("--cmd", help="only this ioctl: a command name of the profile (short or full) or a number (0xba03)")
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
    s = tsub.add_parser("record", help="run CMD and record its LUO ioctls (and reboot) with ptrace, against any device")
    s.add_argument("-o", "--output", metavar="FILE", default="luo-trace.jsonl",
                   help="the trace file (default luo-trace.jsonl; created mode 0600)")
    s.add_argument("--device", action="append", metavar="PATH",
                   help="a path that is the device (repeatable; default /dev/liveupdate)")
    s.add_argument("--abi", metavar="NAME", help="the ABI profile to decode with (default: the emulator's, or 7.2)")
    s.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")
    s.set_defaults(func=_run_trace_record)
    s = tsub.add_parser("diff", help="compare two traces call by call; exit 0 when they agree")
    s.add_argument("a", metavar="A")
    s.add_argument("b", metavar="B")
    s.add_argument("--max", type=int, default=5, metavar="N", help="print at most N divergences (default 5)")
    s.set_defaults(func=_run_trace_diff)


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
        _check_trace_header(args.file)
        trace.show(args.file, as_json=args.json, pid=args.pid, cmd=cmd)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): main() ends quietly
    except OSError as e:
        raise CliError(f"{args.file}: {e.strerror}") from None
    return 0


def _check_trace_header(path: str) -> None:
    """Refuse what is not a cusedev trace of a format this version reads, as ``trace replay`` does."""
    from .tracing.record import FORMAT_VERSION

    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        head = json.loads(first)
    except ValueError:
        head = None
    if not isinstance(head, dict) or head.get("type") != "header":
        raise CliError(f"{path}: not a cusedev trace (no header record)")
    if head.get("format") != FORMAT_VERSION:
        raise CliError(f"{path}: trace format {head.get('format')}, this cusedev reads {FORMAT_VERSION}")


def _run_trace_replay(args: argparse.Namespace) -> int:
    from .tracing.replay import ReplayError, replay

    _refuse_own_trace(args.file, args.device)
    try:
        return replay(args.file, args.device, stop_at_kexec=args.stop_at_kexec, after_kexec=args.after_kexec,
                      quiet=args.quiet)
    except ReplayError as e:
        raise CliError(str(e)) from None


def _run_trace_record(args: argparse.Namespace) -> int:
    from .tracing.ptrace import RecordError, not_runnable, record

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CliError("trace record: no command given (cusedev trace record [-o FILE] -- CMD ARGS)")
    why = not_runnable(argv[0])
    if why:
        print(f"cusedev trace record: {argv[0]}: {why}", file=sys.stderr)
        return 127
    try:
        return record(args.output, argv, args.device or ["/dev/liveupdate"], args.abi)
    except RecordError as e:
        raise CliError(str(e)) from None


def _run_trace_diff(args: argparse.Namespace) -> int:
    from .tracing.diff import DiffError, diff

    try:
        return diff(args.a, args.b, limit=args.max)
    except DiffError as e:
        print(f"cusedev: error: {e}", file=sys.stderr)
        return 2


def _refuse_own_trace(path: str, device: str) -> None:
    """Replaying a trace into the emulator recording it would append to the file being read, forever."""
    from .control.channel import ControlError, request

    try:
        tracing = request(device, "trace", action="status").get("path")
    except (ControlError, OSError):
        return  # not an emulator (a real kernel's device, or none): replay says what is wrong
    try:
        same = bool(tracing) and os.path.samefile(str(tracing), path)
    except OSError:
        same = False
    if same:
        raise CliError(f"{path}: the emulator of {device} is recording this trace; replay it into another "
                       "emulator (cusedev serve --device OTHER) or stop the recording first (cusedev trace stop)")


# -- inject ------------------------------------------------------------------
def _add_inject(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inject", help="add fault-injection rules to a running emulator (or list/clear them)",
                       description="Add fault-injection rules to a running emulator, then print its rules, "
                       "one a line with its hits: how many calls matched the rule's command (or point) so "
                       "far, whether or not its `when` made it fire.")
    p.add_argument("rules", nargs="*", metavar="RULE",
                   help="CMD:error=ERRNO[:when=N|N+|N+S][:delay=DUR], prepare:error=ERRNO, kexec:error=ERRNO")
    p.add_argument("--list", action="store_true", help="only print the rules and their hits (the default with no RULE)")
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
    if args.list and (args.rules or args.clear):
        raise CliError("inject: --list takes no RULE and no --clear")
    r = _control(args.device, "inject", rules=args.rules, clear=args.clear)
    if not r.get("ok"):
        raise CliError(str(r.get("error")))
    if not r["rules"] and (args.list or not (args.rules or args.clear)):
        print("no rules")
    for row in r["rules"]:
        print(f"{row['rule']}  (hits {row['hits']})")
    return 0


# -- run ---------------------------------------------------------------------
def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run CMD so that fd-returning ioctls install fds and reboot(KEXEC) is emulated")
    _device_arg(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from .control.channel import ControlError
    from .run.command import run_under

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CliError("run: no command given (cusedev run [--device PATH] -- CMD ARGS)")
    cannot = _not_runnable(argv[0])
    if cannot:
        print(f"cusedev run: {argv[0]}: {cannot[1]}", file=sys.stderr)
        return cannot[0]
    try:
        return asyncio.run(run_under(args.device, argv))
    except ControlError as e:
        raise _control_error(args.device, e) from None
    except (FileNotFoundError, PermissionError) as e:  # it changed since the check
        print(f"cusedev run: {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127 if isinstance(e, FileNotFoundError) else 126


def _not_runnable(cmd: str) -> tuple[int, str] | None:
    """A shell's verdict on CMD before anything starts: (127, why) missing, (126, why) not executable."""
    if "/" not in cmd:
        return None if shutil.which(cmd) else (127, "command not found")
    if not os.path.exists(cmd):
        return 127, os.strerror(errno.ENOENT)
    if os.path.isdir(cmd) or not os.access(cmd, os.X_OK):
        return 126, os.strerror(errno.EISDIR if os.path.isdir(cmd) else errno.EACCES)
    return None


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
    for p in _leaf_parsers(parser):
        # after the subcommand too (`cusedev serve -v`); SUPPRESS keeps a `cusedev -v serve`
        p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                       help="more logging (-vv: debug)")
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that take a subcommand's own options (`serve`, `trace show`, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for p in dict.fromkeys(subs[0].choices.values()) for leaf in _leaf_parsers(p)]


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown option is reported with the usage of the subcommand it was given to."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        p = parser
        for dest in ("command", "trace_command"):
            subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
            name = getattr(args, dest, None)
            if not subs or name is None:
                break
            p = subs[0].choices[name]
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _quiet_broken_pipe() -> int:
    """The reader of our stdout is gone (`cusedev status | true`): stop quietly, as `cat` would."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush into the dead pipe at exit
    except OSError:
        pass
    return 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> int:
    args = _parse(build_parser(), argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="cusedev: %(levelname)s: %(message)s", stream=sys.stderr)
    from .control.server import ServeError

    try:
        rc = args.func(args)
        sys.stdout.flush()
        return rc
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except (CliError, ServeError) as e:
        print(f"cusedev: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
