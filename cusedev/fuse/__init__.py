"""The FUSE wire engine: one ``Connection`` per /dev/fuse or /dev/cuse fd, and mount helpers.

Knows the FUSE protocol and nothing of LUO: the transports and the sysfs tree
are built on it.
"""
