"""The cached out-of-line FFI (uapi._parse) must describe exactly what a fresh cffi parse does."""

from __future__ import annotations

import re

import cffi

from cusedev import uapi


def test_cached_ffi_matches_a_fresh_parse() -> None:
    text = "".join(uapi.read_cdef(n) for n in uapi.CDEF_FILES)
    fresh = cffi.FFI()
    fresh.cdef(text)
    structs = sorted(set(re.findall(r"^struct (\w+) \{", text, re.M)))
    assert len(structs) > 30
    for name in structs:
        ours, theirs = uapi.ffi.typeof(f"struct {name}"), fresh.typeof(f"struct {name}")
        assert uapi.ffi.sizeof(ours) == fresh.sizeof(theirs), name
        assert [(f, t.offset) for f, t in ours.fields] == [(f, t.offset) for f, t in theirs.fields], name
    lib = fresh.dlopen(None)
    fresh_consts = {n: getattr(lib, n) for n in dir(lib) if isinstance(getattr(lib, n), int)}
    assert fresh_consts == dict(uapi.CONSTANTS)
