"""``kvmmem run --plot OUT.png``: the guest physical map as a picture.

One panel per memslot (a guest physical map is mostly holes, so each slot
gets its own x axis, in guest physical addresses), one row of panels per
run (architecture x variant).  Each panel has three lanes:

* ``memslot`` - the slot, labelled with its id, size and flags;
* ``backing`` - what the host has at the slot's hva range, VMA by VMA,
  coloured by mapping kind (anon, memfd, file, hugetlb, thp, device, ...);
  a hatched gap where no VMA is mapped;
* ``stage-2`` - the valid stage-2 leaves, coloured by mapping size (4K, 2M,
  1G); read-only leaves are hatched, device (uncached) leaves outlined in
  black.

The final state of the run is drawn (what ``--show maps,stage2`` prints as
text).  matplotlib is imported lazily with the non-interactive ``Agg``
backend, so nothing needs a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmmem.scenario.runner import RunResult

if TYPE_CHECKING:
    from kvmmem.kvm.vm import Vm

MAX_SLOTS = 12
"""Panels per run; further slots are listed in the figure's note."""

KIND_COLORS: dict[str, str] = {
    "anon": "#4e79a7",
    "memfd": "#59a14f",
    "file": "#edc948",
    "file-shared": "#f28e2b",
    "hugetlb": "#b07aa1",
    "thp": "#76b7b2",
    "device": "#e15759",
    "device-lazy": "#ff9da7",
    "dmabuf": "#9c755f",
}
SIZE_COLORS: dict[int, str] = {4096: "#9c9ede", 1 << 21: "#637939", 1 << 30: "#8c6d31",
                               16384: "#6b6ecf", 32 << 20: "#8ca252",
                               65536: "#393b79", 512 << 20: "#b5cf6b"}
SIZE_NAMES: dict[int, str] = {4096: "4K", 1 << 21: "2M", 1 << 30: "1G", 16384: "16K",
                              32 << 20: "32M", 65536: "64K", 512 << 20: "512M"}

LANES = ("stage-2", "backing", "memslot")


def _size_text(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size:#x}"


def _backing_spans(vm: Vm, hva: int, size: int) -> list[tuple[int, int, str]]:
    """``(offset, length, kind)`` of each VMA over ``[hva, hva+size)``; kind
    ``""`` for a hole."""
    spans: list[tuple[int, int, str]] = []
    pos = hva
    end = hva + size
    while pos < end:
        vma = vm.mm.find_vma(pos)
        if vma is None or vma.start >= end:
            spans.append((pos - hva, end - pos, ""))
            break
        if vma.start > pos:
            spans.append((pos - hva, vma.start - pos, ""))
            pos = vma.start
        stop = min(vma.end, end)
        spans.append((pos - hva, stop - pos, vma.kind.value))
        pos = stop
    return spans


def _draw_slot(ax: Any, vm: Vm, slot: Any, used: set[str]) -> None:
    gpa = slot.base_gfn << 12
    size = slot.npages << 12
    min_width = size / 80  # drawn at least this wide: a 4K leaf in 2M is under a pixel
    ax.set_xlim(gpa, gpa + size)
    ax.set_ylim(-0.5, len(LANES) - 0.5)
    ax.set_yticks(range(len(LANES)), LANES, fontsize=7)
    ax.set_xticks([gpa, gpa + size])
    ax.set_xticklabels([f"{gpa:#x}", f"{gpa + size:#x}"], fontsize=7)
    flags = [f for f, on in (("readonly", slot.readonly),
                             ("log_dirty", slot.dirty_bitmap is not None)) if on]
    title = f"slot {slot.id}: {_size_text(size)}" + (f" [{', '.join(flags)}]" if flags else "")
    ax.set_title(title, fontsize=8)
    # memslot lane
    ax.broken_barh([(gpa, size)], (1.6, 0.8), facecolors="#bab0ac", edgecolor="black",
                   linewidth=0.5)
    # backing lane
    for off, length, kind in _backing_spans(vm, slot.userspace_addr, size):
        if kind:
            used.add(kind)
            ax.broken_barh([(gpa + off, max(length, min_width))], (0.6, 0.8),
                           facecolors=KIND_COLORS.get(kind, "#cccccc"), edgecolor="white",
                           linewidth=0.3)
            if length >= size / 6:
                vma = vm.mm.find_vma(slot.userspace_addr + off)
                perms = vma.maps_perms() if vma is not None else ""
                ax.text(gpa + off + length / 2, 1.0, f"{kind} {perms}", ha="center",
                        va="center", fontsize=6, color="white")
        else:
            used.add("")
            ax.broken_barh([(gpa + off, length)], (0.6, 0.8), facecolors="white",
                           edgecolor="#888888", hatch="//", linewidth=0.3)
    # stage-2 lane, grouped by (size, writable, device) so one call draws many leaves
    groups: dict[tuple[int, bool, bool], list[tuple[int, int]]] = {}
    for leaf in vm.stage2.for_each_leaf(gpa, gpa + size):
        groups.setdefault((leaf.size, leaf.writable, leaf.device), []).append(
            (leaf.gpa, max(leaf.size, min_width)))
    for (leaf_size, writable, device), bars in groups.items():
        used.add(f"size{leaf_size}")
        if not writable:
            used.add("ro")
        if device:
            used.add("device-leaf")
        ax.broken_barh(bars, (-0.4, 0.8), facecolors=SIZE_COLORS.get(leaf_size, "#cccccc"),
                       edgecolor="black" if device or not writable else "white",
                       linewidth=0.8 if device else 0.2, hatch=None if writable else "xx")


def plot_guest_map(results: list[RunResult], path: Path) -> None:
    """Draw the final guest physical map of each run into ``path`` (PNG, or
    any format matplotlib infers from the suffix).  Raises OSError when the
    file cannot be written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = []
    for result in results:
        vm = result.vm
        assert vm is not None
        rows.append((result, vm, list(vm.memslots.all_slots())))
    ncols = max(1, min(MAX_SLOTS, max((len(s) for _, _, s in rows), default=1)))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(max(7.5, 3.2 * ncols),
                                                         1.9 * len(rows) + 1.2),
                             squeeze=False)
    notes = []
    used: set[str] = set()
    for r, (result, vm, slots) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            if c < len(slots):
                _draw_slot(ax, vm, slots[c], used)
            else:
                ax.axis("off")
                if c == 0:
                    ax.text(0.5, 0.5, "no memslots", ha="center", va="center",
                            transform=ax.transAxes)
        axes[r][0].annotate(f"{result.arch}\n{result.variant}", xy=(0, 0.5),
                            xytext=(-axes[r][0].yaxis.labelpad - 40, 0),
                            xycoords="axes fraction", textcoords="offset points",
                            ha="right", va="center", fontsize=9, fontweight="bold")
        if len(slots) > ncols:
            notes.append(f"{result.arch}/{result.variant}: {len(slots) - ncols} more slots "
                         "not drawn")
    # The legend names only what the picture uses.
    handles = [Patch(facecolor=col, label=kind) for kind, col in KIND_COLORS.items()
               if kind in used]
    if "" in used:
        handles.append(Patch(facecolor="white", edgecolor="#888888", hatch="//",
                             label="no VMA"))
    handles += [Patch(facecolor=col, label=f"stage-2 {SIZE_NAMES[size]}")
                for size, col in SIZE_COLORS.items() if f"size{size}" in used]
    if "ro" in used:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="xx",
                             label="read-only leaf"))
    if "device-leaf" in used:
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.2,
                             label="device (uncached) leaf"))
    name = results[0].scenario if results else ""
    fig.suptitle(f"{name}: guest physical map (final state)", fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=7,
                   frameon=False)
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7)
    fig.tight_layout(rect=(0.06, 0.12, 1.0, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
