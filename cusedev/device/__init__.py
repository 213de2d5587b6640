"""The device layer: open files (each of a kind, with its ioctl table), table-driven dispatch,
caller memory, fd passing (pidfd_getfd in, seccomp ADDFD out), the interceptor chain and the
memfd handler.

It knows no ABI: a ``cusedev.profiles.base.Profile`` supplies the tables, the model and the
commands; the transports below it know nothing of either.
"""
