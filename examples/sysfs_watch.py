#!/usr/bin/env python3
"""Print every change of a sysfs attribute with a timestamp, the way kernel sysfs readers wait.

    sysfs_watch.py [PATH] [-n COUNT]
    PATH defaults to /sys/kernel/liveupdate/state (works on a real kernel and on
    the emulator's tree, e.g. /run/cusedev/dev_liveupdate/sys/kernel/liveupdate/state).

The loop: read the value, poll() for POLLPRI|POLLERR (sysfs_notify), lseek to
0 and read again.  The first line is the value at start; each later line is
one wake-up (changes that land before the re-read coalesce: it prints the
latest).  Exits 0 after COUNT lines, 1 if the attribute goes away.
"""

from __future__ import annotations

import argparse
import datetime
import os
import select
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", default="/sys/kernel/liveupdate/state")
    ap.add_argument("-n", "--count", type=int, default=0, help="exit after COUNT lines (default: never)")
    args = ap.parse_args()

    fd = os.open(args.path, os.O_RDONLY | os.O_CLOEXEC)
    poller = select.poll()
    poller.register(fd, select.POLLPRI | select.POLLERR)
    printed = 0
    while True:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            value = os.read(fd, 4096).decode(errors="replace").rstrip("\n")
        except OSError as e:  # the attribute (or the emulator) went away
            print(f"sysfs_watch: {args.path}: {e.strerror}", file=sys.stderr, flush=True)
            return 1
        now = datetime.datetime.now().isoformat(timespec="microseconds")
        print(f"{now} {value}", flush=True)
        printed += 1
        if args.count and printed >= args.count:
            return 0
        poller.poll()  # POLLIN is always set on sysfs: only PRI/ERR say "changed"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(0)
