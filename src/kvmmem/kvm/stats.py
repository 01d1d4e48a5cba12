"""Counters and the event log of a VM.

Counter names are those of KVM's binary stats (``KVM_GET_STATS_FD``; see
kvm-on-this-host.md §3.7) where the kernel has one, so a model run and a real
run can be read side by side: ``pf_taken``, ``pf_fixed``, ``pf_emulate``,
``pf_spurious``, ``pf_fast``, ``mmio_exits``, ``exits``, ``pages_4k``,
``pages_2m``, ``pages_1g``, ``remote_tlb_flush``,
``remote_tlb_flush_requests``, ``mmu_shadow_zapped``.  kvmmem adds a few of
its own (``pf_retry``, ``pf_efault``, ``prefault_pages``,
``notifier_invalidations``, ``premapped_pages``), and for an arm64 host with 16 KiB or
64 KiB pages the live leaves of its sizes (``pages_16k``, ``pages_32m``; ``pages_64k``,
``pages_512m``: :data:`PAGE_SIZE_LEAF_COUNTERS`).

The event log uses the kernel's tracepoint names (``kvm_mmu_spte_requested``,
``kvm_mmu_set_spte``, ``kvm_unmap_hva_range``, ``kvm_mmio``,
``kvm_set_user_memory_region``, ``kvm_age_hva``, ``kvm_userspace_exit``,
``kvm_tlb_flush``...).  Recording is off unless a log is attached, so the
fault path pays one attribute test when nobody listens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

COUNTERS: tuple[str, ...] = (
    "exits",
    "pf_taken",
    "pf_fixed",
    "pf_emulate",
    "pf_spurious",
    "pf_fast",
    "pf_retry",
    "pf_efault",
    "mmio_exits",
    "pages_4k",
    "pages_2m",
    "pages_1g",
    "remote_tlb_flush",
    "remote_tlb_flush_requests",
    "mmu_shadow_zapped",
    "notifier_invalidations",
    "prefault_pages",
    "premapped_pages",
    "memslot_updates",
)


LEAF_SIZE_COUNTERS: dict[int, str] = {4096: "pages_4k", 1 << 21: "pages_2m",
                                      1 << 30: "pages_1g"}
"""Leaf size -> the counter of live stage-2 leaves of that size (4 KiB host pages)."""
PAGE_SIZE_LEAF_COUNTERS: dict[int, dict[int, str]] = {
    4096: LEAF_SIZE_COUNTERS,
    16384: {16384: "pages_16k", 32 << 20: "pages_32m"},
    65536: {65536: "pages_64k", 512 << 20: "pages_512m"},
}
"""Host page size -> its stage-2 leaf sizes' counters (arm64 16K and 64K hosts have page
and PMD blocks only: ``KVM_PGTABLE_MIN_BLOCK_LEVEL`` 2)."""


@dataclass(slots=True)
class Stats:
    """The VM's counters; ``as_dict()`` gives them by name.

    ``pages_4k``, ``pages_2m`` and ``pages_1g`` are the live stage-2 leaves of each
    size, as KVM's stats of those names are (x86 ``kvm_update_page_stats`` counts
    up on install and down on zap).  They are counted from the page table when
    read, through ``leaves`` (the VM's stage-2 leaf sizes); without it they stay 0.
    On a host with 16 KiB or 64 KiB pages (``page_size``) the counters of its leaf sizes
    follow them (:data:`PAGE_SIZE_LEAF_COUNTERS`; the 4 KiB ones stay 0).
    """

    exits: int = 0
    pf_taken: int = 0
    pf_fixed: int = 0
    pf_emulate: int = 0
    pf_spurious: int = 0
    pf_fast: int = 0
    pf_retry: int = 0
    pf_efault: int = 0
    mmio_exits: int = 0
    remote_tlb_flush: int = 0
    remote_tlb_flush_requests: int = 0
    mmu_shadow_zapped: int = 0
    notifier_invalidations: int = 0
    prefault_pages: int = 0
    premapped_pages: int = 0
    memslot_updates: int = 0
    leaves: Callable[[], Iterable[int]] | None = field(default=None, repr=False,
                                                       compare=False)
    """The sizes of the live stage-2 leaves (set by the VM)."""
    page_size: int = field(default=4096, repr=False, compare=False)
    """The host's ``PAGE_SIZE`` (which leaf counters exist)."""

    def _pages(self) -> dict[str, int]:
        counters = dict(LEAF_SIZE_COUNTERS)
        counters.update(PAGE_SIZE_LEAF_COUNTERS.get(self.page_size, {}))
        out = dict.fromkeys(counters.values(), 0)
        if self.leaves is not None:
            for size in self.leaves():
                key = counters.get(size)
                if key is not None:
                    out[key] += 1
        return out

    @property
    def pages_4k(self) -> int:
        """Live 4K stage-2 leaves."""
        return self._pages()["pages_4k"]

    @property
    def pages_2m(self) -> int:
        """Live 2M stage-2 leaves."""
        return self._pages()["pages_2m"]

    @property
    def pages_1g(self) -> int:
        """Live 1G stage-2 leaves."""
        return self._pages()["pages_1g"]

    def as_dict(self) -> dict[str, int]:
        """Every counter by name, in the order of :data:`COUNTERS` (then the leaf counters
        of a 16 KiB or 64 KiB host)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)
                  if f.name not in ("leaves", "page_size")}
        pages = self._pages()
        values.update(pages)
        out = {name: values[name] for name in COUNTERS}
        for name in pages:
            out.setdefault(name, pages[name])
        return out


@dataclass(frozen=True, slots=True)
class Event:
    """One tracepoint hit: ``seq`` orders events, ``thread`` names the actor
    (``"main"`` in a sequential run, a scenario thread name under explore)."""

    seq: int
    name: str
    thread: str
    args: dict[str, Any]

    def format(self) -> str:
        """``kvm_unmap_hva_range: start=0x7f00.. end=0x7f00..`` style text."""
        parts = []
        for key, value in self.args.items():
            if isinstance(value, int) and not isinstance(value, bool) and key != "level":
                parts.append(f"{key}={value:#x}")
            else:
                parts.append(f"{key}={value}")
        return f"{self.name}: " + " ".join(parts)


@dataclass(slots=True)
class EventLog:
    """An append-only list of :class:`Event`; ``thread`` is set by the driver."""

    events: list[Event] = field(default_factory=list)
    thread: str = "main"
    step: int = -1

    def emit(self, name: str, **args: Any) -> None:
        """Record tracepoint ``name`` with ``args``."""
        self.events.append(Event(len(self.events), name, self.thread, args))
