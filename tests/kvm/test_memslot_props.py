"""Random KVM_SET_USER_MEMORY_REGION(2) sequences against a reference model.

The reference model is a plain dict ``(as_id, id) -> (base_gfn, npages,
userspace_addr, flags)`` with the rules of ``kvm_set_memory_region``
(kernel-semantics.md §1.5) written out naively: linear overlap scan, linear
lookups.  After every request the model and ``VmMemslots`` must agree on the
outcome (errno), the slots of every address space, gfn and hva lookups,
generations (``kvm_swap_active_memslots``: +nr_as per swap), page accounting
and dirty bitmaps; a failing request must change nothing (except what a
failed arch prepare of a MOVE leaves, I5: two more swaps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.errors import KernelError
from kvmmem.kvm.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KvmMrChange,
    KvmUserspaceMemoryRegion,
    MemorySlot,
    NoopMemslotHooks,
    SortedInts,
    VmMemslots,
    memslot_limits,
    validate_memslots,
)
from kvmmem.sync import Op

P = 4096
HVA = 0x7F00_0000_0000
SETTINGS = settings(max_examples=300, deadline=None, database=None)


class FailSomePrepares(NoopMemslotHooks):
    """kvm_arch_prepare_memory_region that refuses (EFAULT) every new slot
    whose base gfn is 7 modulo 11 - a deterministic stand-in for arch checks."""

    def prepare_memory_region(self, old: MemorySlot | None, new: MemorySlot | None,
                              change: KvmMrChange) -> Op[None] | None:
        if new is not None and new.base_gfn % 11 == 7:
            raise KernelError("EFAULT", "KVM_SET_USER_MEMORY_REGION", "model arch check")
        return None


@dataclass
class Model:
    arch: str
    user_slots: int
    nr_as: int
    task_size: int
    slots: dict[tuple[int, int], tuple[int, int, int, int]]
    gen: list[int]

    def apply(self, mem: KvmUserspaceMemoryRegion, v2: bool) -> str | None:
        """The errno the request must fail with (None: success); updates the model."""
        flags, size, gpa, uaddr = mem.flags, mem.memory_size, mem.guest_phys_addr, \
            mem.userspace_addr
        as_id, sid = mem.slot >> 16, mem.slot & 0xFFFF
        if not v2 and flags & ~3:
            return "EINVAL"
        if sid >= self.user_slots:
            return "EINVAL"
        if flags & ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY):
            return "EINVAL"
        if size % P or gpa % P or uaddr % P:
            return "EINVAL"
        if self.arch == "arm64" and (uaddr >> 56) not in (0, 0xFF if uaddr >> 55 & 1 else 0):
            return "EINVAL"
        if uaddr + size > self.task_size:
            return "EINVAL"
        if as_id >= self.nr_as:
            return "EINVAL"
        if gpa + size >= 1 << 64:
            return "EINVAL"
        npages = size // P
        if npages > KVM_MEM_MAX_NR_PAGES:
            return "EINVAL"
        key = (as_id, sid)
        old = self.slots.get(key)
        if size == 0:
            if old is None:
                return "EINVAL"
            del self.slots[key]
            self.gen[as_id] += 2 * self.nr_as
            return None
        base = gpa // P
        if old is None:
            change = "create"
        else:
            if uaddr != old[2] or npages != old[1] or (flags ^ old[3]) & KVM_MEM_READONLY:
                return "EINVAL"
            if base != old[0]:
                change = "move"
            elif flags != old[3]:
                change = "flags"
            else:
                return None
        if change != "flags":
            for (a, i), (b, n, _, _) in self.slots.items():
                if a == as_id and i != sid and b < base + npages and base < b + n:
                    return "EEXIST"
        if base % 11 == 7:
            if change == "move":
                self.gen[as_id] += 2 * self.nr_as  # invalidate + restore
            return "EFAULT"
        self.slots[key] = (base, npages, uaddr, flags)
        self.gen[as_id] += (2 if change == "move" else 1) * self.nr_as
        return None

    def slot_at(self, as_id: int, gfn: int) -> int | None:
        for (a, i), (b, n, _, _) in self.slots.items():
            if a == as_id and b <= gfn < b + n:
                return i
        return None

    def hva_ids(self, as_id: int, start: int, end: int) -> list[int]:
        hits = [(u, i) for (a, i), (_, n, u, _) in self.slots.items()
                if a == as_id and u < end and start < u + n * P]
        return [i for _, i in sorted(hits)]


page_counts = st.one_of(st.integers(0, 8), st.sampled_from([KVM_MEM_MAX_NR_PAGES + 1]))
requests = st.builds(
    lambda as_id, sid, gpa, size, uaddr, flags: KvmUserspaceMemoryRegion(
        (as_id << 16) | sid, flags, gpa, size, uaddr),
    as_id=st.sampled_from([0, 0, 0, 1, 2]),
    sid=st.one_of(st.integers(0, 4), st.sampled_from([32763, 32764, 32766, 32767, 0xFFFF])),
    gpa=st.one_of(st.integers(0, 40).map(lambda k: k * P),
                  st.sampled_from([0x800, (1 << 64) - P, 1 << 52])),
    size=st.one_of(page_counts.map(lambda n: n * P), st.sampled_from([1, P + 1])),
    uaddr=st.one_of(st.integers(0, 16).map(lambda k: HVA + k * P),
                    st.sampled_from([0, HVA + 8, 0xFFFF_8880_0000_0000,
                                     (0x5A << 56) | HVA, (1 << 47) - P])),
    flags=st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4, 8, 1 << 31]),
)


def _check(kvm: VmMemslots, model: Model, probes: list[int]) -> None:
    validate_memslots(kvm)
    total = 0
    logging = 0
    for as_id in range(model.nr_as):
        got = {s.id: (s.base_gfn, s.npages, s.userspace_addr, s.flags)
               for s in kvm.for_each_memslot(as_id)}
        want = {i: v for (a, i), v in model.slots.items() if a == as_id}
        assert got == want
        assert kvm.generation(as_id) == model.gen[as_id]
        for slot in kvm.for_each_memslot(as_id):
            total += slot.npages
            logging += slot.logging
            assert (slot.dirty_bitmap is not None) == slot.logging
            if slot.dirty_bitmap is not None:
                assert len(slot.dirty_bitmap) == slot.npages
        edges = [g for (a, _), (b, n, _, _) in model.slots.items() if a == as_id
                 for g in (b - 1, b, b + n - 1, b + n)]
        for gfn in probes + edges:
            found = kvm.gfn_to_memslot(gfn, as_id)
            assert (found.id if found else None) == model.slot_at(as_id, gfn)
        for k in probes:
            start = HVA + k * P - P // 2
            for end in (start + 1, start + 3 * P):
                ids = [s.id for s in kvm.memslots(as_id).for_each_memslot_in_hva_range(start, end)]
                assert ids == model.hva_ids(as_id, start, end)
    assert kvm.nr_memslot_pages == total
    assert kvm.nr_memslots_dirty_logging == logging


@SETTINGS
@given(arch=st.sampled_from(["x86", "arm64"]),
       ops=st.lists(st.tuples(requests, st.booleans()), max_size=40),
       probes=st.lists(st.integers(-1, 50), min_size=1, max_size=6))
def test_random_requests_match_reference_model(arch: str, ops: list[Any],
                                               probes: list[int]) -> None:
    """kvm_set_memory_region on random request sequences == the naive model:
    same errno, same slots, lookups, generations, accounting, bitmaps; a
    failing call changes nothing (bar I5), and every op's lock pauses balance."""
    limits = memslot_limits(arch)
    kvm = VmMemslots(limits, FailSomePrepares())
    model = Model(arch, limits.user_mem_slots, limits.nr_as_ids, limits.task_size_max, {},
                  list(range(limits.nr_as_ids)))
    for mem, v2 in ops:
        want = model.apply(mem, v2)
        held: dict[str, int] = {}
        got: str | None = None
        try:
            for pause in kvm.set_user_memory_region_op(mem, v2):
                step = 1 if pause.kind.value == "acquire" else -1 if pause.kind.value == "release" \
                    else 0
                held[pause.name] = held.get(pause.name, 0) + step
                assert held[pause.name] >= 0
        except KernelError as e:
            got = e.errno
        assert got == want, (mem, v2)
        assert all(v == 0 for v in held.values())
        _check(kvm, model, probes)


@SETTINGS
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300)), max_size=300),
       st.integers(1, 8))
def test_sorted_ints_against_sorted_list(steps: list[tuple[bool, int]], load: int) -> None:
    """SortedInts (the memslot key lists) behaves like a sorted set: add,
    remove, floor, irange."""
    keys = SortedInts(load=load)
    ref: set[int] = set()
    for add, v in steps:
        if add and v not in ref:
            keys.add(v)
            ref.add(v)
        elif not add and v in ref:
            keys.remove(v)
            ref.discard(v)
        srt = sorted(ref)
        assert list(keys) == srt and len(keys) == len(srt)
        below = [x for x in srt if x <= v]
        assert keys.floor(v) == (below[-1] if below else None)
        assert list(keys.irange(v - 20, v + 20)) == [x for x in srt if v - 20 <= x <= v + 20]
