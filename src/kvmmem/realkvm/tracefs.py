"""Counting one kernel tracepoint's events through tracefs (stdlib only).

A scenario's guest access may ask for ``count_faults``: how many stage-2 faults
KVM took for it.  On arm64 every stage-2 abort KVM handles passes
``kvm_handle_guest_abort``'s ``kvm_guest_fault`` tracepoint (all releases the
machines run, 5.10 to 7.3) with the faulting IPA, so counting the events inside
the access's pages is exact: a premapped page or a page under an existing block
takes none.  The other architectures have no
tracepoint of the same reach here, so their real outcomes carry no count.
"""

from __future__ import annotations

import contextlib
import os

ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
FAULT_EVENTS = {"arm64": "kvm/kvm_guest_fault"}
"""The tracepoint that fires once per stage-2 fault KVM handles, per architecture."""


class EventCounter:
    """Counts ``event`` (``group/name``) between :meth:`reset` and :meth:`count`;
    :meth:`close` disables it again.  :meth:`open` returns None where tracefs or the
    event is missing (not mounted, not root, tracing compiled out)."""

    def __init__(self, root: str, event: str) -> None:
        self.root = root
        self.event = event
        self.name = event.rsplit("/", 1)[1]
        self._write(f"events/{event}/enable", "1")

    @classmethod
    def open(cls, event: str) -> EventCounter | None:
        """An enabled counter of ``event``, or None when this kernel cannot give one."""
        for root in ROOTS:
            if os.path.exists(f"{root}/events/{event}/enable"):
                try:
                    return cls(root, event)
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
        """The events of :attr:`event` since the last :meth:`reset` whose ``ipa`` field
        lies in ``[lo, hi)`` (the harness's own exits, its doorbell and code pages,
        fault elsewhere and are not counted)."""
        marker = f" {self.name}:"
        n = 0
        with open(f"{self.root}/trace") as f:
            for line in f:
                if line.startswith("#") or marker not in line:
                    continue
                _, _, rest = line.partition(" ipa ")
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
