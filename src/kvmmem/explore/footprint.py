"""What a transition touched: the keys of the explorer's independence relation.

Two transitions of different threads *commute* when running them in either
order from the same state reaches the same state with the same outcomes;
sleep sets (:mod:`kvmmem.explore.search`) then explore only one of the two
orders.  The explorer decides it from footprints, per transition:

* ``writes`` - what it changed, found by comparing the state before and after
  (exact, whatever code ran).  The shared state is cut into *page keys*, so
  that two vCPUs faulting different pages do not collide:

  - ``("g", gfn)``: the guest side of one page - the stage-2 leaf covering it
    (:meth:`~kvmmem.arch.pgtable.Stage2.for_each_leaf`) and every vCPU's TLB
    entry for it;
  - ``("h", hva >> PAGE_SHIFT)``: the host PTE of one page (a change of a
    whole PMD slot - a PTE table allocated or freed, a huge leaf - is a change
    of its ``PTRS_PER_PTE`` pages);
  - ``("f", pfn)``: one frame - refcount, mapcount, generation, flags, bytes;

  and *global* for everything else (VMAs, memslots, the invalidation sequence
  and range, the frame allocator, dirty logs and rings, guest_memfd files,
  memory attributes, roots, ...), compared as one digest.  A transition that
  changed anything global is dependent on every other transition.
* ``reads`` - what its result may depend on.  Nothing in the model reports
  its reads, so they are a claim, made only where it is simple: a guest
  access or a prefault (``actor: vcpu``) of the pages ``G`` reads the page
  keys of ``G`` - their stage-2 leaves, every TLB entry for them, the host
  PTE the memslot covering each maps it to, and the frames any of those
  name - and the global state.  Its writes are checked against that claim
  after it ran: a transition that wrote a page key outside it (a prefetch of
  a neighbour, a huge mapping, a frame allocated) counts as a global writer.
  Every other transition is taken to read everything.

Two transitions are independent when their lock operations commute, neither
wrote global state, neither wrote a key the other wrote and neither wrote a
key the other reads.  Representation that carries no meaning is not part of
a key: which table slot a stage-2 table got, or a PTE table allocated with
nothing in it yet (two faults that allocate in either order reach states
that differ only there, and behave alike from then on).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .threads import LockOp

if TYPE_CHECKING:
    from kvmmem.kvm.vm import Vm

Key = tuple[str, int]

_MAX_RANGE_KEYS = 1 << 12
"""A write to more pages than this (a 1 GiB leaf) counts as global: key sets stay small."""


@dataclass(frozen=True, slots=True)
class Footprint:
    """What one transition did to shared state (see the module docstring):
    ``writes`` the page keys it changed, ``glob`` whether it changed anything
    else, ``reads`` the page keys its result may depend on (None: any),
    ``locks`` the locks it took or dropped."""

    writes: frozenset[Key]
    glob: bool
    reads: frozenset[Key] | None
    locks: tuple[LockOp, ...]

    @property
    def changed(self) -> bool:
        """It changed some shared state."""
        return self.glob or bool(self.writes)

    def independent(self, other: Footprint) -> bool:
        """The two transitions (of different threads) commute."""
        if self.glob or other.glob:
            return False
        for a in self.locks:
            for b in other.locks:
                if a.name == b.name and not (a.shared and b.shared):
                    return False
        if self.writes and (other.reads is None or not self.writes.isdisjoint(other.writes)
                            or not self.writes.isdisjoint(other.reads)):
            return False
        return not other.writes or (self.reads is not None
                                    and other.writes.isdisjoint(self.reads))


LOCKS_ONLY = Footprint(frozenset(), False, None, ())
"""The footprint of a transition known to change nothing (locks added by the caller)."""


# --- views: the page-keyed state, compared between states -----------------------------------


@dataclass(slots=True)
class View:
    """The page-keyed part of one state: stage-2 leaves ``{(gpa, size): raw}``,
    TLBs ``[{gfn: (pfn, writable, executable)}]`` per vCPU, host PMD slots
    ``{pmd index: PTE table bytes or huge leaf}``, frame columns (bytes of the
    per-frame arrays) and frame contents ``{pfn: bytes}``.  ``parts`` caches
    each part's digest (parts are shared between views while unchanged)."""

    s2: dict[tuple[int, int], int]
    tlb: tuple[dict[int, tuple[int, bool, bool]], ...]
    pt: dict[int, bytes | int]
    frames: tuple[bytes, ...] | None
    content: dict[int, bytes] | None
    parts: dict[str, bytes] = field(default_factory=dict)

    def digest(self) -> bytes:
        """A digest of the whole view (each part's digest is kept for the next view)."""
        parts = self.parts
        h = hashlib.blake2b(digest_size=16)
        for name in _PARTS:
            d = parts.get(name)
            if d is None:
                d = parts[name] = _part_digest(name, getattr(self, name))
            h.update(d)
        return h.digest()


_PARTS = ("s2", "tlb", "pt", "frames", "content")


def _part_digest(name: str, part: Any) -> bytes:
    """A digest of one part in a canonical order (dict insertion order is history)."""
    if name == "tlb":
        part = tuple(sorted(t.items()) for t in part)
    elif isinstance(part, dict):
        part = sorted(part.items())
    return hashlib.blake2b(pickle.dumps(part, 4), digest_size=16).digest()


class Tracker:
    """Takes :class:`View` s of one VM and compares them (see the module docstring)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.mm = vm.mm
        self.stage2 = vm.stage2
        self.pt = vm.mm.pt
        pm = vm.mm.physmem
        self.pm = pm
        cols: list[Any] = [getattr(pm, n, None) for n in _FRAME_COLUMNS]
        content: list[Any] = [getattr(pm, n, None) for n in _FRAME_CONTENT]
        base = _ram_base_pfn()
        self.frame_columns: list[Any] | None = None
        self.frame_content: list[dict[int, bytearray]] | None = None
        if base is not None and all(hasattr(c, "typecode") for c in cols) \
                and all(isinstance(c, dict) for c in content):
            self.frame_columns = cols
            self.frame_content = content
            for name, col in zip(_FRAME_COLUMNS, cols, strict=True):
                _FRAME_TYPECODES[name] = col.typecode
        self.ram_base = base or 0
        self.vcpus = list(vm.vcpus)
        self.shift = vm.pg.page_shift
        """The VM's page size (a gfn is ``gpa >> shift``; an hva page ``hva >> shift``)."""
        self.ptes_per_pmd = vm.mm.pg.ptrs_per_pte
        """Host pages per PMD slot (the host page table's PMD index times this is the
        first hva page of the slot)."""

    @property
    def frames_keyed(self) -> bool:
        """Frames have keys (else they are global state, compared in the digest)."""
        return self.frame_columns is not None and self.frame_content is not None

    def view(self, prev: View | None = None) -> View:
        """The current :class:`View`; parts equal to ``prev``'s are ``prev``'s objects."""
        s2 = {(leaf.gpa, leaf.size): leaf.raw for leaf in self.stage2.for_each_leaf()}
        tlb = tuple({g: (e.pfn, e.writable, e.executable) for g, e in v.tlb.items()}
                    for v in self.vcpus)
        pt: dict[int, bytes | int] = {i: (s if isinstance(s, int) else s.tobytes())
                                      for i, s in self.pt.pmd.items()}
        frames: tuple[bytes, ...] | None = None
        content: dict[int, bytes] | None = None
        if self.frame_columns is not None and self.frame_content is not None:
            frames = tuple(c.tobytes() for c in self.frame_columns)
            content = {}
            for store in self.frame_content:
                for pfn, buf in store.items():
                    content[pfn] = bytes(buf)
        view = View(s2, tlb, pt, frames, content)
        if prev is not None:
            for name in _PARTS:
                old = getattr(prev, name)
                if getattr(view, name) == old:
                    setattr(view, name, old)
                    d = prev.parts.get(name)
                    if d is not None:
                        view.parts[name] = d
        return view

    def writes(self, a: View, b: View) -> tuple[frozenset[Key], bool]:
        """The page keys that differ between ``a`` and ``b``, and whether some
        difference is too large to key (then global)."""
        keys: set[Key] = set()
        glob = False
        if a.s2 is not b.s2:
            for k in a.s2.keys() ^ b.s2.keys() | {k for k in a.s2.keys() & b.s2.keys()
                                                  if a.s2[k] != b.s2[k]}:
                gpa, size = k
                n = size >> self.shift
                if n > _MAX_RANGE_KEYS:
                    glob = True
                    continue
                g0 = gpa >> self.shift
                keys.update(("g", g) for g in range(g0, g0 + n))
        if a.tlb is not b.tlb:
            for ta, tb in zip(a.tlb, b.tlb, strict=True):
                if ta is tb or ta == tb:
                    continue
                keys.update(("g", g) for g in ta.keys() ^ tb.keys())
                keys.update(("g", g) for g in ta.keys() & tb.keys() if ta[g] != tb[g])
        if a.pt is not b.pt:
            per = self.ptes_per_pmd
            for i in a.pt.keys() | b.pt.keys():
                x, y = a.pt.get(i), b.pt.get(i)
                if x == y:
                    continue
                if isinstance(x, bytes) and isinstance(y, bytes):
                    diff = np.flatnonzero(np.frombuffer(x, np.int64) != np.frombuffer(y, np.int64))
                    keys.update(("h", i * per + int(j)) for j in diff)
                elif x is None and isinstance(y, bytes) and y.count(0) == len(y):
                    continue  # an empty PTE table allocated: nothing mapped yet
                elif y is None and isinstance(x, bytes) and x.count(0) == len(x):
                    continue
                else:
                    keys.update(("h", i * per + j) for j in range(per))
        if a.frames is not b.frames:
            assert a.frames is not None and b.frames is not None
            for col, x, y in zip(_FRAME_COLUMNS, a.frames, b.frames, strict=True):
                if x == y:
                    continue
                if len(x) != len(y):
                    glob = True  # the frame arrays grew
                    continue
                dt = np.dtype(_FRAME_TYPECODES[col])
                diff = np.flatnonzero(np.frombuffer(x, dt) != np.frombuffer(y, dt))
                keys.update(("f", self.ram_base + int(j)) for j in diff)
        if a.content is not b.content:
            assert a.content is not None and b.content is not None
            ca, cb = a.content, b.content
            keys.update(("f", p) for p in ca.keys() ^ cb.keys())
            keys.update(("f", p) for p in ca.keys() & cb.keys() if ca[p] != cb[p])
        return frozenset(keys), glob

    def scope(self, gpa: int, size: int) -> frozenset[Key]:
        """The page keys a guest access or prefault of ``[gpa, gpa + size)``
        reads (see the module docstring), in the current state."""
        vm = self.vm
        mm = self.mm
        keys: set[Key] = set()
        shift = self.shift
        first = gpa >> shift
        last = (gpa + max(size, 1) - 1) >> shift
        for gfn in range(first, last + 1):
            keys.add(("g", gfn))
            hvas = []
            slot = vm.memslots.gfn_to_memslot(gfn, 0, include_invalid=True)
            if slot is not None:
                hvas.append(slot.userspace_addr + ((gfn - slot.base_gfn) << shift))
            update = vm.memslots.update_in_flight
            if update is not None:
                for s in (update.old, update.new):
                    if s is not None and s.base_gfn <= gfn < s.base_gfn + s.npages:
                        hvas.append(s.userspace_addr + ((gfn - s.base_gfn) << shift))
            for hva in hvas:
                keys.add(("h", hva >> shift))
                pte = mm.host_pte(hva)
                if pte is not None:
                    keys.add(("f", pte.pfn))
            leaf = self.stage2.walk(gfn << shift)
            if leaf is not None:
                keys.add(("f", leaf.pfn))
            for v in self.vcpus:
                e = v.tlb.get(gfn)
                if e is not None:
                    keys.add(("f", e.pfn))
        return frozenset(keys)


_FRAME_COLUMNS = ("_ref", "_map", "_gen", "_flags", "_fill")
"""PhysMem's per-frame arrays (indexed by pfn - RAM_BASE_PFN)."""
_FRAME_TYPECODES: dict[str, str] = {}
"""Each column's array typecode (``array.array`` and numpy share them), learnt from the first
tracker."""
_FRAME_CONTENT = ("_content", "_dev_content", "_foreign")
"""PhysMem's frame contents by pfn (RAM, device, other host memory)."""
FRAME_FIELDS = frozenset(_FRAME_COLUMNS + _FRAME_CONTENT)
"""What of PhysMem the frame keys cover (left out of the global digest)."""


def _ram_base_pfn() -> int | None:
    try:
        from kvmmem.host.physmem import RAM_BASE_PFN
    except ImportError:  # pragma: no cover - physmem without it: frames stay global
        return None
    return int(RAM_BASE_PFN)
