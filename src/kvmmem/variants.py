"""Behaviour sets ("variants"), selectable per run: kernel versions, and mutations.

A variant is a kernel version.  Every place where kernel history changed what
the model must do is a *switch*: a :class:`Switch` names what it controls, its
value before the first change and each :class:`Change` after it (the mainline
release, the commit's 12-hex abbreviation and its title), so a switch may
change more than once.  :func:`get_variant` builds, for a release ``X.Y``, the
:class:`Variant` that holds every switch's value as of that release; the KVM
code reads its boolean fields (``vm.variant.has_pre_fault_memory``) and never
a version number.

Names (docs/versions.md):

* ``upstream`` - the newest release checked against a real kernel,
  :data:`UPSTREAM_RELEASE` (7.3: the arm64 7.3, riscv 7.2 and x86 7.3 machines
  agree with it on every bundled scenario).
* ``5.4`` ... ``7.3`` - any mainline release in that range
  (:data:`FIRST_RELEASE`..:data:`UPSTREAM_RELEASE`).
* ``linux-5.4`` - v5.4 under the name of the November 2019 memslot/VMA
  discussion.
* the mutations ``no-invalidate-retry``, ``remapped-no-write-check``,
  ``no-tlb-flush`` - deliberately broken kernels; ``VERSION+MUTATION``
  (``6.1+no-tlb-flush``) applies one to a release, and a bare mutation name is
  ``upstream+MUTATION``.
* a page-size suffix ``-4k``, ``-16k`` or ``-64k`` on the release (``7.3-16k``,
  ``upstream-64k``, ``6.12-16k+no-tlb-flush``): the same kernel built with that host
  page size (arm64 ``CONFIG_ARM64_{4K,16K,64K}_PAGES``; Debian ships
  ``linux-image-arm64-16k``).  The page size is a property of the build, not of the
  release's history: :attr:`Variant.page_size`, read by the model's host (``Mm``).

An architecture that did not exist at a release is refused by
:meth:`Variant.arch_unsupported` (riscv KVM was merged in v5.16).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from kvmmem.errors import InputError

Release = tuple[int, int]

FIRST_RELEASE: Release = (5, 4)
UPSTREAM_RELEASE: Release = (7, 3)
LAST_MINOR = {5: 19, 6: 19, 7: UPSTREAM_RELEASE[1]}
"""The last minor release of each major inside the range (5.19, 6.19, then 7.x up to
upstream)."""
ARCH_MERGED: dict[str, Release] = {"riscv": (5, 16)}
"""The release that merged an architecture's KVM (x86 and arm64 predate v5.4)."""


def release_text(release: Release) -> str:
    """``(6, 1)`` -> ``"6.1"``."""
    return f"{release[0]}.{release[1]}"


@dataclass(frozen=True, slots=True)
class Change:
    """One change of a switch: from mainline ``release`` on it has ``value``.
    ``commit`` is the 12-hex abbreviation, or None where it was not identified
    (``note`` then says what is known)."""

    release: Release
    value: bool | int
    commit: str | None
    title: str
    note: str = ""


@dataclass(frozen=True, slots=True)
class Switch:
    """One behaviour switch: the :class:`Variant` field ``name``, the architectures
    whose code reads it, what it controls, its value before the first change and its
    changes in release order."""

    name: str
    arches: tuple[str, ...]
    what: str
    before: bool | int
    changes: tuple[Change, ...]

    def value_at(self, release: Release) -> bool | int:
        """The switch's value in mainline ``release``."""
        value = self.before
        for change in self.changes:
            if release >= change.release:
                value = change.value
        return value


SWITCHES: tuple[Switch, ...] = (
    Switch(
        "arm64_prepare_write_check", ("arm64",),
        "kvm_arch_prepare_memory_region refuses a writable slot over a VMA without "
        "VM_WRITE (EPERM)", True,
        (Change((5, 5), False, None,
                "KVM: arm/arm64: Remove excessive permission check in "
                "kvm_arch_prepare_memory_region",
                "Jia He, kvmarm fixes for v5.5 (take #1); hash not identified"),)),
    Switch(
        "arm64_prepare_premap", ("arm64",),
        "kvm_arch_prepare_memory_region premaps VM_PFNMAP ranges as 4K Device pages "
        "(kvm_phys_addr_ioremap), writable when the slot is", True,
        (Change((5, 14), False, "fd6f17bade21",
                "KVM: arm64: Remove the creation time's mapping of MMIO regions"),)),
    Switch(
        "riscv_prepare_premap", ("riscv",),
        "kvm_arch_prepare_memory_region premaps VM_PFNMAP ranges "
        "(kvm_riscv_gstage_ioremap), from the merge of riscv KVM", True,
        (Change((6, 18), False, "8c5fa3764fac",
                "RISC-V: KVM: Remove automatic I/O mapping for VM_PFNMAP"),)),
    Switch(
        "remapped_always_writable", ("x86", "arm64", "riscv"),
        "hva_to_pfn_remapped reports a VM_PFNMAP page writable whatever the host PTE "
        "says (follow_pfn)", True,
        (Change((5, 12), False, "bd2fae8da794",
                "KVM: do not assume PTE is writable after follow_pfn"),)),
    Switch(
        "arm64_pfnmap_force_pte", ("arm64",),
        "user_mem_abort forces 4K stage-2 pages for a VM_PFNMAP VMA", True,
        (Change((5, 14), False, "2aa53d68cee6",
                "KVM: arm64: Try stage2 block mapping for host device MMIO"),)),
    Switch(
        "arm64_pfnmap_vma_block", ("arm64",),
        "user_mem_abort sizes a VM_PFNMAP mapping from the VMA (get_vma_page_shift: a "
        "PMD/PUD block when vm_pgoff is congruent with the hva), then maps the frames "
        "that follow the block-aligned gfn's pfn", False,
        (Change((5, 14), True, "2aa53d68cee6",
                "KVM: arm64: Try stage2 block mapping for host device MMIO"),
         Change((7, 3), False, None,
                "KVM: arm64: Don't use the VMA to size stage-2 block mappings for VM_PFNMAP",
                "mainline hash not identified; the stable queues of 2026-10-08 carried it "
                "to 5.10.y, 5.15.y, 6.1.y, 6.6.y, 6.12.y, 6.18.y and 7.2.y and not to a "
                "7.3.y, so it reached mainline in the 7.3 cycle (Debian 6.1.192 and "
                "6.12.117 carry it, 6.1.176 does not)"))),
    Switch(
        "arm64_cacheable_pfnmap_check", ("arm64",),
        "kvm_arch_prepare_memory_region refuses (EINVAL) a VM_PFNMAP VMA with a "
        "cacheable memory type unless the CPU has FWB and CTR_EL0.DIC "
        "(kvm_supports_cacheable_pfnmap)", False,
        (Change((6, 17), True, "2a8dfab26677",
                "KVM: arm64: Block cacheable PFNMAP mapping",
                "Ankit Agrawal's series (capability 243, KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED, "
                "f55ce5a6cd33 \"KVM: arm64: Expose new KVM cap for cacheable PFNMAP\").  Real "
                "arm64 7.2.13 and 7.3.4 refuse a DRM shmem buffer's slot on QEMU's -cpu max"),)),
    Switch(
        "arm64_cacheable_pfnmap_fault", ("arm64",),
        "user_mem_abort maps a cacheable VM_PFNMAP/VM_MIXEDMAP page outside the kernel's "
        "linear map (Grace-style device memory) Normal write-back when the CPU has FWB and "
        "DIC and fails the fault with EFAULT when it lacks them; before, every such page "
        "is device memory (kvm_is_device_pfn: Device-nGnRE, or Normal-NC with "
        "VM_ALLOW_ANY_UNCACHED)", False,
        (Change((6, 17), True, "0c67288e0c8b",
                "KVM: arm64: Allow cacheable stage 2 mapping using VMA flags",
                "with 2a8dfab26677 \"KVM: arm64: Block cacheable PFNMAP mapping\" (the "
                "EFAULT) and 216887f79d98 \"KVM: arm64: Assume non-PFNMAP/MIXEDMAP VMAs "
                "can be mapped cacheable\" in the same series"),)),
    Switch(
        "arm64_allow_any_uncached", ("arm64",),
        "vfio-pci marks its BAR mappings VM_ALLOW_ANY_UNCACHED (a39d3a966a09 \"vfio: "
        "Convey kvm that the vfio-pci device is wc safe\") and user_mem_abort maps "
        "device memory of such a VMA Normal-NC instead of Device-nGnRE", False,
        (Change((6, 9), True, "8c47ce3e1d2c",
                "KVM: arm64: Set io memory s2 pte as normalnc for vfio pci device",
                "with c034ec84e879 (KVM_PGTABLE_PROT_NORMAL_NC), 5c656fcdd6c6 (the VMA "
                "flag) and a39d3a966a09 (vfio-pci sets it), applied to kvmarm for 6.9"),)),
    Switch(
        "arm64_dic_eager_exec", ("arm64",),
        "user_mem_abort makes a cacheable mapping executable at once when the CPU has "
        "CTR_EL0.DIC (no I-cache invalidation needed); before, execute permission "
        "came only with an instruction fetch fault (needs_exec)", False,
        (Change((5, 10), True, None,
                "KVM: arm64: Convert user_mem_abort() to generic page-table API",
                "Will Deacon's page-table rework; hash not identified"),)),
    Switch(
        "arm64_mte", ("arm64",),
        "KVM_CAP_ARM_MTE exists: KVM_ENABLE_CAP of it (before any vCPU, on a CPU with "
        "MTE) makes an MTE VM, whose kvm_arch_prepare_memory_region refuses a VM_SHARED "
        "VMA (EINVAL) and whose user_mem_abort fails a cacheable fault on one (EFAULT); "
        "before, the capability is unknown (EINVAL)", False,
        (Change((5, 14), True, "673638f434ee",
                "KVM: arm64: Expose KVM_ARM_CAP_MTE",
                "with ea7fc1bb1cd1 \"KVM: arm64: Introduce MTE VM feature\""),)),
    Switch(
        "arm64_mte_allowed_check", ("arm64",),
        "an MTE VM's kvm_arch_prepare_memory_region refuses a VMA without VM_MTE_ALLOWED "
        "(EINVAL) and its user_mem_abort fails a cacheable fault on one (EFAULT), "
        "VM_SHARED no longer matters; before, only VM_SHARED is refused", False,
        (Change((6, 2), True, "d89585fbb308",
                "KVM: arm64: unify the tests for VMAs in memslots when MTE is enabled",
                "with c911f0d46879 \"KVM: arm64: permit all VM_MTE_ALLOWED mappings with "
                "MTE enabled\" and 2dbf12ae132c \"KVM: arm64: Simplify the "
                "sanitise_mte_tags() logic\" (kvm-arm64/mte-map-shared)"),)),
    Switch(
        "hugetlb_mte_allowed", ("host",),
        "an anonymous MAP_HUGETLB mapping gets VM_MTE_ALLOWED on an MTE CPU (by "
        "MAP_ANONYMOUS until v6.13, on purpose since 25c17c4b55de \"hugetlb: arm64: add "
        "mte support\"); the stable kernels 5.10.y to 6.12.y dropped it (\"arm64: mte: Do "
        "not allow PROT_MTE on MAP_HUGETLB user mappings\", Catalin Marinas, February "
        "2025)", False,
        (Change((5, 10), True, "9f3419315f3c",
                "arm64: mte: Add PROT_MTE support to mmap() and mprotect()"),)),
    Switch(
        "vfio_pci_mmap", ("host",),
        "how vfio-pci maps a BAR: 0 remap_pfn_range of the whole VMA at mmap, vm_pgoff the "
        "pfn; 1 the first fault remaps the whole VMA (io_remap_pfn_range), vm_pgoff the pfn; "
        "2 vm_pgoff keeps the region offset (index << 28 | page) and the first fault "
        "inserts the faulting page then the rest of the VMA (vmf_insert_pfn); 3 each fault "
        "inserts a page or a PMD/PUD special leaf (huge_fault), nothing more", 0,
        (Change((5, 8), 1, "11c4cd07ba11",
                "vfio-pci: Fault mmaps to enable vma tracking"),
         Change((6, 10), 2, "aac6db75a9fc",
                "vfio/pci: Use unmap_mapping_range()",
                "with d71a989cf5d9 \"vfio/pci: Insert full vma on mmap'd MMIO fault\", "
                "both in v6.10-rc4"),
         Change((6, 12), 3, "f9e54c3a2f5b",
                "vfio/pci: implement huge_fault support",
                "on Peter Xu's huge pfnmap series (follow_pfnmap_start, PMD/PUD special "
                "leaves: x86 both, arm64 PMD only)"))),
    Switch(
        "vfio_huge_fault_pfn_check", ("host",),
        "vfio-pci's huge_fault falls back (VM_FAULT_FALLBACK) when the leaf's pfn is not "
        "aligned to its order; before, only the address was checked", False,
        (Change((6, 13), True, "09dfc8a5f2ce",
                "vfio/pci: Fallback huge faults for unaligned pfn",
                "posted 2 January 2025 as a 6.12 regression fix; release believed"),)),
    Switch(
        "vfio_huge_fault_align", ("host",),
        "vfio-pci's huge_fault aligns the fault address down to the order and inserts the "
        "block containing it when the block lies inside the VMA; before, only a fault at "
        "an order-aligned address got a huge leaf", False,
        (Change((6, 15), True, "c1d9dac0db16",
                "vfio/pci: Align huge faults to order",
                "applied to vfio for-linus for v6.15, Cc: stable"),)),
    Switch(
        "riscv_hugetlb_lookup", ("riscv",),
        "kvm_riscv_gstage_map keeps a hugetlb VMA's size whatever the slot's layout and "
        "looks the block-aligned gfn up: 0 in every memslot (none: EFAULT), 1 in the "
        "faulting slot unchecked, 2 only where fault_supports_gstage_huge_mapping allows "
        "the block (else 2M, then 4K)", 0,
        (Change((6, 17), 1, "583c7288feb4",
                "RISC-V: KVM: Avoid re-acquiring memslot in kvm_riscv_gstage_map()"),
         Change((7, 2), 2, "49476d58f217",
                "KVM: riscv: Check hugetlb block mappings against memslot bounds",
                "release inferred from the kvm.git push of 2026-06-24 in the 7.2 cycle; "
                "real riscv 6.12.117 gives EFAULT, 7.2.13 maps 4K (row-huge-hugetlb)"))),
    Switch(
        "notifier_counts_every_range", ("x86", "arm64", "riscv"),
        "invalidate_range_start raises the in-progress count for every invalidation, "
        "even one that touches no memslot", True,
        (Change((5, 13), False, "071064f14d87",
                "KVM: Don't take mmu_lock for range invalidation unless necessary",
                "with 3039bcc74498 \"KVM: Move x86's MMU notifier memslot walkers to "
                "generic code\" in the same series"),)),
    Switch(
        "ipa_limit_off_by_one", ("arm64",),
        "prepare refuses a slot ending exactly at the IPA limit (>= instead of >); "
        "riscv's copy keeps >=", True,
        (Change((5, 12), False, "262b003d059c",
                "KVM: arm64: Fix exclusive limit for IPA size"),)),
    Switch(
        "small_memslot_limit", ("x86", "arm64"),
        "KVM_USER_MEM_SLOTS is 509 on x86 and 512 on arm64 (a slot id at or above: "
        "EINVAL); after the change 32764 / 32767", True,
        (Change((5, 12), False, "4fc096a99e01",
                "KVM: Raise the maximum number of user memslots"),)),
    Switch(
        "hugetlb_madv_dontneed", ("host",),
        "madvise(MADV_DONTNEED) accepts hugetlb mappings (before: EINVAL)", False,
        (Change((5, 18), True, "90e7e7f5ef3f",
                "mm: enable MADV_DONTNEED for hugetlb mappings"),)),
    Switch(
        "has_pre_fault_memory", ("x86",),
        "the KVM_PRE_FAULT_MEMORY vCPU ioctl exists (before: EINVAL)", False,
        (Change((6, 10), True, "bc1a5cd00211",
                "KVM: Add KVM_PRE_FAULT_MEMORY vcpu ioctl to pre-populate guest memory"),)),
    Switch(
        "x86_prefault_frees_obsolete_root", ("x86",),
        "kvm_mmu_reload frees an obsolete root before KVM_PRE_FAULT_MEMORY maps; before, "
        "a prefault after a memslot delete retries forever (until a signal)", False,
        (Change((6, 15), True, "20a6cff3b283",
                "KVM: x86/mmu: Check and free obsolete roots in kvm_mmu_reload()"),)),
    Switch(
        "x86_elide_flush_if_young", ("x86",),
        "x86 selects CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG: clear_flush_young ages "
        "without a TLB flush", False,
        (Change((6, 13), True, "b9883ee40d7e",
                "KVM: x86: Don't emit TLB flushes when aging SPTEs for mmu_notifiers",
                "with 2ebbe0308c29 \"KVM: Allow arch code to elide TLB flushes when aging "
                "a young page\""),)),
    Switch(
        "riscv_exec_outside_slots_injects", ("riscv",),
        "an instruction fetch outside every memslot is an instruction access fault "
        "injected into the guest (before: KVM_RUN fails with EOPNOTSUPP)", False,
        (Change((7, 2), True, None,
                "(not identified)",
                "between v6.12 and v7.2: real riscv 6.12.117 fails EOPNOTSUPP, 7.2.13 "
                "injects; 7.2 is the first release seen doing it"),)),
    Switch(
        "x86_guest_memfd", ("x86",),
        "KVM_CREATE_GUEST_MEMFD exists (CONFIG_KVM_PRIVATE_MEM, renamed "
        "CONFIG_KVM_GUEST_MEMFD in v6.18); before, the ioctl is ENOTTY", False,
        (Change((6, 8), True, None,
                "KVM: Add KVM_CREATE_GUEST_MEMFD ioctl() for guest-specific backing memory",
                "the v6.8 guest_memfd series; hash not identified here"),)),
    Switch(
        "arm64_guest_memfd", ("arm64",),
        "arm64 selects KVM_GUEST_MEMFD: KVM_CREATE_GUEST_MEMFD exists and guest_memfd "
        "slots fault through gmem_abort (before: the ioctl is EINVAL)", False,
        (Change((6, 18), True, None,
                "KVM: arm64: Enable support for guest_memfd backed memory",
                "the v6.18 guest_memfd mmap series (release believed; Debian 6.12 lacks "
                "it, 7.2 has it); hash not identified"),)),
    Switch(
        "gmem_mmap", ("x86", "arm64"),
        "guest_memfd takes GUEST_MEMFD_FLAG_MMAP and _INIT_SHARED, any VM may bind it "
        "(check_memory_region_flags), and a slot on an mmap-able file is gmem-only "
        "(every fault from the file); before, creation takes flags 0 and only a VM "
        "with private memory binds", False,
        (Change((6, 18), True, None,
                "KVM: guest_memfd: Add GUEST_MEMFD_FLAG_MMAP (first posted as "
                "GUEST_MEMFD_FLAG_SUPPORT_SHARED) and INIT_SHARED",
                "release believed (Debian 7.2/7.3 report KVM_CAP_GUEST_MEMFD_FLAGS 3); "
                "hashes not identified"),)),
    Switch(
        "gmem_bind_overlap_eexist", ("x86", "arm64"),
        "kvm_gmem_bind refuses a file range another slot already binds with EEXIST "
        "(before: EINVAL, the error it starts from)", False,
        (Change((7, 2), True, None,
                "(not identified)",
                "between v6.18 and v7.2: the v6.18-era guest_memfd.c answers EINVAL (and so "
                "did a 6.18-based host kernel), real arm64 and x86 7.2 and 7.3 answer "
                "EEXIST; 7.2 is the first release seen doing it"),)),
    Switch(
        "x86_dirty_log_initially_set", ("x86",),
        "KVM_DIRTY_LOG_MANUAL_CAPS includes KVM_DIRTY_LOG_INITIALLY_SET: "
        "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 takes args[0] 3 (new bitmaps all set, enabling "
        "logging write-protects nothing); before, only 1 (3: EINVAL)", False,
        (Change((5, 7), True, "3c9bd4006bfc",
                "KVM: x86: enable dirty log gradually in small chunks"),)),
    Switch(
        "arm64_dirty_log_initially_set", ("arm64",),
        "as x86_dirty_log_initially_set, for arm64", False,
        (Change((5, 8), True, None,
                "KVM: arm64: Support enabling dirty log gradually in small chunks",
                "Keqian Zhu; hash seen abbreviated as c862626 only; release believed; "
                "real arm64 5.10.223 accepts 3"),)),
    Switch(
        "riscv_dirty_log_initially_set", ("riscv",),
        "as x86_dirty_log_initially_set, for riscv", False,
        (Change((6, 19), True, None,
                "KVM: riscv: Support enabling dirty log gradually in small chunks",
                "Quan Zhou, Dong Yang; queued by Anup Patel for Linux 6.19 (2025-11-07); "
                "hash not identified; real riscv 6.12.117 refuses 3 with EINVAL, 7.2.13 "
                "accepts it"),)),
    Switch(
        "x86_dirty_ring", ("x86",),
        "x86 offers KVM_CAP_DIRTY_LOG_RING (the per-vCPU dirty ring, kvm/dirty_ring.py); "
        "before, KVM_ENABLE_CAP of it is EINVAL", False,
        (Change((5, 11), True, None, "KVM: X86: Implement ring-based dirty memory tracking",
                "Peter Xu's dirty ring series; release believed, hash not identified"),)),
    Switch(
        "dirty_ring_acq_rel", ("x86",),
        "x86 also offers KVM_CAP_DIRTY_LOG_RING_ACQ_REL (the ring with acquire/release "
        "ordering); before, only KVM_CAP_DIRTY_LOG_RING", False,
        (Change((6, 1), True, None,
                "KVM: Add KVM_CAP_DIRTY_LOG_RING_ACQ_REL capability and config option",
                "Marc Zyngier; release believed, hash not identified"),)),
    Switch(
        "riscv_dirty_ring", ("riscv",),
        "riscv offers the dirty ring as KVM_CAP_DIRTY_LOG_RING_ACQ_REL (not "
        "KVM_CAP_DIRTY_LOG_RING, no WITH_BITMAP); before, it is EINVAL", False,
        (Change((6, 17), True, None, "RISC-V: KVM: Enable ring-based dirty memory tracking",
                "Quan Zhou; posted June 2025, release believed, hash not identified; real "
                "riscv 6.12.117 offers no ring, 7.2.13 offers ACQ_REL (a 2 MiB size is "
                "E2BIG there) and refuses KVM_CAP_DIRTY_LOG_RING"),)),
    Switch(
        "arm64_dirty_ring", ("arm64",),
        "arm64 offers the dirty ring as KVM_CAP_DIRTY_LOG_RING_ACQ_REL, with "
        "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP; before, both are EINVAL", False,
        (Change((6, 2), True, None, "KVM: arm64: Enable ring-based dirty memory tracking",
                "Gavin Shan's series, posted November 2022 after the 6.1 merge window, "
                "with 86bdf3ebcfe1 (\"KVM: Support dirty ring in conjunction with "
                "bitmap\"); hash not identified; real arm64 6.1.176 refuses the ring "
                "(a 2 MiB size is EINVAL there, E2BIG on 7.3)"),)),
)
"""Every switch, in the order of docs/versions.md."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One behaviour set: a kernel ``release`` and, optionally, a ``mutation``.

    The boolean fields are the switches the KVM and host code read; their defaults are
    :data:`UPSTREAM_RELEASE`'s (each cites its commit; :data:`SWITCHES` holds the
    history)."""

    name: str
    description: str
    release: Release = UPSTREAM_RELEASE
    mutation: str | None = None
    page_size: int | None = None
    """The host ``PAGE_SIZE`` the name asks for with a ``-4k``/``-16k``/``-64k`` suffix,
    or None (not named: 4 KiB, unless a scenario pins another ``page_size``)."""
    # --- kernel history (SWITCHES) -------------------------------------------------
    arm64_prepare_write_check: bool = False
    """arm64 ``kvm_arch_prepare_memory_region``: EPERM for a writable slot over a VMA
    without VM_WRITE; removed in v5.5 ("KVM: arm/arm64: Remove excessive permission
    check in kvm_arch_prepare_memory_region").  riscv's copy is still there (always
    checked, kvm/riscv.py)."""
    arm64_prepare_premap: bool = False
    """arm64 prepare premaps VM_PFNMAP ranges as 4K Device pages, writable when the slot
    is (``kvm_phys_addr_ioremap``); removed in v5.14 by fd6f17bade21 ("KVM: arm64:
    Remove the creation time's mapping of MMIO regions").  From v5.5 (no EPERM) to v5.13
    a read-only PFNMAP VMA behind a writable slot got a writable premap."""
    riscv_prepare_premap: bool = False
    """riscv prepare premaps VM_PFNMAP ranges (``kvm_riscv_gstage_ioremap``), v5.16 to
    v6.17; removed in v6.18 by 8c5fa3764fac ("RISC-V: KVM: Remove automatic I/O mapping
    for VM_PFNMAP")."""
    remapped_always_writable: bool = False
    """``hva_to_pfn_remapped`` reports writable regardless of the host PTE
    (``follow_pfn``); fixed in v5.12 by bd2fae8da794 ("KVM: do not assume PTE is
    writable after follow_pfn")."""
    arm64_pfnmap_force_pte: bool = False
    """``user_mem_abort`` forces a page mapping for VM_PFNMAP VMAs; dropped in v5.14 by
    2aa53d68cee6 ("KVM: arm64: Try stage2 block mapping for host device MMIO")."""
    arm64_pfnmap_vma_block: bool = False
    """``get_vma_page_shift`` sizes a VM_PFNMAP fault from ``vm_pgoff`` congruence (v5.14,
    2aa53d68cee6) and ``user_mem_abort`` maps the frames from the block-aligned gfn's pfn
    on; a lazily populated mapping so exposes frames its owner never mapped there.
    Removed by "KVM: arm64: Don't use the VMA to size stage-2 block mappings for
    VM_PFNMAP" (mainline 7.3 cycle; stable down to 5.10)."""
    arm64_cacheable_pfnmap_check: bool = True
    """arm64 prepare refuses a cacheable VM_PFNMAP VMA (EINVAL) unless the CPU has FWB
    and DIC (v6.17, 2a8dfab26677, KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED)."""
    arm64_cacheable_pfnmap_fault: bool = True
    """arm64 ``user_mem_abort`` maps cacheable non-linear-map PFNMAP memory Normal-WB
    with FWB and DIC, EFAULT without (v6.17, 0c67288e0c8b); before, as device memory."""
    arm64_allow_any_uncached: bool = True
    """vfio-pci sets VM_ALLOW_ANY_UNCACHED and arm64 maps such device memory Normal-NC
    (v6.9, 8c47ce3e1d2c, a39d3a966a09)."""
    arm64_dic_eager_exec: bool = True
    """arm64 maps cacheable memory executable at once on a CPU with CTR_EL0.DIC (v5.10,
    the generic page-table conversion of ``user_mem_abort``)."""
    arm64_mte: bool = True
    """KVM_CAP_ARM_MTE (v5.14, 673638f434ee): MTE VMs refuse VM_SHARED VMAs."""
    arm64_mte_allowed_check: bool = True
    """MTE VMs refuse VMAs without VM_MTE_ALLOWED instead (v6.2, d89585fbb308,
    c911f0d46879)."""
    hugetlb_mte_allowed: bool = True
    """Host mm: anonymous MAP_HUGETLB gets VM_MTE_ALLOWED on an MTE CPU (v5.10 on;
    dropped by the 5.10.y-6.12.y stable kernels)."""
    vfio_pci_mmap: int = 3
    """vfio-pci's BAR mapping (:data:`~kvmmem.host.vfio.VFIO_REMAP_AT_MMAP` and
    friends): remapped at mmap (before v5.8), the whole VMA on the first fault with
    ``vm_pgoff`` the pfn (v5.8, 11c4cd07ba11), the whole VMA page by page with the
    region offset in ``vm_pgoff`` (v6.10, aac6db75a9fc), huge_fault (v6.12,
    f9e54c3a2f5b)."""
    vfio_huge_fault_pfn_check: bool = True
    """vfio-pci's huge_fault checks the pfn's alignment (v6.13, 09dfc8a5f2ce)."""
    vfio_huge_fault_align: bool = True
    """vfio-pci's huge_fault aligns the address down to the order (v6.15,
    c1d9dac0db16)."""
    x86_guest_memfd: bool = True
    """x86 has KVM_CREATE_GUEST_MEMFD (v6.8, "KVM: Add KVM_CREATE_GUEST_MEMFD ioctl() for
    guest-specific backing memory")."""
    arm64_guest_memfd: bool = True
    """arm64 has guest_memfd and ``gmem_abort`` (v6.18, believed)."""
    gmem_mmap: bool = True
    gmem_bind_overlap_eexist: bool = True
    """A file range bound twice is EEXIST (before: EINVAL); seen on real 7.2 and 7.3,
    change not identified."""
    """guest_memfd MMAP/INIT_SHARED flags, gmem-only slots, binding on any VM (v6.18,
    believed)."""
    riscv_hugetlb_lookup: int = 2
    """riscv hugetlb sizing (:data:`~kvmmem.kvm.riscv.HUGETLB_CHECKED` and friends): the
    block-aligned gfn looked up in every slot (v5.16), in the faulting slot unchecked
    (v6.17, 583c7288feb4), or the block kept only where the slot allows it (v7.2,
    49476d58f217 "KVM: riscv: Check hugetlb block mappings against memslot bounds")."""
    notifier_counts_every_range: bool = False
    """``kvm_mmu_notifier_invalidate_range_start`` raises the count for every
    invalidation, even one that touches no memslot, and records no range; until v5.13's
    071064f14d87 ("KVM: Don't take mmu_lock for range invalidation unless necessary")."""
    ipa_limit_off_by_one: bool = False
    """arm64 prepare rejects a slot ending exactly at the IPA limit (``>=``); fixed in
    v5.12 by 262b003d059c ("KVM: arm64: Fix exclusive limit for IPA size")."""
    small_memslot_limit: bool = False
    """``KVM_USER_MEM_SLOTS`` 509 (x86) / 512 (arm64) until v5.12's 4fc096a99e01 ("KVM:
    Raise the maximum number of user memslots"): 32764 / 32767 since."""
    hugetlb_madv_dontneed: bool = True
    """Host mm: ``MADV_DONTNEED`` on a hugetlb VMA works (EINVAL before v5.18's
    90e7e7f5ef3f, "mm: enable MADV_DONTNEED for hugetlb mappings")."""
    has_pre_fault_memory: bool = True
    """KVM_PRE_FAULT_MEMORY exists: v6.10, bc1a5cd00211 ("KVM: Add KVM_PRE_FAULT_MEMORY
    vcpu ioctl to pre-populate guest memory")."""
    x86_prefault_frees_obsolete_root: bool = True
    """x86 ``kvm_mmu_reload`` frees an obsolete root (v6.15, 20a6cff3b283 "KVM: x86/mmu:
    Check and free obsolete roots in kvm_mmu_reload()"); before, KVM_PRE_FAULT_MEMORY on
    a vCPU whose root a memslot delete made obsolete retries forever."""
    x86_elide_flush_if_young: bool = True
    """x86 selects ``CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG`` (v6.13, b9883ee40d7e "KVM:
    x86: Don't emit TLB flushes when aging SPTEs for mmu_notifiers"):
    ``kvm_mmu_notifier_clear_flush_young`` ages without a TLB flush there."""
    riscv_exec_outside_slots_injects: bool = True
    """riscv: an instruction fetch outside every memslot is an instruction access fault
    injected into the guest; before, ``gstage_page_fault``'s default case made KVM_RUN
    fail with EOPNOTSUPP.  Changed between v6.12 and v7.2, commit not identified (real
    riscv 6.12.117 fails, 7.2.13 injects): the model switches at 7.2."""
    x86_dirty_log_initially_set: bool = True
    """x86 ``KVM_DIRTY_LOG_MANUAL_CAPS`` has KVM_DIRTY_LOG_INITIALLY_SET (v5.7,
    3c9bd4006bfc "KVM: x86: enable dirty log gradually in small chunks")."""
    arm64_dirty_log_initially_set: bool = True
    """arm64 likewise (v5.8, "KVM: arm64: Support enabling dirty log gradually in small
    chunks", release believed)."""
    riscv_dirty_log_initially_set: bool = True
    """riscv likewise (v6.19, "KVM: riscv: Support enabling dirty log gradually in small
    chunks"; before, INITIALLY_SET is EINVAL)."""
    x86_dirty_ring: bool = True
    """x86 offers KVM_CAP_DIRTY_LOG_RING (v5.11, "KVM: X86: Implement ring-based dirty
    memory tracking")."""
    dirty_ring_acq_rel: bool = True
    """x86 offers KVM_CAP_DIRTY_LOG_RING_ACQ_REL too (v6.1)."""
    riscv_dirty_ring: bool = True
    """riscv offers KVM_CAP_DIRTY_LOG_RING_ACQ_REL (v6.17, "RISC-V: KVM: Enable ring-based
    dirty memory tracking", release believed; real 6.12 lacks it, 7.2 has it)."""
    arm64_dirty_ring: bool = True
    """arm64 offers KVM_CAP_DIRTY_LOG_RING_ACQ_REL and _WITH_BITMAP (v6.1, "KVM: arm64:
    Enable ring-based dirty memory tracking")."""
    # --- mutations -----------------------------------------------------------------
    invalidate_retry: bool = True
    """The fault path re-checks ``mmu_invalidate_retry`` under mmu_lock."""
    zap_flushes_tlb: bool = True
    """A stage-2 zap requests the TLB invalidation it needs."""
    gmem_invalidate: bool = True
    """A guest_memfd hole punch invalidates KVM's mappings of the range
    (``kvm_gmem_invalidate_begin``/``_end``)."""
    ring_reset_reprotects: bool = True
    """KVM_RESET_DIRTY_RINGS write-protects the reset pages again
    (``kvm_reset_dirty_gfn`` -> ``kvm_arch_mmu_enable_log_dirty_pt_masked``)."""

    @property
    def is_mutation(self) -> bool:
        """True for the deliberately broken variants."""
        return self.mutation is not None

    @property
    def version(self) -> str:
        """The release as ``X.Y``."""
        return release_text(self.release)

    def user_mem_slots(self, arch: str) -> int:
        """``KVM_USER_MEM_SLOTS`` of ``arch`` at this release."""
        if self.small_memslot_limit:
            return {"x86": 509, "arm64": 512}.get(arch, 512)
        return 32764 if arch == "x86" else 32767

    def arch_unsupported(self, arch: str) -> str | None:
        """Why ``arch`` has no KVM at this release (one line), or None."""
        merged = ARCH_MERGED.get(arch)
        if merged is not None and self.release < merged:
            return (f"{arch} KVM was merged in v{release_text(merged)}; "
                    f"variant {self.name} has none")
        return None


MUTATION_FIELDS: dict[str, tuple[str, dict[str, bool]]] = {
    "no-invalidate-retry": ("mutation: the fault path skips the mmu_invalidate_retry check",
                            {"invalidate_retry": False}),
    "remapped-no-write-check": ("mutation: hva_to_pfn_remapped ignores the host PTE write bit",
                                {"remapped_always_writable": True}),
    "no-tlb-flush": ("mutation: stage-2 zaps request no TLB invalidation",
                     {"zap_flushes_tlb": False}),
    "no-gmem-invalidate": ("mutation: a guest_memfd hole punch leaves KVM's mappings of the "
                           "range alone", {"gmem_invalidate": False}),
    "no-ring-reprotect": ("mutation: KVM_RESET_DIRTY_RINGS leaves the reset pages writable",
                          {"ring_reset_reprotects": False}),
}
MUTATIONS = tuple(MUTATION_FIELDS)


@dataclass(frozen=True, slots=True)
class Distribution:
    """A distribution kernel: a mainline ``release`` plus the switches its stable
    backports changed (``overrides``), each with the evidence for it."""

    name: str
    release: Release
    overrides: dict[str, bool]
    evidence: str


DISTRIBUTIONS: dict[str, Distribution] = {
    "debian-5.10": Distribution(
        "debian-5.10", (5, 10), {"remapped_always_writable": False},
        "Debian 5.10.223 (bullseye) carries bd2fae8da794 (\"KVM: do not assume PTE is "
        "writable after follow_pfn\", v5.12; CVE-2021-22543) through the 5.10 stable "
        "series: on the real arm64 5.10.223 machine a store to a VM_PFNMAP page whose "
        "host PTE became read-only faults (pfnmap-mprotect-after-premap.yaml)"),
    "debian-6.12": Distribution(
        "debian-6.12", (6, 12), {"arm64_pfnmap_vma_block": False,
                                 "hugetlb_mte_allowed": False,
                                 "vfio_huge_fault_pfn_check": True,
                                 "vfio_huge_fault_align": True},
        "Debian 6.12.117 (trixie) carries the stable backport of \"KVM: arm64: Don't use "
        "the VMA to size stage-2 block mappings for VM_PFNMAP\": on the real arm64 "
        "6.12.117 machine a DRM shmem buffer at a vm_pgoff-congruent address is mapped 4K "
        "and every page reads right (pfnmap-block-dmabuf.yaml); Debian 6.1.176 does not "
        "carry it.  The 6.12.y stable series also carries \"arm64: mte: Do not allow "
        "PROT_MTE on MAP_HUGETLB user mappings\" (queued for 5.10.y-6.12.y in February "
        "2025): on the real arm64 6.12.117 machine (mte=on) an MTE VM's slot over "
        "anonymous hugetlb memory is refused with EINVAL, where 7.3.4 maps it "
        "(mte-hugetlb-slot.yaml); and, believed from their Fixes/Cc: stable tags, the "
        "vfio-pci huge_fault fixes 09dfc8a5f2ce and c1d9dac0db16"),
}
"""Debian's kernels that differ from their mainline release, by the machine version
they stand for (``kvmmem machine list``); a machine without an entry is its mainline
release.  Debian's 6.1.176, 6.12.117, 7.2.13 and 7.3.4 agree with their releases on
every bundled scenario (docs/conformance.md)."""

ALIASES: dict[str, Release] = {"upstream": UPSTREAM_RELEASE, "linux-5.4": (5, 4)}
"""Names of releases: ``upstream`` and the 2019 discussion's ``linux-5.4``."""
_RELEASE = re.compile(r"(?:v|linux-)?(\d+)\.(\d+)")
PAGE_SIZE_SUFFIXES: dict[str, int] = {"4k": 4096, "16k": 16384, "64k": 65536}
"""Variant-name suffixes naming a host page size (``7.3-16k``)."""
_PAGE_SUFFIX = re.compile(r"(.+)-(4k|16k|64k)", re.IGNORECASE)


def split_page_size(name: str) -> tuple[str, int | None]:
    """``"7.3-16k"`` -> ``("7.3", 16384)``; a name without a page-size suffix -> ``(name,
    None)``."""
    m = _PAGE_SUFFIX.fullmatch(name)
    if m is None:
        return name, None
    return m.group(1), PAGE_SIZE_SUFFIXES[m.group(2).lower()]


def page_size_suffix(page_size: int) -> str:
    """``16384`` -> ``"-16k"`` (the suffix naming a host page size)."""
    return f"-{page_size >> 10}k"


def switch_values(release: Release) -> dict[str, bool | int]:
    """Every switch's value in mainline ``release``."""
    return {s.name: s.value_at(release) for s in SWITCHES}


def parse_release(text: str) -> Release:
    """``"6.1"`` (or ``v6.1``, ``linux-6.1``, ``upstream``) -> ``(6, 1)``; raises
    :class:`InputError` (one line) for anything that is not a release from
    :data:`FIRST_RELEASE` to :data:`UPSTREAM_RELEASE`."""
    if text in ALIASES:
        return ALIASES[text]
    m = _RELEASE.fullmatch(text)
    first, last = release_text(FIRST_RELEASE), release_text(UPSTREAM_RELEASE)
    if m is None:
        raise InputError(f"unknown variant {text!r} (known: upstream, linux-5.4, "
                         f"{', '.join(MUTATIONS)}, a release {first}..{last} such as 6.1, "
                         "RELEASE+MUTATION, with an optional page-size suffix such as "
                         "7.3-16k)")
    release = (int(m.group(1)), int(m.group(2)))
    if not FIRST_RELEASE <= release <= UPSTREAM_RELEASE \
            or release[1] > LAST_MINOR.get(release[0], -1):
        raise InputError(f"unknown variant {text!r}: not a Linux release the model knows "
                         f"({first} to {last}: 5.4-5.19, 6.0-6.19, 7.0-{last})")
    return release


def _release_variant(name: str, release: Release) -> Variant:
    if name == "upstream":
        description = f"the newest release checked against real kernels (v{release_text(release)})"
    elif name == "linux-5.4":
        description = "v5.4, the November 2019 code the memslot/VMA discussion was about"
    else:
        description = f"mainline v{release_text(release)}"
    return Variant(name, description, release, None, **switch_values(release))  # type: ignore[arg-type]


def get_variant(name: str) -> Variant:
    """The variant called ``name``: a release (``6.1``), ``upstream``, ``linux-5.4``, a
    distribution kernel (``debian-5.10``: :data:`DISTRIBUTIONS`), a mutation (on
    upstream) or ``RELEASE+MUTATION``; any of them with a host page-size suffix
    (``7.3-16k``, ``debian-6.12-16k+no-tlb-flush``).  Raises
    :class:`InputError` with one line for anything else."""
    if not isinstance(name, str):
        raise InputError(f"unknown variant {name!r}")
    base, plus, mutation = name.partition("+")
    base, page_size = split_page_size(base)
    if page_size is not None:
        variant = get_variant(base + plus + mutation)
        return dataclasses.replace(
            variant, name=name, page_size=page_size,
            description=f"{variant.description}, built with {page_size >> 10} KiB pages")
    if not plus and base in MUTATION_FIELDS:
        base, mutation = "upstream", base
    distro = DISTRIBUTIONS.get(base)
    if distro is not None:
        variant = _release_variant(base, distro.release)
        variant = dataclasses.replace(
            variant, description=f"{distro.name}: mainline v{release_text(distro.release)} "
                                 f"with its backports ({distro.evidence})",
            **distro.overrides)  # type: ignore[arg-type]
    else:
        variant = _release_variant(base, parse_release(base))
    if plus or mutation:
        if mutation not in MUTATION_FIELDS:
            raise InputError(f"variant {name}: unknown mutation {mutation!r} "
                             f"(known: {', '.join(MUTATIONS)})")
        what, fields = MUTATION_FIELDS[mutation]
        label = mutation if not plus else name
        variant = dataclasses.replace(variant, name=label, mutation=mutation,
                                      description=f"{what} (on {variant.description})")
        variant = dataclasses.replace(variant, **fields)  # type: ignore[arg-type]
    return variant


def check_variant(name: str) -> str:
    """``name`` if it names a variant (:func:`get_variant`); raises InputError else."""
    get_variant(name)
    return name


UPSTREAM = get_variant("upstream")
LINUX_5_4 = get_variant("linux-5.4")
NO_INVALIDATE_RETRY = get_variant("no-invalidate-retry")
REMAPPED_NO_WRITE_CHECK = get_variant("remapped-no-write-check")
NO_TLB_FLUSH = get_variant("no-tlb-flush")

VARIANTS: dict[str, Variant] = {
    v.name: v for v in (UPSTREAM, LINUX_5_4, NO_INVALIDATE_RETRY, REMAPPED_NO_WRITE_CHECK,
                        NO_TLB_FLUSH)
}
"""The named variants (every release ``X.Y`` in range is a variant too)."""
