"""mmap(2): VMA flags as /proc/PID/smaps shows them, errnos, MAP_FIXED, placement.

The VmFlags expectations are what this host's 6.18 kernel printed for the
same mappings (kvm-on-this-host.md §3.1 and direct checks)."""

from __future__ import annotations

import pytest

from kvmmem.errors import ArgumentError, InputError, KernelError
from kvmmem.host import (
    MMAP_BASE,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    TASK_SIZE,
    Mm,
    NotifierEvent,
    PhysMem,
    RecordingNotifier,
    VmaKind,
)

from .conftest import M, P

RW = PROT_READ | PROT_WRITE


@pytest.mark.parametrize(
    ("kind", "prot", "flags", "perms"),
    [
        ("anon", RW, "rd wr mr mw me ac", "rw-p"),
        ("anon", PROT_READ, "rd mr mw me", "r--p"),
        ("anon", PROT_NONE, "mr mw me", "---p"),
        ("anon", RW | PROT_EXEC, "rd wr ex mr mw me ac", "rwxp"),
        ("memfd", RW, "rd wr sh mr mw me ms", "rw-s"),
        ("memfd", PROT_READ, "rd sh mr mw me ms", "r--s"),
        ("file", RW, "rd wr mr mw me ac", "rw-p"),
        ("file-shared", RW, "rd wr sh mr mw me ms", "rw-s"),
        ("thp", RW, "rd wr mr mw me ac hg", "rw-p"),
        ("hugetlb", RW, "rd wr mr mw me de ht", "rw-p"),
        ("device", RW, "rd wr sh mr mw me ms pf io de dd", "rw-s"),
        ("device-lazy", RW, "rd wr sh mr mw me ms pf io de dd", "rw-s"),
    ],
)
def test_vmflags_per_kind(mm: Mm, kind: str, prot: int, flags: str, perms: str) -> None:
    """do_mmap()/show_smap_vma_flags(): VM_ACCOUNT only for private writable
    (accountable_mapping), VM_SHARED|VM_MAYSHARE for MAP_SHARED, hugetlbfs adds
    VM_HUGETLB|VM_DONTEXPAND, remap_pfn_range/vfio add VM_IO|VM_PFNMAP|VM_DONTEXPAND|
    VM_DONTDUMP; maps perms end in 's' for VM_MAYSHARE."""
    a = mm.mmap(4 * P, prot, kind)
    vma = mm.vma_lookup(a)
    assert vma is not None
    assert " ".join(vma.vm_flags_names()) == flags
    assert vma.maps_perms() == perms
    assert vma.kind is VmaKind(kind)


def test_shared_mapping_of_readonly_file(mm: Mm) -> None:
    """do_mmap(): MAP_SHARED of an O_RDONLY file loses VM_MAYWRITE and VM_SHARED
    (VmFlags "rd mr me ms", perms "r--s"); PROT_WRITE there is EACCES."""
    f = mm.open_file("/data/ro", 4 * P, writable=False, fill=0xA5)
    with pytest.raises(KernelError) as e:
        mm.mmap(4 * P, RW, "file-shared", file=f)
    assert e.value.errno == "EACCES"
    a = mm.mmap(4 * P, PROT_READ, "file-shared", file=f)
    vma = mm.vma_lookup(a)
    assert vma is not None
    assert vma.vm_flags_names() == ["rd", "mr", "me", "ms"]
    assert vma.maps_perms() == "r--s"
    # a private writable mapping of the same file is allowed (COW)
    b = mm.mmap(4 * P, RW, "file", file=f)
    mm.host_write(b, 1, 0x11)
    assert mm.host_read(b, 1) == 0x11 and mm.host_read(a, 1) == 0xA5


def test_maps_names(mm: Mm) -> None:
    """The /proc/PID/maps pathname column: memfd "/memfd:NAME (deleted)", anonymous
    hugetlb "/anon_hugepage (deleted)", a file its path, anonymous memory empty."""
    f = mm.memfd_create("guest", 4 * P)
    assert mm.vma_lookup(mm.mmap(4 * P, RW, "memfd", file=f)).maps_name() == (  # type: ignore[union-attr]
        "/memfd:guest (deleted)")
    assert mm.vma_lookup(mm.mmap(P, RW, "hugetlb")).maps_name() == (  # type: ignore[union-attr]
        "/anon_hugepage (deleted)")
    g = mm.open_file("/var/tmp/img", P)
    assert mm.vma_lookup(mm.mmap(P, RW, "file", file=g)).maps_name() == "/var/tmp/img"  # type: ignore[union-attr]
    assert mm.vma_lookup(mm.mmap(P, RW, "anon")).maps_name() == ""  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "errno"),
    [
        ({"length": 0}, "EINVAL"),
        ({"length": P, "offset": 5, "kind": "file"}, "EINVAL"),
        ({"length": P, "addr": 0x10000005, "fixed": True}, "EINVAL"),
        ({"length": P, "addr": 0x10000005, "noreplace": True}, "EINVAL"),
        ({"length": 1 << 62}, "ENOMEM"),
        ({"length": P, "addr": TASK_SIZE, "fixed": True}, "ENOMEM"),
        ({"length": P, "addr": 0, "fixed": True}, "ENOMEM"),
        ({"length": M, "addr": 0x40000000 + P, "fixed": True, "kind": "hugetlb"}, "EINVAL"),
        ({"length": P, "offset": -P, "kind": "file"}, "EOVERFLOW"),
        ({"length": 2 * P, "offset": (1 << 63) - 2 * P, "kind": "file"}, "EOVERFLOW"),
    ],
)
def test_mmap_errnos(mm: Mm, kwargs: dict[str, object], errno: str) -> None:
    """ksys_mmap_pgoff()/do_mmap()/__get_unmapped_area(): EINVAL for length 0, an
    unaligned offset or fixed address, a hugetlb address not 2M aligned; ENOMEM for
    lengths/ranges beyond TASK_SIZE; EOVERFLOW when pgoff + pages wraps.  Nothing changes."""
    kw = dict(kwargs)
    length = kw.pop("length")
    kind = kw.pop("kind", "anon")
    before = mm.snapshot()
    with pytest.raises(KernelError) as e:
        mm.mmap(length, RW, kind, **kw)  # type: ignore[arg-type]
    assert e.value.errno == errno
    assert mm.snapshot() == before


def test_map_fixed_noreplace_eexist(mm: Mm) -> None:
    """do_mmap(): MAP_FIXED_NOREPLACE over an existing mapping is EEXIST."""
    a = mm.mmap(4 * P, RW, "anon")
    before = mm.snapshot()
    with pytest.raises(KernelError) as e:
        mm.mmap(P, RW, "anon", addr=a + P, noreplace=True)
    assert e.value.errno == "EEXIST"
    assert mm.snapshot() == before
    assert mm.mmap(P, RW, "anon", addr=a + 4 * P, noreplace=True) == a + 4 * P


def test_map_fixed_replaces_with_unmap_notification(mm: Mm, rec: RecordingNotifier) -> None:
    """__mmap_region(): MAP_FIXED gathers the old VMAs and clears their PTEs with one
    MMU_NOTIFY_UNMAP range for the new mapping's extent (vms_clean_up_area), then the
    new VMA appears; the old data is gone."""
    a = mm.mmap(8 * P, RW, "anon", fill=0x11)
    rec.log.clear()
    b = mm.mmap(2 * P, RW, "memfd", addr=a + 2 * P, fixed=True)
    assert b == a + 2 * P
    assert rec.starts() == [(a + 2 * P, a + 4 * P, NotifierEvent.UNMAP)]
    assert mm.host_read(b, 1) == 0
    assert mm.host_read(a, 1) == 0x11
    kinds = [v.kind.value for v in mm.for_each_vma()]
    assert kinds == ["anon", "memfd", "anon"]


def test_fresh_mmap_does_not_notify(mm: Mm, rec: RecordingNotifier) -> None:
    """A mapping that replaces nothing touches no PTE: no invalidation."""
    mm.mmap(4 * P, RW, "anon")
    mm.mmap(4 * P, RW, "anon", addr=0x50000000, fixed=True)
    assert rec.log == []


def test_placement_is_top_down_below_mmap_base(mm: Mm) -> None:
    """arch_get_unmapped_area_topdown(): the highest free gap below mmap_base; a free
    hint is honoured (rounded up to a page), an occupied one ignored."""
    a = mm.mmap(4 * P, RW, "anon")
    assert a + 4 * P == MMAP_BASE
    b = mm.mmap(P, PROT_READ, "anon")
    assert b + P == a
    c = mm.mmap(P, RW, "anon", addr=0x20000001)
    assert c == 0x20001000
    d = mm.mmap(P, RW, "anon", addr=a)
    assert d not in (a, c)


def test_large_anonymous_mappings_are_thp_aligned(mm: Mm) -> None:
    """__get_unmapped_area(): anonymous mappings whose length is a multiple of 2 MiB
    are placed 2 MiB aligned (thp_get_unmapped_area)."""
    mm.mmap(3 * P, RW, "anon")
    a = mm.mmap(2 * M, RW, "anon")
    assert a % M == 0


def test_adjacent_anonymous_mmaps_merge(mm: Mm) -> None:
    """vma_merge_new_range(): a new anonymous mapping next to a compatible one (same
    flags, contiguous anon pgoff) extends it; different protections do not merge."""
    a = mm.mmap(4 * P, RW, "anon", addr=0x40000000, fixed=True)
    mm.mmap(4 * P, RW, "anon", addr=a + 4 * P, fixed=True)
    mm.mmap(4 * P, PROT_READ, "anon", addr=a + 8 * P, fixed=True)
    bounds = [(v.start - a, v.end - a) for v in mm.for_each_vma()]
    assert bounds == [(0, 8 * P), (8 * P, 12 * P)]


def test_file_mappings_merge_only_when_contiguous(mm: Mm) -> None:
    """is_mergeable_vma(): same file and contiguous vm_pgoff merge; a gap in the file
    offset keeps two VMAs; special (VM_PFNMAP, hugetlb) VMAs never merge."""
    f = mm.memfd_create("m", 16 * P)
    base = 0x40000000
    mm.mmap(2 * P, RW, "memfd", file=f, addr=base, fixed=True)
    mm.mmap(2 * P, RW, "memfd", file=f, offset=2 * P, addr=base + 2 * P, fixed=True)
    mm.mmap(2 * P, RW, "memfd", file=f, offset=8 * P, addr=base + 4 * P, fixed=True)
    assert [(v.start - base) // P for v in mm.for_each_vma()] == [0, 4]
    d = mm.open_device("/dev/bar", 4)
    mm.mmap(2 * P, RW, "device", file=d, addr=base + 16 * P, fixed=True)
    mm.mmap(2 * P, RW, "device", file=d, offset=2 * P, addr=base + 18 * P, fixed=True)
    assert len(mm.vmas_in(base + 16 * P, base + 20 * P)) == 2


def test_anonymous_hugetlb_length_is_rounded_up(mm: Mm) -> None:
    """ksys_mmap_pgoff(): MAP_HUGETLB|MAP_ANONYMOUS aligns the length up to the huge
    page size; the VMA is 2 MiB aligned (hugetlb_get_unmapped_area)."""
    a = mm.mmap(P, RW, "hugetlb")
    vma = mm.vma_lookup(a)
    assert vma is not None and (vma.start % M, vma.end - vma.start) == (0, M)
    assert vma.page_shift == 21


def test_hugetlbfs_file_length_must_be_aligned(mm: Mm) -> None:
    """hugetlb_get_unmapped_area(): a hugetlbfs file mapping needs a 2 MiB multiple."""
    f = mm.memfd_create("h", 2 * M, hugetlb=True)
    with pytest.raises(KernelError) as e:
        mm.mmap(M + P, RW, "hugetlb", file=f)
    assert e.value.errno == "EINVAL"
    a = mm.mmap(2 * M, RW, "hugetlb", file=f)
    assert mm.vma_lookup(a).maps_perms() == "rw-s"  # type: ignore[union-attr]


def test_hugetlb_pool_reservation() -> None:
    """hugetlb_reserve_pages(): without free huge pages mmap fails with ENOMEM (this
    host: nr_hugepages=0); MAP_NORESERVE maps (VmFlags "nr") and the touch is SIGBUS."""
    from kvmmem.host import HostSignal

    mm = Mm(PhysMem(hugetlb_pages=0))
    with pytest.raises(KernelError) as e:
        mm.mmap(M, RW, "hugetlb")
    assert e.value.errno == "ENOMEM"
    a = mm.mmap(M, RW, "hugetlb", noreserve=True)
    assert "nr" in mm.vma_lookup(a).vm_flags_names()  # type: ignore[union-attr]
    with pytest.raises(HostSignal) as s:
        mm.host_read(a, 8)
    assert s.value.signal == "SIGBUS"
    mm2 = Mm(PhysMem(hugetlb_pages=1))
    b = mm2.mmap(M, RW, "hugetlb")
    with pytest.raises(KernelError):
        mm2.mmap(M, RW, "hugetlb")
    mm2.munmap(b, M)
    mm2.mmap(M, RW, "hugetlb")


def test_populate_and_fill(mm: Mm) -> None:
    """MAP_POPULATE faults every page in (private writable: write faults, so real
    pages, not the zero page); fill stores a byte everywhere right after the mmap."""
    a = mm.mmap(4 * P, RW, "anon", populate=True)
    pte = mm.host_pte(a + P)
    assert pte is not None and pte.writable and pte.pfn != mm.physmem.zero_pfn
    b = mm.mmap(4 * P, PROT_READ, "anon", populate=True)
    pte = mm.host_pte(b)
    assert pte is not None and pte.pfn == mm.physmem.zero_pfn and not pte.writable
    c = mm.mmap(3 * P, RW, "file-shared", fill=0x42)
    assert mm.host_read(c + 2 * P + 100, 2) == 0x4242
    f = mm.vma_lookup(c).file  # type: ignore[union-attr]
    assert f is not None and f.pread(P, 2) == b"\x42\x42"
    with pytest.raises(InputError):
        mm.mmap(P, PROT_READ, "anon", fill=1)


def test_input_errors_change_nothing(mm: Mm) -> None:
    """Wrong Python types: ArgumentError, a KernelError EINVAL (do_mmap's answer
    to an invalid argument) that is also an InputError; misuse of the model's
    own mmap keywords: InputError.  Nothing changes either way."""
    mm.mmap(P, RW, "anon")
    before = mm.snapshot()
    for bad in (
        lambda: mm.mmap("4096", RW, "anon"),  # type: ignore[arg-type]
        lambda: mm.mmap(P, RW, "anon", fixed=1),  # type: ignore[arg-type]
        lambda: mm.mmap(P, True, "anon"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ArgumentError) as err:
            bad()
        assert err.value.errno == "EINVAL" and isinstance(err.value, InputError)
    for bad in (
        lambda: mm.mmap(P, RW, "ram"),
        lambda: mm.mmap(P, RW, "anon", file=mm.memfd_create("x", P)),
        lambda: mm.mmap(P, RW, "anon", fill=256),
    ):
        with pytest.raises(InputError) as err2:
            bad()
        assert not isinstance(err2.value, KernelError)
    assert mm.snapshot()[:3] == before[:3]


def test_max_map_count(mm: Mm) -> None:
    """do_mmap(): ENOMEM once map_count exceeds sysctl_max_map_count; munmap's middle
    split (vms_gather_munmap_vmas) needs map_count < max."""
    small = Mm(mm.physmem, max_map_count=3)
    for i in range(4):
        small.mmap(P, PROT_READ if i % 2 else RW, "anon", addr=0x40000000 + i * P, fixed=True)
    with pytest.raises(KernelError) as e:
        small.mmap(P, RW, "anon", addr=0x50000000, fixed=True)
    assert e.value.errno == "ENOMEM"
    small.munmap(0x40000000, P)
    small.mmap(3 * P, RW, "anon", addr=0x50000000, fixed=True)
    with pytest.raises(KernelError) as e:
        small.munmap(0x50000000 + P, P)
    assert e.value.errno == "ENOMEM"


def test_fill_beyond_eof_signals_after_the_mapping(mm: Mm) -> None:
    """A userspace memset over a file mapping longer than the file gets SIGBUS at the
    first page past EOF; the mapping exists and the pages before it were written.
    MAP_POPULATE instead stops quietly (populate_vma_page_range)."""
    from kvmmem.host import HostSignal

    f = mm.open_file("/short", P)
    with pytest.raises(HostSignal) as e:
        mm.mmap(3 * P, RW, "file-shared", file=f, addr=0x40000000, fixed=True, fill=0x33)
    assert (e.value.signal, e.value.addr) == ("SIGBUS", 0x40000000 + P)
    assert mm.host_read(0x40000000, 1) == 0x33
    a = mm.mmap(3 * P, RW, "file-shared", file=f, populate=True)
    assert mm.host_pte(a) is not None and mm.host_pte(a + P) is None
