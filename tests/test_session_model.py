"""Unit tests of the session model (spec luo-session.md 4, 5, 7, 8, 11, 12), one rule per test, both profiles."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Hashable

import pytest

from cusedev.profiles.session.model import (
    RULES,
    RULES_6_19,
    RULES_7_2,
    Rules,
    Session,
    SessionModel,
    lookup_name,
    stored_name,
)


class Obj:
    """A fake preserved memfd: an inode key, a frozen flag, a release count."""

    def __init__(self, key: Hashable = None) -> None:
        self.key = key if key is not None else object()
        self.frozen = 0
        self.released = 0

    def freeze(self) -> None:
        self.frozen += 1

    def release(self) -> None:
        self.released += 1


class Got:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


def name(s: str) -> bytes:
    return s.encode().ljust(64, b"\0")


def errno_of(fn, *a) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as ei:
        fn(*a)
    return ei.value.errno


@pytest.fixture(params=["6.19", "7.2"])
def m(request: pytest.FixtureRequest) -> SessionModel:
    return SessionModel(RULES[request.param])


def carried(m: SessionModel, **files: Obj) -> Session:
    s = m.create(name("a"))
    for t, o in enumerate(files.values()):
        m.preserve(s, t, lambda o=o: o)
    m.kexec()
    return m.incoming[b"a"]


def test_names() -> None:
    assert stored_name(b"x" * 64) == b"x" * 63
    assert stored_name(b"ab\0cd") == b"ab"
    assert lookup_name(b"x" * 64) is None
    assert lookup_name(b"ab\0junk") == b"ab"


def test_create_duplicate_is_eexist_and_incoming_names_are_separate(m: SessionModel) -> None:
    m.create(name("a"))
    assert errno_of(m.create, name("a")) == errno.EEXIST
    m.kexec()
    m.create(name("a"))  # the incoming "a" does not clash
    assert list(m.incoming) == [b"a"] and list(m.outgoing) == [b"a"]


def test_name_rules_differ() -> None:
    new = SessionModel(RULES_7_2)
    assert errno_of(new.create, bytes(64)) == errno.EINVAL
    assert errno_of(new.create, b"X" * 64) == errno.EINVAL
    assert new.create(b"Y" * 63 + b"\0").name == b"Y" * 63
    old = SessionModel(RULES_6_19)
    assert old.create(bytes(64)).name == b""
    assert old.create(b"X" * 64).name == b"X" * 63
    assert errno_of(old.create, b"X" * 63 + b"Z") == errno.EEXIST  # cut to the same 63 bytes


@pytest.mark.parametrize("rules", [RULES_6_19, RULES_7_2])
def test_session_cap(rules: Rules) -> None:
    m = SessionModel(dataclasses.replace(rules, max_sessions=3))
    for i in range(3):
        m.create(name(f"s{i}"))
    assert errno_of(m.create, name("s3")) == rules.sessions_errno
    assert errno_of(m.create, name("s0")) == rules.sessions_errno  # the cap comes before EEXIST
    m.release(m.outgoing[b"s0"])  # the cap counts what is live
    m.create(name("s3"))


def test_real_caps() -> None:
    assert (RULES_6_19.max_sessions, RULES_6_19.sessions_errno, RULES_6_19.max_files) == (819, errno.ENOMEM, 128)
    assert (RULES_7_2.max_sessions, RULES_7_2.sessions_errno, RULES_7_2.max_files) == (510_000, errno.ENOSPC, 630_000)
    m = SessionModel(RULES_6_19)
    for i in range(819):
        m.create(name(f"many-{i}"))
    assert errno_of(m.create, name("one-more")) == errno.ENOMEM
    s = m.outgoing[b"many-0"]
    for t in range(128):
        m.preserve(s, t, Obj)
    assert errno_of(m.preserve, s, 128, Obj) == errno.ENOSPC


def test_preserve_order_eexist_enospc_take_ebusy(m: SessionModel) -> None:
    m.rules = dataclasses.replace(m.rules, max_files=2)
    s = m.create(name("a"))
    o = Obj("inode")
    m.preserve(s, 1, lambda: o)
    taken: list[int] = []

    def take_fails() -> Obj:
        taken.append(1)
        raise OSError(errno.EBADF, "bad")

    assert errno_of(m.preserve, s, 1, take_fails) == errno.EEXIST  # before the fd is looked at
    assert errno_of(m.preserve, s, 2, take_fails) == errno.EBADF
    o2 = Obj("inode")
    if m.rules.busy_by_object:
        assert errno_of(m.preserve, s, 2, lambda: o2) == errno.EBUSY
        assert o2.released == 1
        other = m.create(name("b"))
        assert errno_of(m.preserve, other, 9, lambda: Obj("inode")) == errno.EBUSY
    else:
        m.preserve(s, 2, lambda: o2)  # 6.19: the same inode twice is fine
    if m.rules.busy_by_object:
        m.preserve(s, 2, Obj)
    assert errno_of(m.preserve, s, 4, take_fails) == errno.ENOSPC
    assert taken == [1]


def test_busy_key_freed_by_close(m: SessionModel) -> None:
    s = m.create(name("a"))
    m.preserve(s, 1, lambda: Obj("i"))
    m.release(s)
    t = m.create(name("a"))  # name free again
    m.preserve(t, 1, lambda: Obj("i"))
    assert not s.files and s.gone


def test_close_outgoing_unpreserves(m: SessionModel) -> None:
    s = m.create(name("a"))
    objs = [Obj(), Obj()]
    for t, o in enumerate(objs):
        m.preserve(s, t, lambda o=o: o)
    m.release(s)
    m.release(s)  # a second release (a revoked duplicate) changes nothing
    assert [o.released for o in objs] == [1, 1]
    assert m.outgoing == {} and not m.objects
    m.kexec()
    assert m.incoming == {}


def test_retrieve_session_rules(m: SessionModel) -> None:
    assert errno_of(m.retrieve, name("a")) == errno.ENOENT  # before any live update
    carried(m)
    assert errno_of(m.retrieve, b"a" * 64) == errno.ENOENT  # no NUL never matches
    s = m.retrieve(b"a\0trailing junk".ljust(64, b"\0"))  # bytes after the NUL are ignored
    assert s.retrieved and s.incoming
    assert errno_of(m.retrieve, name("a")) == errno.EINVAL
    m.finish(s)
    assert errno_of(m.retrieve, name("a")) == errno.EINVAL  # still listed until closed
    m.release(s)
    assert errno_of(m.retrieve, name("a")) == errno.ENOENT


def test_retrieve_fd_and_repeat_returns_the_same_file(m: SessionModel) -> None:
    o = Obj("i")
    s = carried(m, f=o)
    m.retrieve(name("a"))
    assert errno_of(m.find_file, s, 99) == errno.ENOENT
    got = Got()
    assert m.retrieve_fd(s, 0, lambda obj: got) is got
    assert m.retrieve_fd(s, 0, lambda obj: Got()) is got
    if m.rules.busy_by_object:  # a retrieved, unfinished memfd cannot be preserved again
        out = m.create(name("b"))
        assert errno_of(m.preserve, out, 1, lambda: Obj("i")) == errno.EBUSY
    m.finish(s)
    assert got.released == 1 and o.released == 1
    assert errno_of(m.find_file, s, 0) == errno.ENOENT  # FINISH emptied the session
    out2 = m.create(name("c"))
    m.preserve(out2, 1, lambda: Obj("i"))  # FINISH freed the key


def test_sticky_retrieve_errors() -> None:
    for rules, second in ((RULES_7_2, errno.ENOMEM), (RULES_6_19, 0)):
        m = SessionModel(rules)
        o = Obj()
        s = carried(m, f=o)
        m.retrieve(name("a"))

        def broken(obj: object) -> Got:
            raise OSError(errno.ENOMEM, "no memory")

        assert errno_of(m.retrieve_fd, s, 0, broken) == errno.ENOMEM
        if second:
            assert errno_of(m.retrieve_fd, s, 0, lambda obj: Got()) == second
            assert o.released == 1
        else:
            m.retrieve_fd(s, 0, lambda obj: Got())


def test_finish_rules() -> None:
    new = SessionModel(RULES_7_2)
    s = carried(new, f=Obj())
    assert errno_of(new.finish, s, 1) == errno.EINVAL
    new.finish(s)
    new.finish(s)  # repeat: no files, 0
    old = SessionModel(RULES_6_19)
    s2 = carried(old, f=Obj())
    old.finish(s2, 7)  # reserved not checked
    out = old.create(name("b"))
    old.finish(out)  # 6.19 on an outgoing session: no effect
    assert errno_of(old.find_file, out, 0) == errno.ENOENT


def test_finish_discards_files_never_retrieved(m: SessionModel) -> None:
    a, b = Obj(), Obj()
    s = carried(m, a=a, b=b)
    m.retrieve(name("a"))
    got = m.retrieve_fd(s, 0, lambda obj: Got())
    m.release(s)  # implicit FINISH, then the session is gone
    assert a.released == b.released == 1 and got.released == 1  # type: ignore[attr-defined]
    assert m.incoming == {}


def test_incoming_never_retrieved_stays_until_the_next_update(m: SessionModel) -> None:
    o = Obj()
    carried(m, f=o)
    assert o.released == 0 and b"a" in m.incoming
    m.kexec()
    assert o.released == 1 and m.incoming == {} and m.update_count == 2


def test_kexec_carries_unreleased_outgoing_with_files(m: SessionModel) -> None:
    keep, gone, empty = m.create(name("keep")), m.create(name("gone")), m.create(name("empty"))
    ko, go = Obj("k"), Obj("g")
    m.preserve(keep, 5, lambda: ko)
    m.preserve(gone, 6, lambda: go)
    m.release(gone)
    assert m.kexec() is True
    assert list(m.incoming) == [b"keep", b"empty"]
    assert ko.frozen == 1 and ko.released == 0 and go.released == 1
    assert keep.gone and empty.gone
    m.release(keep)  # the killed holder's close after the kexec: no unpreserve
    assert ko.released == 0
    assert m.outgoing == {} and not m.objects and m.update_count == 1
    s = m.retrieve(name("keep"))
    assert list(s.files) == [5] and s.retrieved


def test_kexec_drops_incoming_of_every_state(m: SessionModel) -> None:
    objs = {n: Obj() for n in ("never", "finished", "open")}
    for n, o in objs.items():
        s = m.create(name(n))
        m.preserve(s, 0, lambda o=o: o)
    m.kexec()
    m.finish(m.retrieve(name("finished")))
    m.retrieve(name("open"))
    m.kexec()
    assert m.incoming == {}
    assert all(o.released == 1 for o in objs.values())


def test_6_19_preserve_into_incoming_is_dropped_not_carried() -> None:
    m = SessionModel(RULES_6_19)
    s = carried(m)
    m.retrieve(name("a"))
    o = Obj()
    m.preserve(s, 1, lambda: o)
    m.kexec()
    assert m.incoming == {} and o.released == 1


def test_fault_injection_enomem(m: SessionModel) -> None:
    def fault(point: str) -> None:
        if point == "session_alloc":
            raise OSError(errno.ENOMEM, "injected")

    m.fault = fault
    assert errno_of(m.create, name("a")) == errno.ENOMEM
    assert m.outgoing == {}


def test_state_dir_keeps_carried_sessions(tmp_path: object) -> None:
    """--state-dir: incoming sessions not yet retrieved survive a restart with bytes, offset and seals."""
    import os

    from cusedev.profiles.session.memfd import PreservedMemfd
    from cusedev.profiles.session.statedir import SessionStateDir

    m = SessionModel(RULES_7_2)
    sd = SessionStateDir(str(tmp_path), m)
    sd.attach()
    s = m.create(name("vm"))
    fd = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
    os.write(fd, b"guest ram")
    m.preserve(s, 3, lambda: PreservedMemfd(os.dup(fd)))
    m.create(name("out-only"))
    m.kexec()
    m.create(name("new-outgoing"))  # dropped on restart: its fd died with the emulator
    sd.flush()
    sd.save()
    again = SessionModel(RULES_7_2)
    SessionStateDir(str(tmp_path), again).attach()
    assert set(again.incoming) == {b"vm", b"out-only"} and not again.outgoing and again.update_count == 1
    got = again.retrieve(name("vm"))
    r = again.retrieve_fd(got, 3, lambda obj: obj.rebuild(True))  # type: ignore[attr-defined]
    assert os.pread(r.fd, 20, 0) == b"guest ram" and os.lseek(r.fd, 0, os.SEEK_CUR) == 9  # type: ignore[attr-defined]
    with pytest.raises(ValueError):
        SessionStateDir(str(tmp_path), SessionModel(RULES_6_19)).attach()
    os.close(fd)


@pytest.mark.parametrize("keep_seals", [True, False])
def test_retrieved_file_built_ahead_is_what_retrieval_builds(keep_seals: bool) -> None:
    """``prepare`` (run in a thread after a kexec) builds the very file ``rebuild`` would: same bytes,
    offset and seals, a new open file of the same inode; one that needs a copy is left to ``rebuild``;
    ``release`` closes a prepared file nobody took."""
    import fcntl
    import os

    from cusedev.profiles.session.memfd import F_SEAL_GROW, F_SEAL_SEAL, PreservedMemfd, seals_of

    def memfd(seals: int) -> int:
        fd = os.memfd_create("ahead", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.write(fd, b"carried bytes")
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)  # type: ignore[attr-defined]
        return fd

    built = {}
    for how in ("ahead", "at retrieval"):
        src = memfd(F_SEAL_GROW if keep_seals else 0)
        obj = PreservedMemfd(os.dup(src))
        os.lseek(src, 5, os.SEEK_SET)
        obj.freeze()
        if how == "ahead":
            obj.prepare(keep_seals)
            assert obj.ready is not None
        r = obj.rebuild(keep_seals)
        assert obj.ready is None
        built[how] = (os.pread(r.fd, 64, 0), os.lseek(r.fd, 0, os.SEEK_CUR), seals_of(r.fd),
                      os.fstat(r.fd).st_ino == os.fstat(src).st_ino, r.fd != obj.fd)
        obj.prepare(keep_seals)  # retrieved: nothing more is built
        assert obj.ready is None
        r.release()
        obj.release()
        os.close(src)
    assert built["ahead"] == built["at retrieval"]
    assert built["ahead"][:2] == (b"carried bytes", 5)

    # seals the inode cannot shed (6.19 keeps none; here F_SEAL_GROW): a copy, so not built ahead
    src = memfd(F_SEAL_GROW)
    obj = PreservedMemfd(os.dup(src))
    obj.prepare(False)
    assert obj.ready is None
    assert seals_of(obj.rebuild(False).fd) == F_SEAL_SEAL
    obj.release()
    os.close(src)

    # released before anyone retrieved it: the prepared file is closed with it
    src = memfd(0)
    obj = PreservedMemfd(os.dup(src))
    obj.prepare(True)
    assert obj.ready is not None
    kept = obj.ready.fd
    obj.release()
    with pytest.raises(OSError):
        os.fstat(kept)
    os.close(src)
