"""An ABI profile is the unit of the emulator: one object says everything one ABI of /dev/liveupdate is.

The layers below a profile know no ABI.  The transports turn kernel requests
into calls on the device; the device (``cusedev.device``) keeps the open files,
runs the ioctl tables, moves fds in and out of callers and runs the
interceptor chain (tracing, fault injection); the control plane shows status,
sysfs attributes and the state dir.  Each of them asks the running
``Profile`` for what is ABI-specific, so a second ABI is a new folder under
``cusedev/profiles/`` plus one ``register()`` call, nothing else.

How to write a profile (``profiles/v3/`` is the worked example):

1. **Declarations.**  Your ``cdefs/<name>.h`` in the project's own words (valid
   C that gcc compiles and cffi parses), loaded into an ``FFI`` of your own
   when it clashes with another profile's header.

2. **Tables, one per kind of open file.**  A ``Kind`` is what an open file of
   the emulator's node is: ``"device"`` for every ``open()`` of the node by a
   client, and any further kinds your fd-returning commands create (e.g.
   ``"session"``).  Each ``Kind`` has a command ``base`` (the kernel
   subtracts it from ``_IOC_NR(cmd)`` and answers EINVAL below it or past the
   table), its ``ops`` rows (``cusedev.device.dispatch.make_op``, indexed by
   ``nr - base``), ``exclusive`` (a second open of that kind while one exists
   is EBUSY), an optional ``check`` run between the exact-cmd (ENOTTY) step and
   the size step (the 7.2 kind check: raise EINVAL), and an optional
   ``release`` run when the last reference to an open file of that kind goes
   away (close of the last fd, death of the process).

3. **Handlers.**  ``handler(file, caller, values)``: ``file`` is the
   ``OpenFileContext`` (its ``kind``, its ``bound`` object, the ``model`` and
   the ``device`` services), ``caller`` who called (``cusedev.device.seam.Caller``)
   and ``values`` the struct's fields in declaration order, the size word
   first; byte arrays (``__u8 name[64]``) arrive as one ``bytes``.  Return
   ``None`` (nothing to write back) or a mapping ``{field: value}`` of output
   fields (ints, or ``bytes`` for arrays; the rest of the struct is echoed as
   it came in, and ``min(size, sizeof)`` bytes are written back), or an
   awaitable of either: the dispatcher awaits it, then writes back.  A
   ``Result`` mapping may carry ``undo``, called when the write-back faults
   (the kernel destroys a just-created session then).  Errors are ``OSError``
   with the kernel's errno (``cusedev.libc.fail``).  Handlers never touch user
   memory: the dispatcher does the kernel's order of checks.

4. **Fds.**  ``file.device.take_fd(caller, fd)`` is our duplicate of the
   caller's fd (pidfd_getfd; EBADF as ``fdget``).
   ``file.device.installer_for(caller)`` is the ``FdInstaller`` of the call
   (seccomp ADDFD under `cusedev run`), or None outside it: then make every
   check first and fail with EOPNOTSUPP (``file.device.warn_no_installer``).
   A command that returns a new open file of the emulator's own node of
   another kind calls ``await file.device.open_own(kind, bound)`` (an fd in
   the emulator, opened on its own node, whose open file has ``kind`` and
   ``bound``; the exclusive rule does not apply to it), installs it with the
   installer and closes its copy.  List every fd-returning command's number in
   ``Profile.fd_commands``: `cusedev run` traps exactly those (plus
   reboot(KEXEC)); no other syscall is slowed.

5. **Model.**  ``Profile.model()`` makes the profile's pure state (state
   machine, registries) satisfying ``Model``: ``listeners`` (called with
   ``(old, new)`` after every change: sysfs, state dir and trace follow it),
   ``fault`` (the hook fault injection uses at ``fault_points``), and
   ``kexec()`` (the emulated reboot; True for a live update).

6. **Codecs.**  ``status(model)`` is the JSON of `cusedev status` (keys
   ``state`` and ``update_count`` when the ABI has them) and
   ``format_status(st)`` its human text; ``state_dir`` saves and loads the
   model for ``--state-dir`` (None: the profile has no persistence);
   ``sysfs(model)`` maps attribute paths under the sysfs root
   (``"kernel/liveupdate/state"``) to functions giving their text (empty: no
   sysfs attributes); ``trace`` names commands and decodes fields for the
   trace records (``TraceRules``); ``replay`` re-issues a recorded trace;
   ``control`` adds control-socket commands; ``client`` is the typed client class.

7. **Register** it at import of your package's ``profile`` module:
   ``register(PROFILE)``, and add the module to ``_BUILTIN`` below so that
   ``get(name)`` finds it without an import by the caller.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..device.dispatch import Op
    from ..device.seam import Caller, FdInstaller


class Model(Protocol):
    """What the layers outside a profile ask of its model."""

    #: called with ``(old, new)`` (the profile's notion of state) after every change
    listeners: list[Callable[[Any, Any], None]]

    def fault(self, point: str) -> None:
        """Called at each of ``Profile.fault_points``; may raise OSError (fault injection).  An
        attribute the device replaces: the model only calls it."""
        ...

    def kexec(self) -> bool:
        """reboot(KEXEC): carry what the ABI carries, boot; True for a live update."""
        ...


class DeviceServices(Protocol):
    """What the device offers a handler (``OpenFileContext.device``)."""

    def take_fd(self, caller: Caller, fd: int) -> int:
        """Our duplicate of the caller's ``fd`` (O_CLOEXEC); EBADF when it is not open there or O_PATH."""
        ...

    def installer_for(self, caller: Caller) -> FdInstaller | None:
        """How to put an fd into this caller: seccomp ADDFD under `cusedev run`, else None."""
        ...

    @property
    def chain(self) -> Sequence[Any]:
        """The interceptors (tracing, fault injection), outermost first; empty on the bare path.  While
        there are any, a handler makes the checks they could observe in the kernel's order, cost or not."""
        ...

    def warn_no_installer(self, what: str) -> None:
        """Log once that ``what`` needs `cusedev run` to install an fd (the caller then gets EOPNOTSUPP)."""
        ...

    def open_own(self, kind: str, bound: Any, tagged: bool = True) -> Awaitable[int]:
        """An fd (ours, O_CLOEXEC) on the emulator's own node whose open file is of ``kind`` and bound to
        ``bound``; exclusive open does not apply.  Awaited by a handler; the caller closes it.
        ``tagged=False``: no trapped call on this file can succeed, so it needs no fast-path tag."""
        ...

    def close_own(self, fd: int) -> None:
        """Close our fd ``fd`` (from ``open_own``) off the loop: it may be a last CUSE reference."""
        ...

    def disown_own(self, fd: int) -> None:
        """``close_own`` for a file whose hand-out failed before the kernel would have opened it
        (EMFILE): its release then has no effect."""
        ...


class OpenFileContext(Protocol):
    """An open file of the emulator, as a handler sees it (``cusedev.device.openfiles.OpenFile``)."""

    @property
    def fh(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def bound(self) -> Any:
        """The profile's per-file object: None for the device, e.g. the LUO session a session file is bound to."""
        ...

    @property
    def model(self) -> Any: ...

    @property
    def device(self) -> DeviceServices: ...


#: ``handler(file, caller, values)`` -> output fields, None, or an awaitable of either (see the module text)
Handler = Callable[
    [Any, "Caller", tuple], "Mapping[str, Any] | None | Awaitable[Mapping[str, Any] | None]"
]


class Result(dict[str, Any]):
    """Output fields with an ``undo`` for when the write-back faults (EFAULT after side effects)."""

    def __init__(self, fields: Mapping[str, Any], undo: Callable[[], None] | None = None):
        super().__init__(fields)
        self.undo = undo


@dataclass(frozen=True)
class Kind:
    """One kind of open file: its ioctl table and the rules that go with the kind."""

    name: str
    #: subtracted from _IOC_NR(cmd); nr < base or nr - base >= len(ops) is EINVAL
    base: int
    ops: Sequence[Op]
    #: a second open of this kind while one exists is EBUSY (the v3 and session devices)
    exclusive: bool = False
    #: run after the exact-cmd check, before the size check; raises (EINVAL) to refuse
    check: Callable[[OpenFileContext, Op], None] | None = None
    #: the last reference to an open file of this kind is gone
    release: Callable[[OpenFileContext], None] | None = None


class TraceRules(Protocol):
    """How trace records name and decode this profile's calls (the trace format stays the same)."""

    #: ioctl number -> "LIVEUPDATE_IOCTL_..." (also what fault-injection rules may name)
    names: Mapping[int, str]

    def parse_cmd(self, text: str) -> int | None:
        """A command given by name (short or full) as in an injection rule; None if unknown."""
        ...

    def enums(self, field: str) -> Mapping[int, str] | None:
        """Value names of a field (``"state"``, ``"event"``), or None: shown as numbers."""
        ...

    def state_label(self, model: Any) -> str:
        """The model's state as the records' ``state_before`` / ``state_after`` show it."""
        ...

    def passed_fd(self, cmd: int, data: bytes) -> int | None:
        """The fd a command hands in (described in the record: kind, size, digest), or None."""
        ...

    def preserved_fd(self, model: Any, cmd: int, data: bytes) -> int | None:
        """After a successful call that preserved a file: the emulator's own fd of it, or None."""
        ...


class StateCodec(Protocol):
    """``--state-dir``: one model mirrored in a directory (made by ``Profile.state_dir(path, model)``)."""

    def attach(self) -> None:
        """Load what the directory holds into the model, then follow every change of it (``listeners``)."""
        ...


@dataclass(frozen=True)
class Profile:
    """One ABI of /dev/liveupdate (see the module text for each part)."""

    name: str
    summary: str
    #: kind name -> Kind; "device" is the kind of every open() of the node by a client
    kinds: Mapping[str, Kind]
    #: a fresh model (one emulated machine)
    model: Callable[[], Model]
    #: ioctl numbers that return a new fd in the caller: trapped under `cusedev run`
    fd_commands: tuple[int, ...]
    trace: TraceRules
    status: Callable[[Any], dict[str, Any]]
    #: the human text of `cusedev status` from the whole status (the runtime's keys ``device``,
    #: ``transport``, ``abi``, ``emulator_pid``, ``opener_pid``, ``runs`` and the model's)
    format_status: Callable[[Mapping[str, Any]], str]
    #: attribute path under the sysfs root -> its text, for one model (empty: no sysfs)
    sysfs: Callable[[Any], Mapping[str, Callable[[], str]]]
    client: type
    #: fault points the model's ``fault`` hook is called at ("prepare", "kexec" for v3)
    fault_points: tuple[str, ...] = ()
    #: ``state_dir(path, model)``: the ``StateCodec`` for ``--state-dir``, or None (no persistence)
    state_dir: Callable[[str, Any], StateCodec] | None = None
    #: the cdefs headers that declare this ABI
    cdefs: tuple[str, ...] = ()
    #: the cffi FFI that declares the structs of its ``ops`` (traces decode fields with it); None: the
    #: generic ``cusedev.uapi.ffi``
    ffi: Any = None
    #: ``replay(records, device, *, stop_at_kexec, after_kexec, quiet, out, path) -> 0|1``: re-issue a
    #: trace of this profile (header first) and report divergences; None: no replay
    replay: Callable[..., int] | None = None
    #: extra control-socket commands (``name -> command(device, msg) -> reply``), e.g. v3's ``kho``
    control: Mapping[str, Callable[[Any, dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)
    aliases: tuple[str, ...] = field(default=())


DEFAULT = "v3"
_REGISTRY: dict[str, Profile] = {}
#: modules that register the built-in profiles when imported
_BUILTIN = ("cusedev.profiles.v3.profile", "cusedev.profiles.session.profile")


def register(profile: Profile) -> Profile:
    """Make ``profile`` known by its name and aliases (a later one of the same name replaces it)."""
    for n in (profile.name, *profile.aliases):
        _REGISTRY[n] = profile
    return profile


def _load_builtin() -> None:
    for mod in _BUILTIN:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):  # the profile exists but is broken: say so
                raise


def get(name: str = DEFAULT) -> Profile:
    """The profile called ``name`` (or an alias of it); ValueError naming the known ones."""
    if name not in _REGISTRY:
        _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown ABI profile {name!r} (known: {', '.join(names())})") from None


def names() -> list[str]:
    """Every registered name and alias, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)
