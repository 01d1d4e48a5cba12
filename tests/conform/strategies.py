"""Random scenario files for the differential conformance test (and bench_conform.py):
sequences of host operations, memslot operations and guest accesses, for this host's
x86 KVM or a machine's.

:func:`scenarios` draws one sequential scenario as YAML text (for
``load_scenario_text``); see test_differential_kvm.py for what it covers.
"""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import strategies as st

PAGE = 4096
MAX_PAGES = 8
SLOT_BASES = (0x4000_0000, 0x4000_0000 + MAX_PAGES * PAGE, 0x4000_0000 + 3 * PAGE)
"""Slot placements: a base, the range right after it (adjacent slots), and one that
overlaps the first (EEXIST from ``kvm_set_memory_region``'s overlap check)."""
KINDS = ("anon", "memfd", "file", "file-shared")
PROTS = ("rw", "rw", "rw", "r", "none")
SIZES = (1, 2, 4, 8)
SLOT_IDS = (0, 1, 2)


@st.composite
def mapping_keys(draw: st.DrawFn, max_pages: int = MAX_PAGES) -> tuple[int, dict[str, Any]]:
    """``(pages, keys)`` of a host mapping: kind, prot, optional fill."""
    pages = draw(st.integers(1, max_pages))
    keys: dict[str, Any] = {"size": pages * PAGE, "kind": draw(st.sampled_from(KINDS)),
                            "prot": draw(st.sampled_from(PROTS))}
    if draw(st.booleans()):
        keys["fill"] = draw(st.integers(1, 255))
    return pages, keys


def _range(draw: st.DrawFn, pages: int) -> tuple[int, int]:
    """A page range ``(first, count)`` inside ``pages`` pages."""
    first = draw(st.integers(0, pages - 1))
    return first, draw(st.integers(1, pages - first))


def _gpa(draw: st.DrawFn, size: int, hot: list[int]) -> int:
    """A guest address for a ``size``-byte access: mostly on a page an earlier access
    used (``hot``, updated), so that faults, upgrades and zaps meet again."""
    if hot and draw(st.integers(0, 2)) > 0:
        page = draw(st.sampled_from(hot))
    else:
        page = draw(st.sampled_from(SLOT_BASES)) + draw(st.integers(0, MAX_PAGES)) * PAGE
        hot.append(page)
    if draw(st.integers(0, 9)) == 0:
        offset = PAGE - size // 2 if size > 1 else PAGE - 1  # straddles a page boundary
    else:
        offset = draw(st.integers(0, PAGE // size - 1)) * size
    return page + offset


@st.composite
def scenarios(draw: st.DrawFn, arch: str = "x86", emulated: bool = True) -> str:
    """A sequential scenario file for ``arch`` as YAML text; ``emulated``: one guest
    access in eight takes the emulated path (this host's PVM only)."""
    memory: dict[str, dict[str, Any]] = {}
    pages: dict[str, int] = {}
    for name in ("a", "b")[:draw(st.integers(1, 2))]:
        pages[name], memory[name] = draw(mapping_keys())
    names = list(memory)

    def slot_keys(slot: int) -> dict[str, Any]:
        name = draw(st.sampled_from(names))
        first, count = _range(draw, pages[name])
        keys: dict[str, Any] = {"slot": slot, "gpa": draw(st.sampled_from(SLOT_BASES)),
                                "size": count * PAGE, "memory": name, "offset": first * PAGE}
        flags = draw(st.sampled_from(((), (), (), ("readonly",), ("log_dirty",))))
        if flags:
            keys["flags"] = list(flags)
        return keys

    memslots = [slot_keys(slot) for slot in range(draw(st.integers(1, 2)))]
    steps: list[dict[str, Any]] = []
    hot: list[int] = []
    fixed = 0
    for _ in range(draw(st.integers(1, 14))):
        op = draw(st.sampled_from((
            "guest_read", "guest_read", "guest_read", "guest_write", "guest_write",
            "guest_write", "host_read", "host_write", "host_mprotect", "host_munmap",
            "host_mmap", "host_madvise", "set_memslot", "set_memslot", "get_dirty_log")))
        name = draw(st.sampled_from(names))
        if op in ("guest_read", "guest_write"):
            size = draw(st.sampled_from(SIZES))
            keys: dict[str, Any] = {"gpa": _gpa(draw, size, hot), "size": size}
            if op == "guest_write":
                keys["value"] = draw(st.integers(0, (1 << 8 * size) - 1))
            if emulated and draw(st.integers(0, 7)) == 0:
                keys["path"] = "emulated"
        elif op in ("host_read", "host_write"):
            size = draw(st.sampled_from(SIZES))
            offset = draw(st.integers(0, pages[name] * PAGE // size - 1)) * size
            keys = {"memory": name, "offset": offset, "size": size}
            if op == "host_write":
                keys["value"] = draw(st.integers(0, (1 << 8 * size) - 1))
        elif op in ("host_mprotect", "host_munmap", "host_madvise"):
            first, count = _range(draw, pages[name])
            keys = {"memory": name, "offset": first * PAGE, "size": count * PAGE}
            if op == "host_mprotect":
                keys["prot"] = draw(st.sampled_from(PROTS))
            elif op == "host_madvise":
                keys["advice"] = "dontneed"
        elif op == "host_mmap":
            first, count = _range(draw, pages[name])
            _, keys = draw(mapping_keys(count))
            keys["size"] = count * PAGE
            new = f"m{fixed}"
            fixed += 1
            keys = {"name": new, **keys, "at": {"memory": name, "offset": first * PAGE}}
            pages[new] = count
            names.append(new)
        elif op == "get_dirty_log":
            keys = {"slot": draw(st.sampled_from(SLOT_IDS))}
        else:
            slot = draw(st.sampled_from(SLOT_IDS))
            keys = {"slot": slot, "gpa": 0, "size": 0} if draw(st.integers(0, 3)) == 0 \
                else slot_keys(slot)
        steps.append({op: keys})
    doc = {"kvmmem": 1, "name": "differential", "arch": arch, "memory": memory,
           "memslots": memslots, "steps": steps}
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
