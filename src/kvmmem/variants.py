"""Named behaviour sets ("variants"), selectable per run.

A variant is a small set of switches that the KVM code consults at the exact
places where kernel history (or a deliberately broken mutation) differs from
today's kernel.  Every switch names the kernel change it stands for, so a
``compare`` across variants reads like a piece of KVM history.

* ``upstream`` - today's kernel (kernel-semantics.md "current").
* ``linux-5.4`` - the November 2019 code the memslot/VMA discussion was about:
  arm64 walks the VMAs in ``kvm_arch_prepare_memory_region`` (EPERM for a
  writable slot over a non-writable VMA, EINVAL for dirty logging over
  VM_PFNMAP) and premaps VM_PFNMAP regions as 4K Device pages
  (``kvm_phys_addr_ioremap``) with no notifier protocol; the remapped-PFN
  lookup (``follow_pfn``) reports every PFNMAP page writable; arm64 forces 4K
  for VM_PFNMAP faults; MMU-notifier start raises the in-progress count for
  every invalidation (no memslot filtering, no gfn range).  RISC-V KVM came
  later (v5.16) but carried the same prepare-time code until v6.18, so on
  riscv this variant means that copied behaviour.
* ``no-invalidate-retry`` - the fault path installs without re-checking the
  invalidation sequence under mmu_lock (the bug ``mmu_invalidate_retry``
  exists to prevent).
* ``remapped-no-write-check`` - ``hva_to_pfn_remapped`` ignores the host PTE's
  write bit (the bug fixed by bd2fae8da794, "KVM: do not assume PTE is
  writable after follow_pfn", v5.12), on an otherwise current kernel.
* ``no-tlb-flush`` - stage-2 zaps from the notifier and memslot paths clear
  the entries but request no TLB invalidation, so a vCPU keeps using a stale
  translation.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmmem.errors import InputError


@dataclass(frozen=True, slots=True)
class Variant:
    """One behaviour set.  Fields default to today's kernel."""

    name: str
    description: str
    # --- linux-5.4 era switches --------------------------------------------
    prepare_walks_vmas: bool = False
    """arm64/riscv ``kvm_arch_prepare_memory_region`` walks the VMAs (EPERM/EINVAL
    checks) and premaps VM_PFNMAP ranges as 4K device pages (removed from arm64
    in v5.13 by commit fd6f17bade21, from riscv in v6.18)."""
    remapped_always_writable: bool = False
    """``hva_to_pfn_remapped`` reports writable regardless of the host PTE
    (v5.4 ``follow_pfn``; fixed in v5.12 by bd2fae8da794)."""
    arm64_pfnmap_force_pte: bool = False
    """v5.4 ``user_mem_abort`` forces a page mapping for VM_PFNMAP VMAs."""
    notifier_counts_every_range: bool = False
    """v5.4 ``kvm_mmu_notifier_invalidate_range_start`` raises the count for every
    invalidation, even one that touches no memslot, and records no range."""
    ipa_limit_off_by_one: bool = False
    """v5.4 arm64 prepare rejects a slot ending exactly at the IPA limit (``>=``)."""
    has_pre_fault_memory: bool = True
    """KVM_PRE_FAULT_MEMORY exists (added in v6.10)."""
    x86_elide_flush_if_young: bool = True
    """x86 selects ``CONFIG_KVM_ELIDE_TLB_FLUSH_IF_YOUNG`` (v6.13):
    ``kvm_mmu_notifier_clear_flush_young`` ages without a TLB flush there."""
    # --- mutations ---------------------------------------------------------
    invalidate_retry: bool = True
    """The fault path re-checks ``mmu_invalidate_retry`` under mmu_lock."""
    zap_flushes_tlb: bool = True
    """A stage-2 zap requests the TLB invalidation it needs."""

    @property
    def is_mutation(self) -> bool:
        """True for the deliberately broken variants."""
        return self.name in MUTATIONS


UPSTREAM = Variant("upstream", "today's kernel (6.1x / linux-next, late 2025)")
LINUX_5_4 = Variant(
    "linux-5.4",
    "November 2019: prepare-time VMA walk and PFNMAP premap on arm64/riscv, "
    "remapped PFNs always writable",
    prepare_walks_vmas=True,
    remapped_always_writable=True,
    arm64_pfnmap_force_pte=True,
    notifier_counts_every_range=True,
    ipa_limit_off_by_one=True,
    has_pre_fault_memory=False,
    x86_elide_flush_if_young=False,
)
NO_INVALIDATE_RETRY = Variant(
    "no-invalidate-retry",
    "mutation: the fault path skips the mmu_invalidate_retry check",
    invalidate_retry=False,
)
REMAPPED_NO_WRITE_CHECK = Variant(
    "remapped-no-write-check",
    "mutation: hva_to_pfn_remapped ignores the host PTE write bit",
    remapped_always_writable=True,
)
NO_TLB_FLUSH = Variant(
    "no-tlb-flush",
    "mutation: stage-2 zaps request no TLB invalidation",
    zap_flushes_tlb=False,
)

VARIANTS: dict[str, Variant] = {
    v.name: v for v in (UPSTREAM, LINUX_5_4, NO_INVALIDATE_RETRY, REMAPPED_NO_WRITE_CHECK,
                        NO_TLB_FLUSH)
}
MUTATIONS = ("no-invalidate-retry", "remapped-no-write-check", "no-tlb-flush")


def get_variant(name: str) -> Variant:
    """The variant called ``name``; raises :class:`InputError` listing the known ones."""
    try:
        return VARIANTS[name]
    except KeyError:
        known = ", ".join(VARIANTS)
        raise InputError(f"unknown variant {name!r} (known: {known})") from None
