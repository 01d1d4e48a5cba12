"""The three kinds of error kvmmem raises.

* :class:`KernelError` - a modelled kernel call failed the way the kernel
  fails it.  It carries the errno *name* (``"EINVAL"``, ``"EEXIST"``, ...)
  exactly as the kernel would return it, and the call changed nothing.
* :class:`InputError` - the user handed kvmmem something it cannot use (a
  bad scenario file, CLI argument or API argument of the wrong type).  The
  message names what is wrong and where.  A wrong-typed argument to the host
  mm API is an :class:`ArgumentError`: both a KernelError (EINVAL) and an
  InputError.
* :class:`ValidationError` - an invariant of DESIGN.md does not hold.  Raised
  only by ``validate_*`` functions, never by the fast paths.
"""

from __future__ import annotations

import errno as _errno

_LINUX_ONLY = {"EHWPOISON": 133}
"""Linux errnos Python's errno module lacks (include/uapi/asm-generic/errno.h)."""


class KvmmemError(Exception):
    """Base of every error kvmmem raises on purpose."""


class KernelError(KvmmemError):
    """A modelled kernel operation failed with ``errno`` (its name).

    The operation left the model unchanged.  ``str()`` reads like
    ``munmap(0x7f0000001000, 0x1000): EINVAL (address not page aligned)``.
    """

    def __init__(self, errno: str, call: str, reason: str = "") -> None:
        if not hasattr(_errno, errno) and errno not in _LINUX_ONLY:
            raise ValueError(f"unknown errno name {errno!r}")
        self.errno = errno
        self.call = call
        self.reason = reason
        text = f"{call}: {errno}"
        if reason:
            text += f" ({reason})"
        super().__init__(text)

    @property
    def errno_value(self) -> int:
        """The numeric errno on Linux (``EINVAL`` -> 22)."""
        value: int = getattr(_errno, self.errno, 0) or _LINUX_ONLY[self.errno]
        return value


class InputError(KvmmemError):
    """Bad input from a user: file, CLI argument or API argument."""


class ArgumentError(KernelError, InputError):
    """A host mm API call given an argument of the wrong Python type (a ``str``
    address, a ``bool`` length, a float hva, an object that is not a
    :class:`~kvmmem.host.file.File` where a file is expected).

    The kernel sees such a call as an invalid argument, so this *is* a
    :class:`KernelError`: ``errno`` is ``"EINVAL"`` (``"EBADF"`` for a file
    argument that is not a file, as mmap(2) and ftruncate(2) answer a bad fd),
    and the call changed nothing.  It is also an :class:`InputError`, so
    the CLI reports it as bad input (exit status 2).  Catching either base
    catches it: code that handles every kernel failure by its errno and code
    that handles every misuse of kvmmem see the same, one error.
    """

    def __init__(self, call: str, reason: str, errno: str = "EINVAL") -> None:
        super().__init__(errno, call, reason)


class ValidationError(KvmmemError):
    """An invariant failed; ``invariant`` names it, ``detail`` says how."""

    def __init__(self, invariant: str, detail: str) -> None:
        self.invariant = invariant
        self.detail = detail
        super().__init__(f"{invariant}: {detail}")
