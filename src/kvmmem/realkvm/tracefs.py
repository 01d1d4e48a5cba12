"""Counting one kernel tracepoint's events through tracefs (stdlib only).

A scenario's guest access may ask for ``count_faults``: how many stage-2 faults
KVM took for it.  On arm64 every stage-2 abort KVM handles passes
``kvm_handle_guest_abort``'s ``kvm_guest_fault`` tracepoint (all releases the
machines run, 5.10 to 7.3) with the faulting IPA, so counting the events inside
the access's pages is exact: a premapped page or a page under an existing block
takes none.  On x86 with two-dimensional paging every nested page fault passes
``npf_interception``'s (``handle_ept_violation``'s) ``kvm_page_fault`` with the
faulting gpa as ``address``; under shadow paging the same tracepoint reports guest
virtual addresses, so it is used only where the TDP MMU is on (:func:`tdp_enabled`).
riscv has no tracepoint of the same reach here, so its real outcomes carry no count.
"""

from __future__ import annotations

import contextlib
import os

ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
FAULT_EVENTS = {"arm64": ("kvm/kvm_guest_fault", "ipa"),
                "x86": ("kvm/kvm_page_fault", "address")}
"""The tracepoint that fires once per stage-2 fault KVM handles, per architecture, and
the field holding the faulting guest physical address."""
TDP_PARAMETERS = ("/sys/module/kvm_amd/parameters/npt", "/sys/module/kvm_intel/parameters/ept")


def tdp_enabled(parameters: tuple[str, ...] = TDP_PARAMETERS) -> bool:
    """Whether x86 KVM here uses two-dimensional paging (``kvm_amd npt`` or ``kvm_intel
    ept`` is ``Y``)."""
    for path in parameters:
        try:
            with open(path) as f:
                if f.read().strip() in ("Y", "1"):
                    return True
        except OSError:
            continue
    return False


class EventCounter:
    """Counts ``event`` (``group/name``) between :meth:`reset` and :meth:`count`;
    :meth:`close` disables it again.  :meth:`open` returns None where tracefs or the
    event is missing (not mounted, not root, tracing compiled out)."""

    def __init__(self, root: str, event: str, field: str = "ipa") -> None:
        self.root = root
        self.event = event
        self.name = event.rsplit("/", 1)[1]
        self.field = field
        """The event's field holding the guest physical address (printed ``field 0x...``)."""
        self._write(f"events/{event}/enable", "1")

    @classmethod
    def open(cls, event: str, field: str = "ipa") -> EventCounter | None:
        """An enabled counter of ``event`` reading ``field``, or None when this kernel
        cannot give one."""
        for root in ROOTS:
            if os.path.exists(f"{root}/events/{event}/enable"):
                try:
                    return cls(root, event, field)
                except OSError:
                    return None
        return None

    def _write(self, path: str, text: str) -> None:
        with open(f"{self.root}/{path}", "w") as f:
            f.write(text)

    def reset(self) -> None:
        """Empty the trace buffer (the events seen so far are forgotten)."""
        self._write("trace", "")

    def count(self, lo: int, hi: int) -> int:
        """The events of :attr:`event` since the last :meth:`reset` whose :attr:`field`
        lies in ``[lo, hi)`` (the harness's own exits, its doorbell and code pages,
        fault elsewhere and are not counted)."""
        marker = f" {self.name}:"
        n = 0
        with open(f"{self.root}/trace") as f:
            for line in f:
                if line.startswith("#") or marker not in line:
                    continue
                _, _, rest = line.partition(f" {self.field} ")
                try:
                    ipa = int(rest.split(",", 1)[0].split()[0], 16)
                except (ValueError, IndexError):
                    continue
                n += lo <= ipa < hi
        return n

    def close(self) -> None:
        """Disable the event (idempotent; errors ignored: the machine is going away)."""
        with contextlib.suppress(OSError):
            self._write(f"events/{self.event}/enable", "0")
