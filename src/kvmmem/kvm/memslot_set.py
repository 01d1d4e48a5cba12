"""``struct kvm_memslots``: one address space's memslot set (part of
:mod:`kvmmem.kvm.memslot`, which re-exports every name here).

:class:`MemslotSet` holds the id hash, the gfn tree and the hva interval tree
(sorted key lists, :class:`MemslotKeys`, shared by the active/inactive pair of
an address space) and the generation; :func:`kvm_replace_memslot` edits one
set.  :func:`validate_memslot_set` and :func:`validate_memslot_keys` check a
set's indexes (never called by the fast paths).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator

from kvmmem.errors import ValidationError
from kvmmem.kvm.memory_slot import MemorySlot

# --- sorted integer keys ------------------------------------------------------------------


class SortedInts:
    """A sorted set of ints in chunks of at most ``2 * load`` (the layout of
    ``sortedcontainers.SortedList``, reduced to what the memslot indexes need:
    add, remove, predecessor, ordered iteration).  Every operation is a couple
    of C-level bisects on lists no longer than ``2 * load``: O(log n) plus a
    bounded memmove, whatever the number of keys."""

    __slots__ = ("_len", "_lists", "_load", "_maxes")

    def __init__(self, load: int = 256) -> None:
        self._lists: list[list[int]] = []
        self._maxes: list[int] = []
        self._load = load
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        for lst in self._lists:
            yield from lst

    def add(self, x: int) -> None:
        """Insert ``x`` (not already present)."""
        maxes = self._maxes
        self._len += 1
        if not maxes:
            self._lists.append([x])
            maxes.append(x)
            return
        pos = bisect_left(maxes, x)
        if pos == len(maxes):
            pos -= 1
            lst = self._lists[pos]
            lst.append(x)
            maxes[pos] = x
        else:
            lst = self._lists[pos]
            insort(lst, x)
        if len(lst) > self._load << 1:
            half = lst[self._load:]
            del lst[self._load:]
            maxes[pos] = lst[-1]
            self._lists.insert(pos + 1, half)
            maxes.insert(pos + 1, half[-1])

    def remove(self, x: int) -> None:
        """Remove ``x``; raises ``KeyError`` if absent."""
        maxes = self._maxes
        pos = bisect_left(maxes, x)
        if pos == len(maxes):
            raise KeyError(x)
        lst = self._lists[pos]
        i = bisect_left(lst, x)
        if lst[i] != x:
            raise KeyError(x)
        del lst[i]
        self._len -= 1
        if lst:
            maxes[pos] = lst[-1]
        else:
            del self._lists[pos]
            del maxes[pos]

    def floor(self, x: int) -> int | None:
        """The largest key ``<= x``, or ``None``."""
        maxes = self._maxes
        pos = bisect_right(maxes, x)
        if pos < len(maxes):
            lst = self._lists[pos]
            i = bisect_right(lst, x)
            if i:
                return lst[i - 1]
        if pos:
            return maxes[pos - 1]
        return None

    def irange(self, lo: int, hi: int) -> Iterator[int]:
        """Keys ``k`` with ``lo <= k <= hi``, ascending."""
        lists = self._lists
        pos = bisect_left(self._maxes, lo)
        if pos == len(lists):
            return
        lst = lists[pos]
        for j in range(bisect_left(lst, lo), len(lst)):
            k = lst[j]
            if k > hi:
                return
            yield k
        for lst in lists[pos + 1:]:
            for k in lst:
                if k > hi:
                    return
                yield k


# --- one memslot set ---------------------------------------------------------------------


class MemslotKeys:
    """The sorted keys of the two sets of one address space.

    The kernel threads every slot into one rb-tree node per set
    (``gfn_node[node_idx]``, ``hva_node[node_idx]``).  Here both sets share one
    sorted list of base gfns and one of userspace starts, holding the union of
    their keys; each set keeps its own dicts and skips keys that are not its
    own.  Outside an update the sets are equal; during one they differ by the
    one slot being changed, so a lookup skips at most a couple of keys, and a
    slot's keys are sorted in once, when the first set gets it, and sorted out
    once, when the last set drops it."""

    __slots__ = ("gfn", "hva", "page_shift")

    def __init__(self, page_shift: int = 12) -> None:
        self.page_shift = page_shift
        """The host's ``PAGE_SHIFT`` (slot sizes are in its pages)."""
        self.gfn = SortedInts()
        self.hva: dict[int, SortedInts] = {}  # size class -> keys (uaddr << 16 | id)


def _size_class(npages: int) -> int:
    return npages.bit_length() - 1


class MemslotSet:
    """``struct kvm_memslots``: the slots of one address space, as one of the
    two copies (``node_idx``) the kernel keeps.

    Indexes: slot id -> slot (the kernel's ``id_hash``); base gfn, sorted (the
    ``gfn_tree``): :meth:`search_memslots` is O(log n); userspace range (the
    ``hva_tree`` interval tree): :meth:`for_each_memslot_in_hva_range` is
    O(c log n + k) with c the number of distinct power-of-two slot sizes
    (slots are bucketed by size class so that only starts within one class
    length before the range can intersect it).  The sorted keys live in a
    :class:`MemslotKeys` shared with the sibling set."""

    __slots__ = ("_by_base", "_by_id", "_keys", "_sibling", "as_id", "generation",
                 "node_idx")

    def __init__(self, as_id: int, node_idx: int, keys: MemslotKeys | None = None) -> None:
        self.as_id = as_id
        self.node_idx = node_idx
        # kvm_create_vm(): address space i starts at generation i.
        self.generation = as_id
        self._by_id: dict[int, MemorySlot] = {}
        self._by_base: dict[int, MemorySlot] = {}
        self._keys = keys if keys is not None else MemslotKeys()
        self._sibling: MemslotSet | None = None

    @staticmethod
    def pair(as_id: int, page_shift: int = 12) -> tuple[MemslotSet, MemslotSet]:
        """The two sets of address space ``as_id`` (``node_idx`` 0 and 1), of slots
        counting pages of ``1 << page_shift`` bytes."""
        keys = MemslotKeys(page_shift)
        a = MemslotSet(as_id, 0, keys)
        b = MemslotSet(as_id, 1, keys)
        a._sibling = b
        b._sibling = a
        return a, b

    # --- lookups -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_id)

    def id_to_memslot(self, id: int) -> MemorySlot | None:
        """``id_to_memslot()``: the slot with this id, or ``None``."""
        return self._by_id.get(id)

    def _floor_base(self, gfn: int) -> int | None:
        """This set's largest base gfn ``<= gfn``."""
        keys = self._keys.gfn
        by_base = self._by_base
        base = keys.floor(gfn)
        while base is not None and base not in by_base:
            base = keys.floor(base - 1) if base else None
        return base

    def search_memslots(self, gfn: int) -> MemorySlot | None:
        """``search_memslots()`` / ``__gfn_to_memslot()``: the slot whose gfn
        range holds ``gfn`` (INVALID slots included, as in the kernel), or
        ``None``.  O(log n)."""
        base = self._floor_base(gfn)
        if base is None:
            return None
        slot = self._by_base[base]
        if gfn < base + slot.npages:
            return slot
        return None

    gfn_to_memslot = search_memslots

    def for_each_memslot(self) -> Iterator[MemorySlot]:
        """``kvm_for_each_memslot()``: every slot, in gfn order."""
        by_base = self._by_base
        for base in self._keys.gfn:
            slot = by_base.get(base)
            if slot is not None:
                yield slot

    def for_each_memslot_in_gfn_range(self, start: int, end: int) -> Iterator[MemorySlot]:
        """``kvm_for_each_memslot_in_gfn_range()``: slots intersecting
        ``[start, end)``, in gfn order.  O(log n + k)."""
        if start >= end:
            return
        by_base = self._by_base
        lo = self._floor_base(start)
        if lo is None or lo + by_base[lo].npages <= start:
            lo = start
        for base in self._keys.gfn.irange(lo, end - 1):
            slot = by_base.get(base)
            if slot is not None:
                yield slot

    def for_each_memslot_in_hva_range(self, start: int, end: int) -> list[MemorySlot]:
        """``kvm_for_each_memslot_in_hva_range()``: slots whose userspace range
        intersects ``[start, end)``, in address order (ties by id)."""
        if start >= end:
            return []
        found: list[tuple[int, MemorySlot]] = []
        by_id = self._by_id
        classes = self._keys.hva
        page_shift = self._keys.page_shift
        for cls, keys in classes.items():
            # A slot of this class is shorter than 2 ** (cls + 1) pages.
            lo = start - (2 << (cls + page_shift)) + 1
            for key in keys.irange(lo << 16 if lo > 0 else 0, ((end - 1) << 16) | 0xFFFF):
                slot = by_id.get(key & 0xFFFF)
                if slot is None or slot.userspace_addr != key >> 16 \
                        or _size_class(slot.npages) != cls:
                    continue  # the sibling's key
                if slot.userspace_addr + (slot.npages << page_shift) > start:
                    found.append((key, slot))
        if len(classes) > 1:
            found.sort(key=lambda ks: ks[0])
        return [slot for _, slot in found]

def kvm_replace_memslot(slots: MemslotSet, old: MemorySlot | None,
                        new: MemorySlot | None) -> None:
    """``kvm_replace_memslot()`` on one set: ``old`` -> ``new`` (either may be
    ``None`` for an insert or a removal).

    A replacement with the same geometry (INVALID copy, FLAGS_ONLY, restore)
    swaps the object in O(1).  Otherwise ``old``'s keys leave the shared key
    lists unless the sibling set still holds them, and ``new``'s enter them
    unless the sibling already did: O(log n)."""
    by_id = slots._by_id
    by_base = slots._by_base
    if old is not None:
        if new is not None and old.base_gfn == new.base_gfn and old.npages == new.npages \
                and old.userspace_addr == new.userspace_addr:
            by_id[new.id] = new
            by_base[new.base_gfn] = new
            return
        del by_id[old.id]
        del by_base[old.base_gfn]
        keys = slots._keys
        other = slots._sibling
        twin = other._by_id.get(old.id) if other is not None else None
        if other is None or old.base_gfn not in other._by_base:
            keys.gfn.remove(old.base_gfn)
        if twin is None or twin.userspace_addr != old.userspace_addr \
                or twin.npages.bit_length() != old.npages.bit_length():
            cls = old.npages.bit_length() - 1
            lst = keys.hva[cls]
            lst.remove((old.userspace_addr << 16) | old.id)
            if not lst:
                del keys.hva[cls]
    if new is not None:
        by_id[new.id] = new
        by_base[new.base_gfn] = new
        keys = slots._keys
        other = slots._sibling
        twin = other._by_id.get(new.id) if other is not None else None
        if other is None or new.base_gfn not in other._by_base:
            keys.gfn.add(new.base_gfn)
        if twin is None or twin.userspace_addr != new.userspace_addr \
                or twin.npages.bit_length() != new.npages.bit_length():
            cls = new.npages.bit_length() - 1
            lst2 = keys.hva.get(cls)
            if lst2 is None:
                lst2 = keys.hva[cls] = SortedInts()
            lst2.add((new.userspace_addr << 16) | new.id)


# --- consistency checks (never called by the fast paths) --------------------------------


def validate_memslot_set(slots: MemslotSet) -> None:
    """Check one set's indexes against each other: ids, sorted and
    non-overlapping gfn ranges, its keys present in the shared key lists.
    Raises :class:`ValidationError`."""
    inv = "memslot-set"
    if len(slots._by_id) != len(slots._by_base):
        raise ValidationError(inv, f"as {slots.as_id}: index sizes differ")
    prev_end = -1
    seen = 0
    for slot in slots.for_each_memslot():
        seen += 1
        if slots._by_id.get(slot.id) is not slot:
            raise ValidationError(inv, f"{slot!r} not in the id index")
        if slot.as_id != slots.as_id or slot.npages <= 0:
            raise ValidationError(inv, f"{slot!r} misfiled")
        if slot.base_gfn < prev_end:
            raise ValidationError(inv, f"{slot!r} overlaps the previous slot")
        prev_end = slot.base_gfn + slot.npages
        hva = slots._keys.hva.get(_size_class(slot.npages))
        key = (slot.userspace_addr << 16) | slot.id
        if hva is None or key not in list(hva.irange(key, key)):
            raise ValidationError(inv, f"{slot!r} missing from the hva keys")
    if seen != len(slots._by_id):
        raise ValidationError(inv, f"as {slots.as_id}: gfn keys miss slots")


def validate_memslot_keys(a: MemslotSet, b: MemslotSet) -> None:
    """The shared keys of a pair of sets are exactly the union of their keys.
    Raises :class:`ValidationError`."""
    keys = a._keys
    gfn = sorted(set(a._by_base) | set(b._by_base))
    if list(keys.gfn) != gfn or len(keys.gfn) != len(gfn):
        raise ValidationError("memslot-keys", f"as {a.as_id}: stale gfn keys")
    hva = sorted({(s.userspace_addr << 16) | s.id for st in (a, b) for s in st._by_id.values()})
    have = sorted(k for lst in keys.hva.values() for k in lst)
    if have != hva:
        raise ValidationError("memslot-keys", f"as {a.as_id}: stale hva keys")
