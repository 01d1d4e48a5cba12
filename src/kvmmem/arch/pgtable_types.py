"""The values the stage-2 engine (:mod:`kvmmem.arch.pgtable`) trades in:
permissions and memory types (arm64 ``enum kvm_pgtable_prot``, x86 EPT
permissions and memory type, riscv PTE permissions and PBMT), the leaves and
walk steps a walk yields, TLB invalidations and entry writes (the history
``validate_bbm`` checks), and the engine's counters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import NamedTuple, TypeAlias

import numpy as np
from numpy.typing import NDArray

TABLE_BASE = 1 << 45
"""Model physical address of table slot 0 (32 TiB): far above the frames the
host model hands out, below every format's output-address limit."""

Table: TypeAlias = NDArray[np.uint64]


class MemAttr(Enum):
    """The memory type of a mapping, as KVM chooses it."""

    NORMAL = "normal"
    """RAM: Normal write-back (arm64 MemAttr 0b1111), EPT WB + ignore-PAT."""
    NORMAL_NC = "normal-nc"
    """Normal non-cacheable (arm64 ``VM_ALLOW_ANY_UNCACHED``; riscv PBMT=NC)."""
    DEVICE = "device"
    """Device memory: arm64 Device-nGnRE, EPT UC, riscv PBMT=IO."""

    # members are singletons: identity hashing (C level) keeps the encoding
    # cache lookup in map() cheap; Enum's own __hash__ is Python code
    __hash__ = object.__hash__


class Translation(NamedTuple):
    """One page's translation as the hardware walk yields it (what a TLB caches):
    the host ``pfn`` of the page and whether the leaf allows writes and
    instruction fetches.  A tuple, so ``pfn, writable, executable = t`` works."""

    pfn: int
    writable: bool
    executable: bool


class Perm(NamedTuple):
    """Stage-2 permissions."""

    read: bool = True
    write: bool = False
    execute: bool = False

    def __str__(self) -> str:
        return ("r" if self.read else "-") + ("w" if self.write else "-") + (
            "x" if self.execute else "-")


PERM_NONE = Perm(False, False, False)
PERM_R = Perm(True, False, False)
PERM_RW = Perm(True, True, False)
PERM_RX = Perm(True, False, True)
PERM_RWX = Perm(True, True, True)
_PERMS = {(r, w, x): Perm(r, w, x) for r in (False, True) for w in (False, True)
          for x in (False, True)}
"""The eight permission sets, shared (``Perm`` is immutable): ``map`` builds none."""


class Leaf(NamedTuple):
    """One valid leaf entry as a walk finds it.

    ``gpa``/``pfn``: from :meth:`Stage2.walk` the page-aligned address that
    was walked and the frame *it* maps; from :meth:`Stage2.for_each_leaf`
    the first address of the leaf and its first frame.  ``level`` is the
    architecture's own numbering (arm64 0-3 with 3 = page; x86 PG_LEVEL
    1 = 4K, 2 = 2M, 3 = 1G; riscv 0 = 4K, 1 = 2M, 2 = 1G).  ``raw`` is the
    entry as the hardware holds it."""

    gpa: int
    pfn: int
    size: int
    level: int
    perm: Perm
    attr: MemAttr
    young: bool
    dirty: bool
    raw: int
    accessible: bool
    """False when the hardware would fault on this entry although it is valid
    (arm64 access flag clear; riscv A clear without Svadu)."""
    page_shift: int = 12
    """The granule's shift: ``pfn`` counts granule-sized (host) pages."""

    @property
    def writable(self) -> bool:
        """The entry allows writes."""
        return self.perm.write

    @property
    def executable(self) -> bool:
        """The entry allows instruction fetches."""
        return self.perm.execute

    @property
    def device(self) -> bool:
        """Mapped uncached (Device or Normal-NC), i.e. not as normal RAM."""
        return self.attr is not MemAttr.NORMAL

    @property
    def valid_for_access(self) -> bool:
        """Alias of :attr:`accessible`."""
        return self.accessible

    @property
    def base_gpa(self) -> int:
        """First address the leaf maps."""
        return self.gpa & ~(self.size - 1)

    @property
    def base_pfn(self) -> int:
        """First frame the leaf maps."""
        return self.pfn - ((self.gpa & (self.size - 1)) >> self.page_shift)


class TlbiKind(Enum):
    """What a TLB invalidation covers."""

    ADDR = "addr"
    """One entry's translation (arm64 ``TLBI IPAS2E1IS`` + level hint, riscv
    ``HFENCE.GVMA`` of one gpa, x86 ``kvm_flush_remote_tlbs_gfn``)."""
    RANGE = "range"
    """A gpa range (``kvm_tlb_flush_vmid_range``, ``kvm_flush_remote_tlbs_range``)."""
    VM = "vm"
    """Everything of the VM (``__kvm_tlb_flush_vmid``, ``kvm_flush_remote_tlbs``)."""


class Tlbi(NamedTuple):
    """One TLB invalidation of ``[gpa, gpa + size)`` (VM: gpa 0, size 0)."""

    kind: TlbiKind
    gpa: int
    size: int


class PteWrite(NamedTuple):
    """One write of an entry: the entry translating ``[gpa, gpa + size)``
    (its position in the tree) changed from ``old`` to ``new``."""

    gpa: int
    size: int
    old: int
    new: int


HistoryEvent: TypeAlias = PteWrite | Tlbi


class WalkStep(NamedTuple):
    """One entry a hardware walk reads: its level, the table holding it, the
    index, the entry's own physical address and its value."""

    level: int
    table_pa: int
    idx: int
    entry_pa: int
    raw: int


@dataclass(slots=True)
class Counters:
    """What the engine did, cumulative since creation."""

    entries_written: int = 0
    tlbi_addr: int = 0
    tlbi_range: int = 0
    tlbi_vm: int = 0
    tables_allocated: int = 0
    tables_freed: int = 0
    table_bytes: int = 0
    """Bytes of table pages live now (root included), as the hardware sees them."""
    hw_ad_updates: int = 0
    """Access/dirty bits set by the hardware walker (:meth:`Stage2.hw_access`)."""
    unmap_skipped: int = 0
    """riscv: leaves an unmap only partly covered and left in place (WARN)."""

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


TlbiListener: TypeAlias = Callable[[Tlbi], None]

