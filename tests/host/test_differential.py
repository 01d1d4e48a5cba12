"""Differential test: kvmmem.host against the real Linux mm of this very process (issue 2).

Hypothesis generates sequences of ``mmap`` (MAP_FIXED or MAP_FIXED_NOREPLACE; private
anonymous, shared memfd, private and shared regular-file mappings, including a file opened
O_RDONLY), ``munmap``, ``mprotect``, ``madvise`` (DONTNEED, REMOVE, HUGEPAGE, NOHUGEPAGE),
``mremap`` (shrink, grow in place, MREMAP_MAYMOVE|MREMAP_FIXED moves, MREMAP_FIXED alone),
1/2/4/8-byte loads and stores, and whole-window content checks, all at fixed addresses inside
a scratch window (tests/host/realmm.py).  Every operation runs for real (ctypes on libc) and
on :class:`kvmmem.host.Mm`, which starts from the same state.  After every operation:

* the outcomes agree: success (and the address returned) or the same errno name; a load's
  value or its fault; a store's fault (a fault is EFAULT of the pipe copy on the real side,
  HostSignal SIGSEGV or SIGBUS on the model side: EFAULT cannot tell the two apart);
* per page of the window, what ``/proc/self/smaps`` shows (``show_map_vma`` and
  ``show_smap_vma_flags`` in fs/proc/task_mmu.c): the permission column, the VMA kind
  (pathname + shared bit), the backing file and file page (``linear_page_index``), the
  ``VmFlags`` mnemonics, and where the VMAs begin and end (``vma_merge`` / ``split_vma``);
* at every ``Check`` operation and at the end of the sequence: the 4 KiB content of every
  page (or its fault), read through the mapping; the model reads with ``host_read`` too, so
  both sides fault exactly the same pages in.

A disagreement fails with the numbered, shrunk operation sequence, both sides' outcomes and
the differing pages.

Deliberately left out, because the real outcome depends on state the model cannot know:
hugetlb (this host's pool is empty and the test must not change it); transparent huge pages
(the window is smaller than 2 MiB, so MADV_HUGEPAGE only changes VmFlags); PROT_EXEC-only
mappings on CPUs with protection keys (``execute_only_pkey`` makes them unreadable there);
MREMAP_MAYMOVE growth without MREMAP_FIXED and non-fixed mmaps (the kernel would choose an
address outside the window); the ``sd`` (soft-dirty, CONFIG_MEM_SOFT_DIRTY) and ``mg`` (KSM)
VmFlags, which depend on the kernel configuration and on prctl state of the process;
memory-pressure effects (reclaim, writeback), which change no content a user can read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import realmm
from .realmm import (
    PAGE_SIZE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    PageView,
    RealError,
    RealMm,
)

REASON = realmm.unsupported_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

try:  # the model is being written in parallel; the real-side tests run without it
    from kvmmem.errors import KernelError
    from kvmmem.host import File, HostSignal, Mm, Vma, VmaKind

    MODEL_MISSING: str | None = None
except ImportError as exc:  # pragma: no cover - only until kvmmem.host.Mm lands
    MODEL_MISSING = f"kvmmem.host model not importable yet: {exc}"

P = PAGE_SIZE
NPAGES = 32
"""Scratch window size in pages; pages 0 and NPAGES-1 are guards no operation targets."""
INNER_END = NPAGES - 1
"""Operations create, destroy and change mappings only in pages [1, INNER_END)."""


class FileSpec(NamedTuple):
    """A file created identically on both sides for every sequence."""

    label: str
    pages: int
    fill: int | None = None
    writable: bool = True
    memfd: bool = False


FILES = (
    FileSpec("mfd", 16, memfd=True),
    FileSpec("data", 16, fill=0x5A),
    FileSpec("sparse", 6),
    FileSpec("ro", 12, fill=0xA5, writable=False),
)
SPEC = {f.label: f for f in FILES}
FILE_FOR_KIND = {"memfd": ("mfd",), "file": ("data", "sparse", "ro"),
                 "file-shared": ("data", "sparse", "ro")}

IGNORED_VMFLAGS = frozenset({"sd", "mg"})
"""VmFlags that depend on the kernel configuration / process state, not on the calls."""


def _has_pku() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return any(line.startswith("flags") and " pku" in line for line in f)
    except OSError:
        return False


PROTS: tuple[int, ...] = (
    PROT_READ | PROT_WRITE, PROT_READ, PROT_NONE, PROT_READ | PROT_WRITE, PROT_WRITE,
    PROT_READ | PROT_EXEC, PROT_READ | PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC,
) + (() if REASON is not None or _has_pku() else (PROT_EXEC,))
"""Protections drawn (read-write twice as often: loads and stores then hit)."""


def prot_str(prot: int) -> str:
    """``"rw-"`` for PROT_READ|PROT_WRITE."""
    return "".join(c if prot & b else "-" for c, b in zip("rwx", (1, 2, 4), strict=True))


# --- the pair of address spaces --------------------------------------------------------


class Pair:
    """The real scratch window and a model Mm holding the same mapping and files."""

    def __init__(self, real: RealMm) -> None:
        self.real = real
        self.base = real.base
        self.mm = Mm()
        self.mm.mmap(NPAGES * P, PROT_NONE, "anon", addr=self.base, fixed=True)
        self.mfiles: dict[str, File] = {}
        self.label_of: dict[int, str] = {}
        for spec in FILES:
            size = spec.pages * P
            if spec.memfd:
                real.memfd(spec.label, size)
                mf = self.mm.memfd_create(spec.label, size)
            else:
                real.regular_file(spec.label, size, fill=spec.fill, writable=spec.writable)
                mf = self.mm.open_file(spec.label, size, writable=spec.writable, fill=spec.fill)
            self.mfiles[spec.label] = mf
            self.label_of[id(mf)] = spec.label
        self.hot: list[tuple[int, int]] = []
        """(first page, npages) of every mapping an mmap / mremap created, latest last."""

    def addr(self, page: int, misalign: int = 0) -> int:
        return self.base + page * P + misalign

    def where(self, addr: int) -> str:
        """``p5`` (or ``p5+0x10``) for an address in the window."""
        off = addr - self.base
        return f"p{off // P}" + (f"+{off % P:#x}" if off % P else "")

    # --- outcomes ----------------------------------------------------------------

    def real_call(self, fn: Callable[[], object]) -> str:
        try:
            res = fn()
        except RealError as e:
            return e.errno
        return self._ok(res)

    def model_call(self, fn: Callable[[], object]) -> str:
        try:
            res = fn()
        except KernelError as e:
            return e.errno
        except HostSignal as e:
            return f"fault {e.signal}"
        return self._ok(res)

    def _ok(self, res: object) -> str:
        if isinstance(res, int) and not isinstance(res, bool):
            return f"ok @{self.where(res)}"
        return "ok"

    # --- state ---------------------------------------------------------------------

    def model_pages(self) -> list[PageView | None]:
        out: list[PageView | None] = []
        for i in range(NPAGES):
            hva = self.addr(i)
            vma = self.mm.vma_lookup(hva)
            out.append(None if vma is None else self._model_view(vma, hva))
        return out

    def _model_view(self, vma: Vma, hva: int) -> PageView:
        kind = {VmaKind.ANON: "anon", VmaKind.THP: "anon", VmaKind.MEMFD: "memfd",
                VmaKind.FILE: "file", VmaKind.FILE_SHARED: "file-shared"}.get(
                    vma.kind, str(vma.kind.value))
        label = fpage = None
        if kind != "anon":
            label = None if vma.file is None else self.label_of.get(id(vma.file), "?")
            fpage = vma.pgoff_of(hva)
        flags = tuple(n for n in vma.vm_flags_names() if n not in IGNORED_VMFLAGS)
        return PageView(vma.maps_perms(), kind, label, fpage, flags)

    def real_pages(self, entries: list[realmm.MapsEntry]) -> list[PageView | None]:
        out = self.real.pages(entries)
        return [
            None if v is None else replace(
                v, vmflags=tuple(n for n in v.vmflags if n not in IGNORED_VMFLAGS))
            for v in out
        ]

    def model_bounds(self) -> list[tuple[int, int]]:
        lo, hi = self.base, self.base + NPAGES * P
        return [
            ((max(v.start, lo) - lo) // P, (min(v.end, hi) - lo) // P)
            for v in self.mm.for_each_vma()
            if v.end > lo and v.start < hi
        ]

    def model_read_page(self, hva: int) -> bytes | None:
        """The page at ``hva`` as the model's user load sees it (faulting it in)."""
        try:
            self.mm.host_read(hva, 1)
        except HostSignal:
            return None
        pte = self.mm.host_pte(hva)
        if pte is None:
            raise AssertionError(f"model: host_read({self.where(hva)}) worked but left no PTE")
        return bytes(self.mm.physmem.read(pte.pfn, 0, P))  # pfn: the 4K frame behind hva

    def compare_state(self, vmas: bool = True) -> list[str]:
        """Disagreements in the per-page smaps view and the VMA boundaries (only if
        ``vmas``: a user load or store changes no VMA) and in what backs each page."""
        diffs: list[str] = []
        entries = self.real.maps() if vmas else []
        real = self.real_pages(entries) if vmas else []
        model = self.model_pages() if vmas else []
        for i, (r, m) in enumerate(zip(real, model, strict=True)):
            if r != m:
                diffs.append(f"page p{i}: real {_view(r)}\n{'':>14}model {_view(m)}")
        if vmas and not diffs:
            rb, mb = self.real.vma_bounds(entries), self.model_bounds()
            if rb != mb:
                diffs.append(f"VMA boundaries (pages): real {rb}\n{'':>14}model {mb}")
        if not diffs:
            rs, ms = self.real.page_states(), self.model_page_states()
            for i, (r1, m1) in enumerate(zip(rs, ms, strict=True)):
                if _anon_or_zero(r1) != _anon_or_zero(m1):
                    diffs.append(f"page p{i} is backed by: real {r1}, model {m1}")
        return diffs

    def model_page_states(self) -> list[str]:
        """Per page: ``anon`` / ``zero`` / ``file`` / ``-`` as :meth:`RealMm.page_states`."""
        pm = self.mm.physmem
        out: list[str] = []
        for i in range(NPAGES):
            hva = self.addr(i)
            pte = self.mm.host_pte(hva)
            if pte is None:
                out.append("-")
                continue
            pfn = pte.pfn
            out.append("zero" if pfn == pm.zero_pfn else "anon" if pm.is_anon(pfn) else "file")
        return out

    def compare_content(self) -> list[str]:
        """Disagreements in the content (or fault) of every page of the window."""
        diffs: list[str] = []
        for i in range(NPAGES):
            hva = self.addr(i)
            r = self.real.read_page(hva)
            m = self.model_read_page(hva)
            if r != m:
                diffs.append(f"content of p{i}: real {_content(r)}, model {_content(m)}"
                             + _first_diff(r, m))
        return diffs


def _anon_or_zero(state: str) -> str:
    """Page-cache presence depends on fault-around and the page cache: not compared."""
    return state if state in ("anon", "zero") else "-"


def _view(v: PageView | None) -> str:
    if v is None:
        return "unmapped"
    f = "" if v.file is None else f" {v.file}[{v.file_page}]"
    return f"{v.perms} {v.kind}{f} [{' '.join(v.vmflags)}]"


def _content(b: bytes | None) -> str:
    if b is None:
        return "fault"
    uniq = sorted(set(b))
    return f"all {uniq[0]:#04x}" if len(uniq) == 1 else f"{len(uniq)} distinct bytes"


def _first_diff(r: bytes | None, m: bytes | None) -> str:
    if r is None or m is None:
        return ""
    i = next(i for i in range(P) if r[i] != m[i])
    return f" (first at +{i:#x}: real {r[i]:#04x} model {m[i]:#04x})"


# --- operations -------------------------------------------------------------------------


@dataclass(frozen=True)
class Mmap:
    """mmap(p<page>+misalign, length, prot, MAP_FIXED[_NOREPLACE] | kind, file, offset)."""

    page: int
    length: int
    prot: int
    kind: str
    file: str | None = None
    offset: int = 0
    noreplace: bool = False
    fill: int | None = None
    misalign: int = 0

    def __str__(self) -> str:
        f = f", {self.file}@{self.offset:#x}" if self.file else ""
        fl = "" if self.fill is None else f", fill={self.fill:#04x}"
        how = "NOREPLACE" if self.noreplace else "FIXED"
        return (f"mmap(p{self.page}{_mis(self.misalign)}, {self.length:#x}, "
                f"{prot_str(self.prot)}, {self.kind}{f}, {how}{fl})")

    def real(self, p: Pair) -> str:
        addr = p.addr(self.page, self.misalign)
        rf = None if self.file is None else p.real.files[self.file]

        def call() -> int:
            got = p.real.mmap(addr, self.length, self.prot, self.kind, file=rf,
                              offset=self.offset, noreplace=self.noreplace)
            if self.fill is not None:
                p.real.fill(got, self.length, self.fill)
            return got

        return p.real_call(call)

    def model(self, p: Pair) -> str:
        mf = None if self.file is None else p.mfiles[self.file]
        return p.model_call(lambda: p.mm.mmap(
            self.length, self.prot, self.kind, addr=p.addr(self.page, self.misalign),
            fixed=not self.noreplace, noreplace=self.noreplace, file=mf, offset=self.offset,
            fill=self.fill))


def _hot_range(p: Pair, op: Munmap | Mprotect | Madvise) -> Munmap | Mprotect | Madvise:
    """With ``op.hot`` set: the range moved into the latest mapping an mmap / mremap
    created (start ``page % npages`` into it; the length clipped to its end unless 0)."""
    if op.hot is None or not p.hot:
        return replace(op, hot=None)
    first, n = p.hot[-1]
    start = first + op.hot % n
    length = op.length if op.length == 0 else min(op.length, (first + n - start) * P)
    return replace(op, page=start, length=length, hot=None)


@dataclass(frozen=True)
class Munmap:
    """munmap; ``hot``: see :func:`_hot_range`."""

    page: int
    length: int
    misalign: int = 0
    hot: int | None = None

    def __str__(self) -> str:
        return f"munmap(p{self.page}{_mis(self.misalign)}, {self.length:#x})"

    def real(self, p: Pair) -> str:
        return p.real_call(lambda: p.real.munmap(p.addr(self.page, self.misalign), self.length))

    def model(self, p: Pair) -> str:
        return p.model_call(lambda: p.mm.munmap(p.addr(self.page, self.misalign), self.length))


@dataclass(frozen=True)
class Mprotect:
    """mprotect; ``hot``: see :func:`_hot_range`."""

    page: int
    length: int
    prot: int
    misalign: int = 0
    hot: int | None = None

    def __str__(self) -> str:
        return (f"mprotect(p{self.page}{_mis(self.misalign)}, {self.length:#x}, "
                f"{prot_str(self.prot)})")

    def real(self, p: Pair) -> str:
        a = p.addr(self.page, self.misalign)
        return p.real_call(lambda: p.real.mprotect(a, self.length, self.prot))

    def model(self, p: Pair) -> str:
        a = p.addr(self.page, self.misalign)
        return p.model_call(lambda: p.mm.mprotect(a, self.length, self.prot))


@dataclass(frozen=True)
class Madvise:
    """madvise; ``hot``: see :func:`_hot_range`."""

    page: int
    length: int
    advice: str
    misalign: int = 0
    hot: int | None = None

    def __str__(self) -> str:
        return f"madvise(p{self.page}{_mis(self.misalign)}, {self.length:#x}, {self.advice})"

    def real(self, p: Pair) -> str:
        a = p.addr(self.page, self.misalign)
        return p.real_call(lambda: p.real.madvise(a, self.length, self.advice))

    def model(self, p: Pair) -> str:
        a = p.addr(self.page, self.misalign)
        return p.model_call(lambda: p.mm.madvise(a, self.length, self.advice))


@dataclass(frozen=True)
class Mremap:
    """mode: ``inplace`` (flags 0), ``maymove`` (MREMAP_MAYMOVE, never growing),
    ``fixed`` (MREMAP_MAYMOVE|MREMAP_FIXED to p<target>), ``fixed-only`` (MREMAP_FIXED
    without MREMAP_MAYMOVE: EINVAL)."""

    page: int
    old_length: int
    new_length: int
    mode: str = "inplace"
    target: int | None = None
    misalign: int = 0
    hot: bool = False

    def resolve(self, p: Pair) -> Mremap:
        """With ``hot``: the whole latest mapping an mmap / mremap created is the source
        (new length clipped so that it cannot leave the window or grow with MAYMOVE)."""
        if not self.hot or not p.hot:
            return replace(self, hot=False)
        first, n = p.hot[-1]
        new = self.new_length
        if self.mode == "inplace":
            new = min(new, (NPAGES - first - (1 if self.misalign else 0)) * P)
        elif self.mode == "maymove":
            new = min(new, n * P)
        old = 0 if self.old_length == 0 else n * P
        return Mremap(first, old, new, self.mode, self.target, self.misalign)

    def __str__(self) -> str:
        t = "" if self.target is None else f", to p{self.target}"
        return (f"mremap(p{self.page}{_mis(self.misalign)}, {self.old_length:#x}, "
                f"{self.new_length:#x}, {self.mode}{t})")

    def _target(self, p: Pair) -> int | None:
        return None if self.target is None else p.addr(self.target)

    def real(self, p: Pair) -> str:
        a, t = p.addr(self.page, self.misalign), self._target(p)
        return p.real_call(lambda: p.real.mremap(
            a, self.old_length, self.new_length, maymove=self.mode in ("maymove", "fixed"),
            fixed_addr=t, force_fixed_flag=self.mode == "fixed-only"))

    def model(self, p: Pair) -> str:
        a, t = p.addr(self.page, self.misalign), self._target(p)
        return p.model_call(lambda: p.mm.mremap(
            a, self.old_length, self.new_length, maymove=self.mode in ("maymove", "fixed"),
            fixed_addr=t))


def _hot_page(p: Pair, page: int, hot: int | None) -> int:
    if hot is None or not p.hot:
        return page
    first, n = p.hot[-1]
    return first + hot % n


@dataclass(frozen=True)
class Load:
    """A user load; with ``hot`` set, of page ``hot % npages`` of the latest mapping
    an mmap or mremap created (``page`` when there is none)."""

    page: int
    offset: int
    size: int
    hot: int | None = None

    def resolve(self, p: Pair) -> Load:
        return Load(_hot_page(p, self.page, self.hot), self.offset, self.size)

    def __str__(self) -> str:
        return f"load{self.size * 8}(p{self.page}+{self.offset:#x})"

    def real(self, p: Pair) -> str:
        v = p.real.load(p.addr(self.page, self.offset), self.size)
        return "fault" if v is None else f"= {v:#x}"

    def model(self, p: Pair) -> str:
        def call() -> str:
            return f"= {p.mm.host_read(p.addr(self.page, self.offset), self.size):#x}"

        try:
            return call()
        except HostSignal as e:
            return f"fault {e.signal}"


@dataclass(frozen=True)
class Store:
    """A user store; ``hot`` as for :class:`Load`."""

    page: int
    offset: int
    size: int
    value: int
    hot: int | None = None

    def resolve(self, p: Pair) -> Store:
        return Store(_hot_page(p, self.page, self.hot), self.offset, self.size, self.value)

    def __str__(self) -> str:
        return f"store{self.size * 8}(p{self.page}+{self.offset:#x}, {self.value:#x})"

    def real(self, p: Pair) -> str:
        return "ok" if p.real.store(p.addr(self.page, self.offset), self.size, self.value) \
            else "fault"

    def model(self, p: Pair) -> str:
        try:
            p.mm.host_write(p.addr(self.page, self.offset), self.size, self.value)
        except HostSignal as e:
            return f"fault {e.signal}"
        return "ok"


@dataclass(frozen=True)
class Check:
    """Compare the content of every page of the window (faulting readable pages in)."""

    def __str__(self) -> str:
        return "check-content"

    def real(self, p: Pair) -> str:
        return "ok"

    def model(self, p: Pair) -> str:
        return "ok"


Op = Mmap | Munmap | Mprotect | Madvise | Mremap | Load | Store | Check


def _mis(misalign: int) -> str:
    return f"+{misalign:#x}" if misalign else ""


def _same(real: str, model: str) -> bool:
    """Outcomes agree; the real "fault" (EFAULT) stands for the model's SIGSEGV or SIGBUS."""
    if real == "fault":
        return model in ("fault SIGSEGV", "fault SIGBUS")
    return real == model


# --- strategies ---------------------------------------------------------------------------

_MISALIGN = st.sampled_from((0,) * 30 + (0x10, 0x800))
_HOT = st.sampled_from((None, 0, 1, 2, 3))
_SLACK = st.sampled_from((0,) * 10 + (1, P // 2, P - 1))


@st.composite
def _range(draw: st.DrawFn, lo: int = 1, hi: int = INNER_END) -> tuple[int, int]:
    """(first page, npages) inside [lo, hi); mostly short."""
    page = draw(st.integers(lo, hi - 1))
    most = hi - page
    n = draw(st.integers(1, min(most, 6)) | st.integers(1, most))
    return page, n


@st.composite
def _length(draw: st.DrawFn, npages: int) -> int:
    """npages*4K, now and then a little less (rounded up by the kernel) or 0."""
    if draw(st.integers(0, 24)) == 24:
        return 0
    return npages * P - draw(_SLACK)


@st.composite
def mmaps(draw: st.DrawFn) -> Mmap:
    page, n = draw(_range())
    length = draw(_length(n))
    kind = draw(st.sampled_from(realmm.KINDS))
    prot = draw(st.sampled_from(PROTS))
    file = None
    offset = 0
    if kind != "anon":
        file = draw(st.sampled_from(FILE_FOR_KIND[kind]))
        offset = draw(st.integers(0, SPEC[file].pages + 1)) * P
        offset += draw(st.sampled_from((0,) * 15 + (0x800,)))
    noreplace = draw(st.integers(0, 4)) == 4
    misalign = draw(_MISALIGN)
    fill = draw(st.none() | st.integers(1, 255))
    # userspace memset right after mmap: only where it cannot fault (model's mmap(fill=))
    if fill is not None and not (
        prot & PROT_WRITE and length > 0 and length % P == 0 and misalign == 0
        and offset % P == 0
        and (file is None or offset // P + n <= SPEC[file].pages)
    ):
        fill = None
    return Mmap(page, length, prot, kind, file, offset, noreplace, fill, misalign)


@st.composite
def munmaps(draw: st.DrawFn) -> Munmap:
    page, n = draw(_range())
    return Munmap(page, draw(_length(n)), draw(_MISALIGN), draw(_HOT))


@st.composite
def mprotects(draw: st.DrawFn) -> Mprotect:
    page, n = draw(_range())
    prot = draw(st.sampled_from(PROTS))
    return Mprotect(page, draw(_length(n)), prot, draw(_MISALIGN), draw(_HOT))


@st.composite
def madvises(draw: st.DrawFn) -> Madvise:
    page, n = draw(_range())
    advice = draw(st.sampled_from(("dontneed", "remove", "hugepage", "nohugepage")))
    return Madvise(page, draw(_length(n)), advice, draw(_MISALIGN), draw(_HOT))


@st.composite
def mremaps(draw: st.DrawFn) -> Mremap:
    page, old_n = draw(_range())
    old_len = old_n * P - draw(_SLACK)
    mode = draw(st.sampled_from(("inplace", "fixed", "maymove", "fixed", "inplace",
                                 "fixed-only")))
    if mode != "maymove" and draw(st.integers(0, 24)) == 24:
        old_len = 0  # duplicate a shared mapping (EINVAL for a private one)
    target = None
    misalign = draw(_MISALIGN)
    if mode == "inplace":
        # may reach the guard page at the end of the window (then ENOMEM), never beyond
        new_n = draw(st.integers(1, NPAGES - page - (1 if misalign else 0)))
    elif mode == "maymove":
        new_n = draw(st.integers(1, old_n))
    else:
        target, new_n = draw(_range())
    new_len = 0 if draw(st.integers(0, 24)) == 24 else new_n * P - draw(_SLACK)
    hot = draw(st.integers(0, 2)) != 0
    return Mremap(page, old_len, new_len, mode, target, misalign, hot)


@st.composite
def _access(draw: st.DrawFn) -> tuple[int, int, int, int | None]:
    page = draw(st.integers(0, NPAGES - 1))
    size = draw(st.sampled_from((8, 4, 2, 1)))
    base = draw(st.sampled_from((0, 8, 0x800, P - 8)))
    hot = draw(st.sampled_from((0, 1, 2, 3, 4, 5, None)))
    return page, base + draw(st.integers(0, 8 // size - 1)) * size, size, hot


@st.composite
def loads(draw: st.DrawFn) -> Load:
    page, offset, size, hot = draw(_access())
    return Load(page, offset, size, hot)


@st.composite
def stores(draw: st.DrawFn) -> Store:
    page, offset, size, hot = draw(_access())
    return Store(page, offset, size, draw(st.integers(0, (1 << (8 * size)) - 1)), hot)


OPS: st.SearchStrategy[Op] = st.one_of(
    mmaps(), mmaps(), mmaps(), munmaps(), mprotects(), mprotects(), madvises(),
    mremaps(), mremaps(), loads(), loads(), stores(), stores(), stores(), st.just(Check()),
)
# Four lists joined: about 20 operations on average (one st.lists averages about 6), and
# each part still shrinks to nothing.
SEQUENCES = st.tuples(*[st.lists(OPS, max_size=12)] * 4).map(
    lambda parts: [op for part in parts for op in part]).filter(bool)


# --- the differential run -------------------------------------------------------------------


def run_differential(ops: list[Op]) -> None:
    """Run ``ops`` on both sides; raise AssertionError with the trace on any disagreement."""
    with RealMm(NPAGES) as real:
        pair = Pair(real)
        trace: list[str] = []

        def fail(step: str, diffs: list[str]) -> None:
            lines = [
                f"kvmmem.host disagrees with the real kernel ({os.uname().release}) {step}",
                f"window p0..p{NPAGES - 1} at {pair.base:#x} (p0 and p{NPAGES - 1} are guards):",
                *trace,
                *(f"  DIFF  {d}" for d in diffs[:8]),
            ]
            if len(diffs) > 8:
                lines.append(f"  ... and {len(diffs) - 8} more")
            raise AssertionError("\n".join(lines))

        try:
            for n, op in enumerate([*ops, Check()], start=1):
                if isinstance(op, Load | Store | Mremap):
                    op = op.resolve(pair)
                elif isinstance(op, Munmap | Mprotect | Madvise):
                    op = _hot_range(pair, op)
                r = op.real(pair)
                m = op.model(pair)
                if r.startswith("ok @") and _same(r, m) and isinstance(op, Mmap | Mremap):
                    npages = -(-(op.length if isinstance(op, Mmap) else op.new_length) // P)
                    pair.hot.append((int(r[5:].split("+")[0]), npages))
                final = " (final)" if n > len(ops) else ""
                trace.append(f"  #{n:<3} {op!s:<58} real: {r:<12} model: {m}{final}")
                if not _same(r, m):
                    fail(f"at op #{n}: outcome", [f"outcome: real {r}, model {m}"])
                diffs = pair.compare_state(vmas=not isinstance(op, Load | Store))
                if diffs:
                    fail(f"after op #{n}: smaps view", diffs)
                if isinstance(op, Check):
                    diffs = pair.compare_content()
                    if diffs:
                        fail(f"at op #{n}: content", diffs)
        finally:
            pair.mm.close()


@pytest.mark.skipif(MODEL_MISSING is not None, reason=MODEL_MISSING or "")
@settings(max_examples=250, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(SEQUENCES)
def test_differential_host_model_vs_real_mm(ops: list[Op]) -> None:
    """mm/mmap.c, mm/mprotect.c, mm/madvise.c, mm/mremap.c and the fault path as the real
    kernel runs them in this process, against kvmmem.host.Mm: outcomes, the smaps view of
    every page, VMA boundaries and content must agree after every operation."""
    run_differential(ops)


# --- the real side alone: sanity of the harness ------------------------------------------------


def test_realmm_mprotect_write_shared_readonly_file_is_eacces() -> None:
    """mprotect_fixup(): a MAP_SHARED mapping of an O_RDONLY file has no VM_MAYWRITE, so
    mprotect(PROT_WRITE) fails with EACCES; do_mmap() refuses PROT_WRITE there at once."""
    with RealMm(8) as r:
        ro = r.regular_file("ro", 2 * P, fill=0xA5, writable=False)
        r.mmap(r.page(1), 2 * P, PROT_READ, "file-shared", file=ro)
        with pytest.raises(RealError) as e:
            r.mprotect(r.page(1), P, PROT_READ | PROT_WRITE)
        assert e.value.errno == "EACCES"
        with pytest.raises(RealError) as e:
            r.mmap(r.page(4), P, PROT_READ | PROT_WRITE, "file-shared", file=ro)
        assert e.value.errno == "EACCES"
        view = r.pages()[1]
        assert view is not None
        assert (view.perms, view.kind, view.file, view.file_page) == ("r--s", "file-shared",
                                                                      "ro", 0)
        assert "mw" not in view.vmflags and "ms" in view.vmflags
        # a private mapping of the same file may be written (COW), the file stays intact
        r.mmap(r.page(4), P, PROT_READ | PROT_WRITE, "file", file=ro)
        assert r.load(r.page(4), 1) == 0xA5
        assert r.store(r.page(4), 1, 0x11)
        assert r.load(r.page(4), 1) == 0x11
        assert r.load(r.page(1), 1) == 0xA5


def test_realmm_faults_are_reported_not_delivered() -> None:
    """do_user_addr_fault() / filemap_fault(): PROT_NONE, a read-only store and a page
    beyond EOF fault (EFAULT of the pipe copy instead of SIGSEGV/SIGBUS)."""
    with RealMm(8) as r:
        f = r.regular_file("f", P, fill=0x5A)
        assert r.load(r.page(0), 8) is None  # the PROT_NONE window itself
        r.mmap(r.page(1), 2 * P, PROT_READ, "file-shared", file=f)
        assert r.load(r.page(1), 4) == 0x5A5A5A5A
        assert r.load(r.page(2), 1) is None  # beyond EOF: SIGBUS
        assert not r.store(r.page(1), 1, 0)  # read-only: SIGSEGV
        assert r.read_page(r.page(1)) == b"\x5a" * P
        r.mmap(r.page(4), P, PROT_WRITE, "anon")  # x86: write implies read
        assert r.store(r.page(4) + 8, 8, 0x0102030405060708)
        assert r.load(r.page(4) + 8, 8) == 0x0102030405060708
        with pytest.raises(RealError) as e:
            r.mmap(r.page(5), P, PROT_READ, "anon", noreplace=True)
        assert e.value.errno == "EEXIST"


def test_realmm_refuses_to_leave_the_window() -> None:
    """The harness never lets a call reach outside the scratch window."""
    with RealMm(4) as r:
        with pytest.raises(ValueError):
            r.mmap(r.page(3), 2 * P, PROT_READ, "anon")
        with pytest.raises(ValueError):
            r.munmap(r.base - P, P)
        with pytest.raises(ValueError):
            r.mremap(r.page(1), P, 2 * P, maymove=True)
        with pytest.raises(ValueError):
            r.mremap(r.page(1), P, 4 * P)


def test_realmm_leaves_the_process_as_found() -> None:
    """Closing the harness unmaps the window, closes its descriptors, removes its files."""
    def fds() -> list[str]:
        return sorted(os.listdir("/proc/self/fd"))

    before = fds()
    with RealMm(8) as r:
        base = r.base
        r.regular_file("x", P, fill=1)
        r.memfd("m", P)
        r.mmap(r.page(1), P, PROT_READ, "file", file=r.files["x"])
        tmp = os.path.dirname(r.files["x"].shown)
        assert os.path.isdir(tmp)
    assert realmm.read_smaps(base, base + 8 * P) == []
    assert not os.path.exists(tmp)
    assert fds() == before
