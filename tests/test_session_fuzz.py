"""Random session-ABI call sequences against an independent model written from the spec (7.2 and 6.19).

The emulator serves the FUSE file in a thread of this process, and its fd
installer puts new fds into this very process (the caller), so session fds
and retrieved memfds are real fds here, every call a real ioctl() through the
kernel; no `cusedev run` is needed because the caller is the emulator's own
process.  The model below does not import cusedev's: it is the spec's rules,
restated small.  Seed: ``CUSEDEV_FUZZ_SEED`` (printed in the header).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from cusedev.control.server import Server
from cusedev.device.openfiles import EmulatedDevice
from cusedev.profiles.session.client import LuoSession, SessionDevice

STEPS = int(os.environ.get("CUSEDEV_SESSION_FUZZ_STEPS", "600"))
NAMES = ["a", "b", "c", "d", ""]
TOKENS = [0, 1, 2, 2**64 - 1]


class SelfInstaller:
    """Installs into the caller, which is this process: a dup of the emulator's fd."""

    def reserve(self, caller: Any) -> None:
        return None

    def install(self, caller: Any, fd: int) -> int:
        return os.dup(fd)


@pytest.fixture(params=["7.2", "6.19"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, EmulatedDevice]]:
    from _hostile import fd_links

    before = fd_links()
    d = tempfile.mkdtemp(prefix="cusedev-fuzz-", dir="/tmp")
    path = os.path.join(d, "liveupdate")
    dev = EmulatedDevice(profile=request.param)
    dev.installer, dev.node_path = SelfInstaller(), path
    ready, box = threading.Event(), {}

    async def main() -> None:
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        s = Server(path, "fuse", handler=dev)
        try:
            await s.start()
        except BaseException as e:
            box["error"] = e
            ready.set()
            raise
        ready.set()
        await box["stop"].wait()
        await s.stop()

    t = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    t.start()
    assert ready.wait(60) and "error" not in box, box.get("error")
    try:
        yield request.param, path, dev
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        t.join(30)
        os.rmdir(d)
    # the server's stop closed the device's own fds too (its spares, without a runtime), as did the test;
    # the preserved memfds are the device's state, kept by the object for as long as it lives
    left = {n: what for n, what in fd_links().items() if before.get(n) != what and not what.startswith("/memfd:")}
    assert not left, left


# ------------------------------------------------- the independent model ------------------------------
@dataclass
class MSession:
    name: str
    incoming: bool
    files: dict[int, bytes] = field(default_factory=dict)  # token -> contents
    keys: dict[int, int] = field(default_factory=dict)  # token -> memfd index (its inode)
    retrieved_tokens: set[int] = field(default_factory=set)
    retrieved: bool = False
    dead: bool = False  # revoked by a kexec


@dataclass
class Model:
    v72: bool
    outgoing: dict[str, MSession] = field(default_factory=dict)
    incoming: dict[str, MSession] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)  # memfd indexes preserved or retrieved-unfinished (7.2)

    def create(self, name: str) -> int | MSession:
        if self.v72 and name == "":
            return errno.EINVAL
        if name in self.outgoing:
            return errno.EEXIST
        s = self.outgoing[name] = MSession(name, False)
        return s

    def retrieve(self, name: str) -> int | MSession:
        s = self.incoming.get(name)
        if s is None:
            return errno.ENOENT
        if s.retrieved:
            return errno.EINVAL
        s.retrieved = True
        return s

    def preserve(self, s: MSession, token: int, idx: int, data: bytes) -> int:
        if s.dead:
            return errno.ENODEV
        if self.v72 and s.incoming:
            return errno.EINVAL
        if token in s.files:
            return errno.EEXIST
        if self.v72 and idx in self.busy:
            return errno.EBUSY
        s.files[token], s.keys[token] = data, idx
        if self.v72:
            self.busy.add(idx)
        return 0

    def retrieve_fd(self, s: MSession, token: int) -> int | bytes:
        if s.dead:
            return errno.ENODEV
        if self.v72 and not s.incoming:
            return errno.EINVAL
        if not s.incoming or token not in s.files:
            return errno.ENOENT
        s.retrieved_tokens.add(token)
        if self.v72:
            self.busy.add(s.keys[token])
        return s.files[token]

    def finish(self, s: MSession) -> int:
        if s.dead:
            return errno.ENODEV
        if self.v72 and not s.incoming:
            return errno.EINVAL
        if s.incoming:
            self._drop(s)
        return 0

    def _drop(self, s: MSession) -> None:
        for t in s.files:
            self.busy.discard(s.keys[t])
        s.files.clear()
        s.keys.clear()

    def close(self, s: MSession) -> None:
        if s.dead:
            return
        self._drop(s)
        (self.incoming if s.incoming else self.outgoing).pop(s.name, None)

    def kexec(self) -> None:
        for s in self.incoming.values():
            s.dead = True
        for s in self.outgoing.values():
            s.dead = True
        self.incoming = {n: MSession(n, True, dict(s.files), dict(s.keys)) for n, s in self.outgoing.items()}
        self.outgoing = {}
        self.busy = set()


# ------------------------------------------------------------- the fuzz -------------------------------
def _err(fn: Any) -> Any:
    try:
        return fn()
    except OSError as e:
        return e.errno


def test_random_sequences_match_the_model(served: tuple[str, str, EmulatedDevice], seeds: dict[str, int]) -> None:
    abi, path, dev = served
    rng = random.Random(seeds["fuzz"] ^ hash(abi))
    model = Model(v72=abi == "7.2")
    client = SessionDevice(path)
    open_fds: list[tuple[LuoSession, MSession]] = []
    memfds: list[tuple[int, bytes]] = []
    for i in range(6):
        fd = os.memfd_create(f"m{i}")
        data = f"memfd {i} ".encode() * (i + 1)
        os.write(fd, data)
        memfds.append((fd, data))
    log: list[str] = []
    seen: dict[str, int] = {}
    try:
        for step in range(STEPS):
            ops = ["create", "create", "retrieve", "retrieve", "preserve", "preserve", "retrieve_fd", "retrieve_fd",
                   "finish", "close", "name"]  # fmt: skip
            op = "kexec" if step % 25 == 24 else rng.choice(ops)
            where = f"step {step} {op} (seed {seeds['fuzz']}, abi {abi}); last: {log[-5:]}"
            if op in ("create", "retrieve"):
                name = rng.choice(NAMES)
                want = getattr(model, op)(name)
                call = getattr(client, op + "_session")
                got = _err(lambda c=call, n=name: c(n))
                if isinstance(want, MSession):
                    assert isinstance(got, LuoSession), where
                    open_fds.append((got, want))
                    seen[f"{op}:files={len(want.files)}"] = seen.get(f"{op}:files={len(want.files)}", 0) + 1
                else:
                    assert got == want, where
                log.append(f"{op}({name!r})={got if isinstance(got, int) else 'fd'}")
            elif not open_fds:
                continue
            elif op == "preserve":
                sess, ms = rng.choice(open_fds)
                token, idx = rng.choice(TOKENS), rng.randrange(len(memfds))
                want = model.preserve(ms, token, idx, memfds[idx][1])
                got = _err(lambda s=sess, t=token, i=idx: s.preserve(memfds[i][0], t)) or 0
                assert got == want, where
                log.append(f"preserve({ms.name!r},{token},{idx})={got}")
                seen[f"preserve={got}"] = seen.get(f"preserve={got}", 0) + 1
            elif op == "retrieve_fd":
                rich = [p for p in open_fds if p[1].incoming and p[1].files]
                sess, ms = rng.choice(rich if rich and rng.random() < 0.7 else open_fds)
                token = rng.choice(list(ms.files) if ms.files and rng.random() < 0.7 else TOKENS)
                want = model.retrieve_fd(ms, token)
                got = _err(lambda s=sess, t=token: s.retrieve(t))
                if isinstance(want, bytes):
                    assert not isinstance(got, int) or got >= 0, where
                    assert os.pread(got, len(want) + 1, 0) == want, where
                    os.close(got)
                    seen["retrieved"] = seen.get("retrieved", 0) + 1
                else:
                    assert got == want, where
                log.append(f"retrieve_fd({ms.name!r},{token})")
            elif op == "finish":
                sess, ms = rng.choice(open_fds)
                assert (_err(sess.finish) or 0) == model.finish(ms), where
            elif op == "close":
                sess, ms = open_fds.pop(rng.randrange(len(open_fds)))
                sess.close()
                _err(lambda c=client: os.read(c.fd, 1))  # the RELEASE queued by the close is served first
                model.close(ms)
                log.append(f"close({ms.name!r})")
            elif op == "name" and abi == "7.2":
                sess, ms = rng.choice(open_fds)
                got = _err(lambda s=sess: s.name)
                assert got == (errno.ENODEV if ms.dead else ms.name), where
            elif op == "kexec":
                dev.kexec()
                model.kexec()
                for sess, _ms in open_fds:  # a reboot ends their holders; revoked fds answer ENODEV till then
                    assert _err(lambda s=sess: s.finish()) == errno.ENODEV, where
                    sess.close()
                open_fds.clear()
                client.close()
                client = SessionDevice(path)
                log.append("kexec")
        # the sequence reached the interesting places (else the test proves little)
        assert seen.get("preserve=0", 0) > 5 and seen.get("retrieved", 0) > 0, str(sorted(seen.items()))
        if abi == "7.2":
            assert seen.get(f"preserve={errno.EBUSY}", 0) > 0 and seen.get(f"preserve={errno.EINVAL}", 0) > 0, seen
    finally:
        for sess, _ in open_fds:
            sess.close()
        client.close()
        for fd, _ in memfds:
            os.close(fd)
