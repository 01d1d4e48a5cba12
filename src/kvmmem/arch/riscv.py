"""RISC-V G-stage (guest-physical) translation tables, as KVM builds them.

Format (RISC-V Privileged Architecture, "Hypervisor Extension", section
"Two-Stage Address Translation": Sv39x4 / Sv48x4 / Sv57x4 and the Sv39 PTE
format; "Svpbmt" extension; kernel ``arch/riscv/include/asm/pgtable-bits.h``,
``arch/riscv/kvm/gstage.c`` and ``mmu.c``):

* Sv39x4: 3 levels, 41-bit guest-physical addresses; Sv48x4: 4 levels, 50
  bits; Sv57x4: 5 levels, 59 bits.  The root table is widened by two bits:
  2048 entries, 16 KiB, 16 KiB aligned; the other tables have 512 entries;
* PTE bits: V 0, R 1, W 2, X 3, U 4, G 5, A 6, D 7, RSW 9:8, PPN 53:10
  (``_PAGE_PFN_SHIFT``), PBMT 62:61 (Svpbmt: 0 PMA, 1 NC, 2 IO), N 63;
  R=W=X=0 with V=1 points to the next table (``_PAGE_TABLE``);
* levels numbered as ``gstage.c`` does: 0 = 4K leaf, 1 = 2M, 2 = 1G.
  KVM maps 4K, 2M and 1G leaves.

Every G-stage leaf KVM writes has U (guest accesses count as user accesses),
A and D set (``kvm_riscv_gstage_map_page`` uses ``PAGE_READ*``/``PAGE_WRITE*``
which include ``_PAGE_BASE`` = V|A|U, then ``pte_mkdirty``), so that CPUs
that fault on clear A/D bits never do; dirty logging write-protects instead.
The prepare-time ioremap of v5.16..v6.17 (``kvm_riscv_mmu_ioremap``) used
``pgprot_noncached(PAGE_WRITE)``: PBMT=IO, not executable.
"""

from __future__ import annotations

from kvmmem.arch.pgtable import MemAttr, Perm, Stage2, TlbiKind
from kvmmem.errors import InputError
from kvmmem.types import PAGE_SHIFT

_PAGE_PRESENT = 1 << 0
_PAGE_READ = 1 << 1
_PAGE_WRITE = 1 << 2
_PAGE_EXEC = 1 << 3
_PAGE_USER = 1 << 4
_PAGE_GLOBAL = 1 << 5
_PAGE_ACCESSED = 1 << 6
_PAGE_DIRTY = 1 << 7
_PAGE_SOFT = 3 << 8
_PAGE_LEAF = _PAGE_READ | _PAGE_WRITE | _PAGE_EXEC
_PAGE_TABLE = _PAGE_PRESENT
_PAGE_PFN_SHIFT = 10
_PAGE_PFN_MASK = ((1 << 54) - 1) & ~((1 << _PAGE_PFN_SHIFT) - 1)
PBMT_SHIFT = 61
PBMT_MASK = 3 << PBMT_SHIFT
PBMT_PMA = 0
PBMT_NC = 1
PBMT_IO = 2
_PAGE_NAPOT = 1 << 63

MODES = {"sv39x4": 3, "sv48x4": 4, "sv57x4": 5}
"""hgatp.MODE names and their level counts."""


class RiscvGstage(Stage2):
    """A VM's G-stage table (``kvm->arch.pgd``).

    ``mode``: ``sv39x4`` (default), ``sv48x4`` or ``sv57x4``; ``levels`` may
    be given instead (3, 4, 5).  ``svpbmt``: the CPU has Svpbmt (memory-type
    bits exist; without it Device/NC encode as 0, as ``pgprot_noncached``
    does).  ``svadu``: the hardware sets A/D itself instead of faulting.
    """

    arch = "riscv"
    UNMAP_PARTIAL_LEAVES = False

    def __init__(self, *, mode: str | None = None, levels: int | None = None,
                 ipa_bits: int | None = None, svpbmt: bool = True, svadu: bool = False,
                 granule: int = 4096,
                 record_history: bool = False) -> None:
        if granule != 4096:
            raise InputError(f"granule: the G-stage uses 4K pages, not {granule}")
        if mode is not None:
            if mode not in MODES:
                raise InputError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
            n = MODES[mode]
        else:
            n = 3 if levels is None else levels
        if n not in (3, 4, 5):
            raise InputError(f"levels: the G-stage has 3, 4 or 5 levels, not {n}")
        ipa = 12 + 9 * n + 2
        if ipa_bits is not None and ipa_bits != ipa:
            raise InputError(f"ipa_bits: Sv{12 + 9 * n}x4 translates {ipa}-bit addresses, "
                             f"not {ipa_bits}")
        self.mode = f"sv{12 + 9 * n}x4"
        self.svpbmt = svpbmt
        self.svadu = svadu
        level_numbers = list(range(n - 1, -1, -1))
        leaf_depths = [d for d, lv in enumerate(level_numbers) if lv <= 2]
        super().__init__(
            granule=4096, ia_bits=ipa, nlevels=n, level_numbers=level_numbers,
            leaf_depths=leaf_depths, valid_mask=_PAGE_PRESENT, table_mask=_PAGE_LEAF,
            table_value=0, oa_mask=_PAGE_PFN_MASK, oa_rshift=PAGE_SHIFT - _PAGE_PFN_SHIFT,
            empty=0, table_bits=_PAGE_TABLE, young_bit=_PAGE_ACCESSED, dirty_bit=_PAGE_DIRTY,
            write_bit=_PAGE_WRITE, type_bits=[0] * n, type_mask=0, max_pa_bits=56,
            record_history=record_history)

    def _encode_leaf(self, prot: Perm, attr: MemAttr, depth: int, prefetch: bool,
                     host_writable: bool | None) -> int:
        if not (prot.read or prot.write or prot.execute):
            raise InputError("prot: a G-stage PTE with R=W=X=0 points to a table, not a page")
        if prot.write and not prot.read:
            raise InputError("prot: W without R is a reserved G-stage encoding")
        bits = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
        if prot.read:
            bits |= _PAGE_READ
        if prot.write:
            bits |= _PAGE_WRITE
        if prot.execute:
            bits |= _PAGE_EXEC
        if self.svpbmt:
            if attr is MemAttr.DEVICE:
                bits |= PBMT_IO << PBMT_SHIFT
            elif attr is MemAttr.NORMAL_NC:
                bits |= PBMT_NC << PBMT_SHIFT
        return bits

    def _decode_leaf(self, bits: int) -> tuple[Perm, MemAttr, bool, bool, bool]:
        perm = Perm(bool(bits & _PAGE_READ), bool(bits & _PAGE_WRITE), bool(bits & _PAGE_EXEC))
        pbmt = (bits & PBMT_MASK) >> PBMT_SHIFT
        attr = {PBMT_NC: MemAttr.NORMAL_NC, PBMT_IO: MemAttr.DEVICE}.get(pbmt, MemAttr.NORMAL)
        young = bool(bits & _PAGE_ACCESSED)
        return perm, attr, young, bool(bits & _PAGE_DIRTY), young or self.svadu

    def _relax_bits(self, prot: Perm) -> tuple[int, int]:
        # kvm_riscv_mmu_dirty_log_write_fault_fast: pte_mkdirty(pte_mkwrite())
        bits = ((_PAGE_READ if prot.read else 0) | (_PAGE_EXEC if prot.execute else 0)
                | (_PAGE_WRITE | _PAGE_DIRTY if prot.write else 0))
        return bits | _PAGE_ACCESSED, 0

    def _after_relax(self, gpa: int, d: int) -> None:
        # kvm_riscv_gstage_try_update_pte flushes a changed entry
        size = self._size[d]
        self._tlbi(TlbiKind.ADDR, gpa & ~(size - 1), size)

    # --- kvm_riscv_gstage_map_page ------------------------------------------------

    def _map_into_block(self, slot: int, idx: int, pte: int, d: int, gpa: int) -> int:
        # kvm_riscv_gstage_split_huge(..., flush=true)
        child = self._split_table(pte, d, gpa)
        self._write(slot, idx, pte, self._table_pte(child), gpa, d)
        self._tlbi(TlbiKind.ADDR, gpa & ~(self._size[d] - 1), self._size[d])
        return child

    def _map_over_table(self, slot: int, idx: int, old: int, new: int, d: int, gpa: int,
                        lookup: int) -> None:
        # kvm_riscv_gstage_map_page looks up the leaf mapping its gpa argument
        # first (kvm_riscv_gstage_get_leaf), the faulting gpa for hugetlb.  A
        # leaf at a smaller level whose frame, aligned to the requested size,
        # is the one being mapped only gets the new protection
        # (kvm_riscv_gstage_update_pte_prot); otherwise kvm_riscv_gstage_set_pte
        # overwrites the table pointer and flushes the leaf.
        lslot, lidx, ld, pte = self._find(lookup)
        if pte & self._V and ld > d and not self._is_table(pte, ld):
            size = self._size[d]
            if self._pa_of(pte) & ~(size - 1) == self._pa_of(new):
                small = (new & ~self._OAM) | (pte & self._OAM)
                if small != pte:
                    self._write(lslot, lidx, pte, small, lookup, ld)
                    self._tlbi(TlbiKind.ADDR, lookup & ~(self._size[ld] - 1), self._size[ld])
                return
        self._replace_table(slot, idx, old, new, d, gpa)

    def _replace_table(self, slot: int, idx: int, old: int, new: int, d: int, gpa: int) -> None:
        # The kernel does not free the overwritten table (it leaks); the model
        # frees it so that the accounting stays meaningful.
        self._write(slot, idx, old, new, gpa, d)
        self._free_subtree(self._slot_of(old), d + 1)
        self._tlbi(TlbiKind.ADDR, gpa & ~(self._size[d] - 1), self._size[d])

    def _link_split(self, slot: int, idx: int, old: int, child: int, d: int, gpa: int) -> None:
        self._write(slot, idx, old, self._table_pte(child), gpa, d)
        self._tlbi(TlbiKind.ADDR, gpa & ~(self._size[d] - 1), self._size[d])

    def describe_entry(self, raw: int, level: int) -> str:
        """The decoded fields of ``raw`` read at ``level``."""
        return describe_entry(raw, level)


def describe_entry(raw: int, level: int) -> str:
    """A G-stage PTE at ``level`` (0 = 4K) decoded."""
    if not raw & _PAGE_PRESENT:
        return "invalid"
    pa = ((raw & _PAGE_PFN_MASK) >> _PAGE_PFN_SHIFT) << PAGE_SHIFT
    if not raw & _PAGE_LEAF:
        return f"L{level} TABLE next={pa:#x}"
    size = {0: "4K", 1: "2M", 2: "1G", 3: "512G"}.get(level, "?")
    flags = "".join(c if raw & (1 << b) else "-" for c, b in
                    (("V", 0), ("R", 1), ("W", 2), ("X", 3), ("U", 4), ("G", 5), ("A", 6),
                     ("D", 7)))
    pbmt = (raw & PBMT_MASK) >> PBMT_SHIFT
    fields = [f"L{level} {size}", f"PA={pa:#x}", flags,
              f"PBMT={pbmt}({['PMA', 'NC', 'IO', 'reserved'][pbmt]})"]
    if raw & _PAGE_SOFT:
        fields.append(f"RSW={(raw & _PAGE_SOFT) >> 8}")
    if raw & _PAGE_NAPOT:
        fields.append("N=1")
    return " ".join(fields)
