"""guest_memfd: guest memory that is no host mapping (``virt/kvm/guest_memfd.c``).

``KVM_CREATE_GUEST_MEMFD`` makes a file whose pages only KVM hands to the guest
(v6.8, with private memory for confidential VMs).  A memslot created with
``KVM_SET_USER_MEMORY_REGION2`` and ``KVM_MEM_GUEST_MEMFD`` *binds* a range of
the file (``kvm_gmem_bind``); guest faults then take their pfn from the file
(``kvm_gmem_get_pfn``) instead of from the slot's host address: for private
gfns, and since v6.18 for every gfn of a slot whose file was created with
``GUEST_MEMFD_FLAG_MMAP`` (a *gmem-only* slot; the file may then also be
mmapped by userspace, and with ``GUEST_MEMFD_FLAG_INIT_SHARED`` touched there).

:class:`GmemFile` is ``struct gmem_file`` (one VM's view: the owner and the
bindings) over its inode, a host :class:`~kvmmem.host.file.File` of kind
``guest_memfd`` whose page cache holds the pages.  The inode's ``fault`` and
``fallocate`` are this module's (``kvm_gmem_fault_user_mapping``,
``kvm_gmem_fallocate``): the host mm and ``vfs_fallocate`` call them as they
call any file's.  A hole punch invalidates KVM's mappings of the range through
the guest_memfd's own invalidation (``kvm_gmem_invalidate_begin``/``_end``, under
``mmu_lock`` with ``mmu_invalidate_in_progress`` raised), not through the MMU
notifier; the host mappings of the file are zapped by the truncation.

Which releases have it (kvmmem.variants): x86 from v6.8 (a default VM can create
a file but bind it only since v6.18: before, ``KVM_MEM_GUEST_MEMFD`` needs a VM
with private memory, a ``sw_protected`` one), arm64 from v6.18,
riscv never up to 7.3.  The creation flags MMAP and INIT_SHARED are v6.18.

Private gfns (``KVM_SET_MEMORY_ATTRIBUTES`` on an x86 ``KVM_X86_SW_PROTECTED_VM``)
are served from the file too: :mod:`kvmmem.kvm.memory_attributes` and x86's fault
path.  Not modelled: huge folios (every release modelled maps guest_memfd pages at
4K, ``*max_order = 0``); hwpoison; closing the file while slots are bound; binding a
file of another VM (one VM per scenario).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from kvmmem.errors import KernelError
from kvmmem.host.file import File, FileKind
from kvmmem.host.truncate import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, punch_hole_op
from kvmmem.kvm.memory_slot import GmemBinding
from kvmmem.kvm.mmu_notifier import (
    kvm_mmu_invalidate_begin,
    kvm_mmu_invalidate_end,
    kvm_mmu_unmap_gfn_range,
)
from kvmmem.sync import Op, acquire, release

if TYPE_CHECKING:
    from kvmmem.kvm.kvm_host import Kvm
    from kvmmem.kvm.memory_slot import MemorySlot

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
CALL_CREATE = "KVM_CREATE_GUEST_MEMFD"
CALL_BIND = "KVM_SET_USER_MEMORY_REGION2"


class GmemFile:
    """``struct gmem_file`` with its ``gmem_inode``: the owning VM, the creation
    ``flags``, the bindings (page ranges -> slot), the inode (a host :class:`File`)
    and the fd it was installed at."""

    def __init__(self, kvm: Kvm, inode: File, flags: int, fd: int) -> None:
        self.kvm: Kvm | None = kvm
        self.inode = inode
        self.flags = flags
        self.fd = fd
        self.bindings: list[tuple[int, int, MemorySlot]] = []
        """``f->bindings``: ``(first page, end page, slot)`` of every bound range."""
        inode.fault = self.fault_user_mapping
        inode.fallocate = self.fallocate_op
        if not flags & GUEST_MEMFD_FLAG_MMAP:
            inode.mmap_refused = "guest_memfd without GUEST_MEMFD_FLAG_MMAP"

    def __repr__(self) -> str:
        return f"GmemFile(fd {self.fd}, {self.inode.size:#x} bytes, flags {self.flags:#x})"

    def __deepcopy__(self, memo: dict[int, Any]) -> GmemFile:
        """A copy of the file for another process image (path independence): the same
        pages, bound to no VM and no slot (the copy's owner adopts it)."""
        clone = GmemFile.__new__(GmemFile)
        memo[id(self)] = clone
        clone.kvm = None
        clone.flags = self.flags
        clone.fd = self.fd
        clone.bindings = []
        clone.inode = copy.deepcopy(self.inode, memo)
        clone.inode.fault = clone.fault_user_mapping
        clone.inode.fallocate = clone.fallocate_op
        return clone

    # --- the bindings ------------------------------------------------------------------

    def binding_at(self, index: int) -> MemorySlot | None:
        """``xa_load(&f->bindings, index)``."""
        for first, end, slot in self.bindings:
            if first <= index < end:
                return slot
        return None

    # --- userspace -----------------------------------------------------------------------

    def fault_user_mapping(self, index: int) -> int | None:
        """``kvm_gmem_fault_user_mapping``: the page for a fault on an mmap of the file,
        or None for SIGBUS: beyond i_size, or a file without INIT_SHARED (its pages are
        not the host's to touch)."""
        if index << self.inode.physmem.page_shift >= self.inode.size:
            return None
        if not self.flags & GUEST_MEMFD_FLAG_INIT_SHARED:
            return None
        return int(self.inode.get_page(index))

    def fallocate_op(self, mode: int, offset: int, length: int) -> Op[None]:
        """``kvm_gmem_fallocate``: EOPNOTSUPP without KEEP_SIZE or with another mode bit;
        EINVAL for an unaligned range; a punch (no size check: a range beyond i_size
        punches nothing) or an allocation (EINVAL beyond i_size)."""
        call = f"fallocate({mode:#x}, {offset:#x}, {length:#x})"
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise KernelError("EOPNOTSUPP", call, "guest_memfd needs FALLOC_FL_KEEP_SIZE")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise KernelError("EOPNOTSUPP", call, "a mode guest_memfd does not support")
        shift = self.inode.physmem.page_shift
        if offset % (1 << shift) or length % (1 << shift):
            raise KernelError("EINVAL", call, "range not page aligned")
        if mode & FALLOC_FL_PUNCH_HOLE:
            yield from self.punch_hole_op(offset >> shift, (offset + length) >> shift)
            return
        # kvm_gmem_allocate
        if offset + length > self.inode.size:
            raise KernelError("EINVAL", call, "allocation beyond the file's size")
        yield acquire(self._lock, shared=True)
        for index in range(offset >> shift, (offset + length) >> shift):
            self.inode.get_page(index)
        yield release(self._lock, shared=True)

    @property
    def _lock(self) -> str:
        """``filemap_invalidate_lock`` of the inode's mapping."""
        return f"invalidate_lock:{self.inode.ino}"

    def punch_hole_op(self, start: int, end: int) -> Op[None]:
        """``kvm_gmem_punch_hole``: under the invalidate lock, zap KVM's mappings of every
        slot bound to pages ``[start, end)`` (``kvm_gmem_invalidate_begin``), drop the
        pages (``truncate_inode_pages_range``, which also zaps the file's host mappings),
        then end the invalidation."""
        yield acquire(self._lock)
        ranges = self._gfn_ranges(start, end)
        kvm = self.kvm if self.kvm is not None and self.kvm.variant.gmem_invalidate else None
        if ranges and kvm is not None:
            yield from kvm_gmem_invalidate_begin_op(kvm, ranges)
        last = min(end, self.inode.npages()) - 1
        if last >= start:
            yield from punch_hole_op(self.inode, start, last)
        if ranges and kvm is not None:
            yield from kvm_gmem_invalidate_end_op(kvm)
        yield release(self._lock)

    def _gfn_ranges(self, start: int, end: int) -> list[tuple[MemorySlot, int, int]]:
        """The ``(slot, first gfn, end gfn)`` of every binding overlapping pages
        ``[start, end)`` (``__kvm_gmem_invalidate_begin``'s walk)."""
        out = []
        for first, last, slot in self.bindings:
            lo, hi = max(first, start), min(last, end)
            if lo < hi:
                pgoff = slot.gmem.pgoff if slot.gmem is not None else first
                out.append((slot, slot.base_gfn + lo - pgoff, slot.base_gfn + hi - pgoff))
        return out


def kvm_gmem_invalidate_begin_op(kvm: Kvm, ranges: list[tuple[MemorySlot, int, int]]
                                 ) -> Op[None]:
    """``__kvm_gmem_invalidate_begin``: under ``mmu_lock``, raise the in-progress count
    (``kvm_mmu_invalidate_begin``), record each gfn range and unmap it
    (``kvm_mmu_unmap_gfn_range``), flush.  A memory-attribute conversion's first half
    does the same (kvmmem.kvm.memory_attributes)."""
    yield acquire("mmu_lock")
    kvm_mmu_invalidate_begin(kvm)
    flush = False
    for slot, start, end in ranges:
        flush |= kvm_mmu_unmap_gfn_range(kvm, slot, start, end)
    if flush:
        kvm.flush_remote_tlbs()
    yield release("mmu_lock")


def kvm_gmem_invalidate_end_op(kvm: Kvm) -> Op[None]:
    """``__kvm_gmem_invalidate_end``: ``kvm_mmu_invalidate_end`` under ``mmu_lock``."""
    yield acquire("mmu_lock")
    kvm_mmu_invalidate_end(kvm)
    yield release("mmu_lock")


# --- the ioctls ---------------------------------------------------------------------------


def kvm_gmem_get_supported_flags(kvm: Kvm) -> int:
    """``kvm_gmem_get_supported_flags`` (= KVM_CAP_GUEST_MEMFD_FLAGS): MMAP, plus
    INIT_SHARED where the arch allows it for this VM (``kvm_arch_supports_gmem_init_shared``:
    x86 only for a VM without private memory); none before v6.18."""
    if not kvm.variant.gmem_mmap:
        return 0
    if kvm.has_private_mem:
        return GUEST_MEMFD_FLAG_MMAP
    return GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


def kvm_gmem_create(kvm: Kvm, size: int, flags: int) -> GmemFile:
    """``KVM_CREATE_GUEST_MEMFD`` (``kvm_gmem_create``): the new file, installed in the
    process's fd table.  Raises KernelError: where the kernel has no guest_memfd for the
    architecture, the arch's answer to an unknown VM ioctl (x86 ENOTTY, arm64 and riscv
    EINVAL); EINVAL for an unsupported flag (checked first) or a size that is not a
    positive multiple of the page size."""
    if not kvm.arch.has_guest_memfd(kvm.variant):
        raise KernelError(kvm.arch.unknown_vm_ioctl_errno, CALL_CREATE,
                          f"{kvm.arch_name} KVM of {kvm.variant.name} has no guest_memfd")
    if flags & ~kvm_gmem_get_supported_flags(kvm):
        raise KernelError("EINVAL", CALL_CREATE, f"flags {flags:#x} not supported "
                          f"(KVM_CAP_GUEST_MEMFD_FLAGS {kvm_gmem_get_supported_flags(kvm):#x})")
    if size <= 0 or size >= 1 << 63 or size % kvm.pg.page_size:
        raise KernelError("EINVAL", CALL_CREATE, f"size {size:#x} not a positive page multiple")
    mm = kvm.mm
    inode = File(mm.physmem, mm.new_ino(), "[kvm-gmem]", FileKind.GUEST_MEMFD, size)
    fd = mm.install_fd(None)
    gmem = GmemFile(kvm, inode, flags, fd)
    mm.fdtable[fd] = gmem
    return gmem


def kvm_gmem_bind(kvm: Kvm, slot: MemorySlot, fd: int, offset: int) -> None:
    """``kvm_gmem_bind``: bind pages ``[offset, offset + slot size)`` of the file at
    ``fd`` to the new ``slot``.  Raises KernelError EBADF (no such fd), EINVAL (not a
    guest_memfd, another VM's, an unaligned or out-of-file range), EEXIST (a range
    another slot already binds: EINVAL in the v6.18 source, EEXIST on real 7.2 and 7.3,
    ``gmem_bind_overlap_eexist``)."""
    gmem = kvm.mm.fdtable.get(fd)
    if gmem is None:
        raise KernelError("EBADF", CALL_BIND, f"guest_memfd {fd} is not an open fd")
    if not isinstance(gmem, GmemFile):
        raise KernelError("EINVAL", CALL_BIND, f"fd {fd} is not a guest_memfd")
    if gmem.kvm is not kvm:
        raise KernelError("EINVAL", CALL_BIND, f"guest_memfd {fd} belongs to another VM")
    shift = slot.page_shift
    size = slot.npages << shift
    if offset < 0 or offset % (1 << shift) or offset + size > gmem.inode.size:
        raise KernelError("EINVAL", CALL_BIND, f"guest_memfd_offset {offset:#x} + size "
                          f"{size:#x} outside the file ({gmem.inode.size:#x} bytes) or "
                          "unaligned")
    start = offset >> shift
    end = start + slot.npages
    if any(first < end and start < last for first, last, _ in gmem.bindings):
        raise KernelError("EEXIST" if kvm.variant.gmem_bind_overlap_eexist else "EINVAL",
                          CALL_BIND, "the file range is already bound to a slot")
    slot.gmem = GmemBinding(gmem, start, bool(gmem.flags & GUEST_MEMFD_FLAG_MMAP)
                            and kvm.variant.gmem_mmap)
    gmem.bindings.append((start, end, slot))


def kvm_gmem_unbind(slot: MemorySlot) -> None:
    """``kvm_gmem_unbind``: forget the slot's range in its file (a slot being freed)."""
    binding = slot.gmem
    if binding is None or binding.file is None:
        return
    binding.file.bindings = [b for b in binding.file.bindings if b[2] is not slot]
    binding.file = None


def kvm_gmem_get_pfn(kvm: object, slot: MemorySlot, gfn: int) -> int:
    """``kvm_gmem_get_pfn``: the pfn of the file's page for ``gfn`` (allocated and
    zeroed on first use; always a 4K folio, ``*max_order = 0``).  Raises KernelError
    EFAULT (the slot's file is gone), EIO (the file's binding is not this slot)."""
    binding = slot.gmem
    if binding is None or binding.file is None:
        raise KernelError("EFAULT", "kvm_gmem_get_pfn", "the slot's guest_memfd is gone")
    gmem = binding.file
    index = gfn - slot.base_gfn + binding.pgoff
    if gmem.binding_at(index) is not slot:
        raise KernelError("EIO", "kvm_gmem_get_pfn", f"page {index:#x} not bound to the slot")
    return int(gmem.inode.get_page(index))


def gmem_page(slot: MemorySlot, gfn: int) -> int | None:
    """The pfn the slot's guest_memfd holds for ``gfn`` now, or None (not allocated,
    punched, or the file unbound): what the checkers compare a gmem-only slot's
    mappings with.  Allocates nothing."""
    binding = slot.gmem
    if binding is None or binding.file is None:
        return None
    pfn = binding.file.inode.cache.get(gfn - slot.base_gfn + binding.pgoff)
    return None if pfn is None else int(pfn)


def kvm_slot_has_gmem(slot: MemorySlot | None) -> bool:
    """``kvm_slot_has_gmem``: the slot was created with KVM_MEM_GUEST_MEMFD."""
    return slot is not None and slot.gmem is not None


def kvm_memslot_is_gmem_only(slot: MemorySlot | None) -> bool:
    """``kvm_memslot_is_gmem_only`` (v6.18): every fault of the slot is served from its
    guest_memfd."""
    return slot is not None and slot.gmem is not None and slot.gmem.gmem_only
