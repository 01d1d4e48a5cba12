"""Issue 2: a bad call to the host mm API raises ONE error type carrying the
kernel's errno name, and changes nothing.

Misaligned, overlapping or unmapped ranges were already
:class:`~kvmmem.errors.KernelError` s with the errno the syscall returns; an
argument of the wrong Python type is an :class:`~kvmmem.errors.ArgumentError`:
a KernelError with ``EINVAL`` (the kernel's answer to an invalid argument:
mmap(2), munmap(2), mprotect(2), mremap(2), madvise(2) "EINVAL ... invalid
argument"; ``EBADF`` where a file descriptor is expected, as mmap(2) and
ftruncate(2) answer a bad fd) that is also an :class:`~kvmmem.errors.InputError`,
so the CLI still reports it as bad input.  ``Mm.snapshot()`` (VMAs, page
table, struct pages, page caches) is the same before and after every failing
call, as the kernel's early ``-EINVAL`` returns leave the mm untouched.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from kvmmem.errors import ArgumentError, InputError, KernelError
from kvmmem.host import PROT_READ, PROT_WRITE, Mm, RecordingNotifier
from kvmmem.sync import drive

P = 4096
RW = PROT_READ | PROT_WRITE


def _calls(mm: Mm, a: int) -> list[tuple[str, Callable[[], Any], str]]:
    """(name, a call with one wrong-typed argument, the errno it must carry)."""
    f = mm.memfd_create("m", P)
    return [
        ("mmap length str", lambda: mm.mmap("4096", RW, "anon"), "EINVAL"),
        ("mmap prot bool", lambda: mm.mmap(P, True, "anon"), "EINVAL"),
        ("mmap addr float", lambda: mm.mmap(P, RW, "anon", addr=float(a), fixed=True),
         "EINVAL"),
        ("mmap fixed int", lambda: mm.mmap(P, RW, "anon", fixed=1), "EINVAL"),
        ("mmap offset str", lambda: mm.mmap(P, RW, "memfd", file=f, offset="0"), "EINVAL"),
        ("mmap file not a File", lambda: mm.mmap(P, RW, "memfd", file=3), "EBADF"),
        ("mmap_op length None", lambda: drive(mm.mmap_op(None, RW, "anon")), "EINVAL"),
        ("munmap addr str", lambda: mm.munmap(str(a), P), "EINVAL"),
        ("munmap length float", lambda: mm.munmap(a, float(P)), "EINVAL"),
        ("munmap_op addr None", lambda: drive(mm.munmap_op(None, P)), "EINVAL"),
        ("mprotect prot str", lambda: mm.mprotect(a, P, "r"), "EINVAL"),
        ("mprotect addr bool", lambda: mm.mprotect(True, P, PROT_READ), "EINVAL"),
        ("mremap new_len str", lambda: mm.mremap(a, P, "8192"), "EINVAL"),
        ("mremap maymove int", lambda: mm.mremap(a, P, 2 * P, maymove=1), "EINVAL"),
        ("madvise advice list", lambda: mm.madvise(a, P, ["dontneed"]), "EINVAL"),
        ("madvise advice bool", lambda: mm.madvise(a, P, True), "EINVAL"),
        ("madvise length str", lambda: mm.madvise(a, "4096", "dontneed"), "EINVAL"),
        ("host_read hva float", lambda: mm.host_read(float(a), 4), "EINVAL"),
        ("host_read size str", lambda: mm.host_read(a, "4"), "EINVAL"),
        ("host_write value str", lambda: mm.host_write(a, 4, "1"), "EINVAL"),
        ("host_write value bool", lambda: mm.host_write(a, 1, True), "EINVAL"),
        ("host_write_op hva None", lambda: drive(mm.host_write_op(None, 4, 1)), "EINVAL"),
        ("ftruncate file str", lambda: mm.ftruncate("m", 0), "EBADF"),
        ("ftruncate size float", lambda: mm.ftruncate(f, 0.0), "EINVAL"),
        ("memfd_create size str", lambda: mm.memfd_create("n", "4096"), "EINVAL"),
        ("get_user_pages hva str", lambda: mm.get_user_pages(str(a), False), "EINVAL"),
        ("get_user_pages write int", lambda: mm.get_user_pages(a, 0), "EINVAL"),
        ("get_user_page_fast_only write None",
         lambda: mm.get_user_page_fast_only(a, None), "EINVAL"),
        ("follow_pfnmap hva float", lambda: mm.follow_pfnmap(float(a)), "EINVAL"),
        ("fixup_user_fault write int", lambda: mm.fixup_user_fault(a, 1), "EINVAL"),
        ("clear_young start str", lambda: mm.clear_young(str(a), a + P), "EINVAL"),
        ("test_young end float", lambda: mm.test_young(a, float(a + P)), "EINVAL"),
    ]


def test_wrong_types_raise_one_error_with_einval_and_change_nothing(
        mm: Mm, rec: RecordingNotifier) -> None:
    """Every wrong-typed argument: an ArgumentError that is a KernelError (errno
    name and number, the call and argument named in the message) and an
    InputError; the mm is exactly as before and no MMU notifier fired."""
    a = mm.mmap(4 * P, RW, "anon", fill=0x5A)
    mm.mprotect(a + 2 * P, P, PROT_READ)
    calls = _calls(mm, a)
    before = mm.snapshot()
    events = len(rec.log)
    for name, call, errno in calls:
        with pytest.raises(ArgumentError) as exc:
            call()
        err = exc.value
        assert isinstance(err, KernelError) and isinstance(err, InputError), name
        assert err.errno == errno, name
        assert err.errno_value == {"EINVAL": 22, "EBADF": 9}[errno], name
        assert str(err).startswith(err.call + f": {errno} (expected "), (name, str(err))
        assert mm.snapshot() == before, name
        assert len(rec.log) == events, name
    assert mm.host_read(a, 4) == 0x5A5A5A5A


def test_one_except_clause_catches_every_bad_call(mm: Mm) -> None:
    """Misaligned (munmap(2): EINVAL), overlapping a VMA with MAP_FIXED_NOREPLACE
    (EEXIST), mprotect over a hole (ENOMEM), and a wrong type (EINVAL): one
    ``except KernelError`` sees them all, each with its errno name."""
    a = mm.mmap(2 * P, RW, "anon")
    before = mm.snapshot()
    seen = []
    for call in (lambda: mm.munmap(a + 1, P),
                 lambda: mm.mmap(P, RW, "anon", addr=a, fixed=True, noreplace=True),
                 lambda: mm.mprotect(a + 4 * P, P, PROT_READ),
                 lambda: mm.munmap("a", P)):
        try:
            call()
        except KernelError as err:
            seen.append(err.errno)
        assert mm.snapshot() == before
    assert seen == ["EINVAL", "EEXIST", "ENOMEM", "EINVAL"]


def test_value_misuse_stays_input_error(mm: Mm) -> None:
    """What is not a syscall argument of the wrong type but a misuse of the
    model's own API stays a plain InputError (no errno): an unknown mapping
    kind, a fill byte out of range, an access of size 0, a value wider than the
    access."""
    a = mm.mmap(P, RW, "anon")
    before = mm.snapshot()
    for call in (lambda: mm.mmap(P, RW, "ram"),
                 lambda: mm.mmap(P, RW, "anon", fill=256),
                 lambda: mm.host_read(a, 0),
                 lambda: mm.host_write(a, 1, 256)):
        with pytest.raises(InputError) as exc:
            call()
        assert not isinstance(exc.value, KernelError)
    assert mm.snapshot() == before


def test_cli_reports_an_argument_error_as_bad_input() -> None:
    """The console entry point turns an ArgumentError escaping a command into one
    ``kvmmem: error:`` line and exit status 2 (bad input)."""
    code = ("import sys\n"
            "from kvmmem import cli\n"
            "from kvmmem.host import Mm\n"
            "def boom() -> None:\n"
            "    Mm().munmap('0x1000', 4096)\n"
            "cli.app = boom\n"
            "cli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("kvmmem: error: munmap: addr: EINVAL (expected an int, "
                           "got str '0x1000')\n")
