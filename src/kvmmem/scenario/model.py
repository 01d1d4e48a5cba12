"""Typed, frozen objects for scenario files, format version 1 (SCENARIOS.md).

:func:`kvmmem.scenario.loader.load_scenario` turns a YAML file into a
:class:`Scenario`; every value here has already been validated (sizes parsed,
protections turned into ``PROT_*`` bits, mapping names resolved), so the
runner, the explorer and the real-KVM driver can trust the object and never
re-check the file.  Nothing here runs anything.

The objects follow the file one to one:

* :class:`Scenario` - the top level (``kvmmem``, ``name``, ``arch``, ...).
* :class:`Mapping` - a host mapping: a ``memory`` entry (and the fields of a
  :class:`HostMmap` step).
* :class:`HvaRef` - ``{memory: NAME, offset: N}``, a host virtual address
  named through a mapping (``at`` of a mapping).
* one :class:`Step` subclass per step kind; each carries its source ``line``,
  its ``index`` in its list, the ``thread`` it belongs to (``None`` for
  ``steps``) and ``expect`` (a subset of the outcome keys, or ``None``).
  Top-level ``memslots`` entries are :class:`SetMemslot` objects too.
  A class also says, for every driver, who performs it (``actor``), which
  outcome keys beyond ``result`` it can report (``reports``) and its own keys
  (:meth:`Step.args`).  :data:`AnyStep` is the union of the classes: a driver
  dispatches with one ``match`` on :func:`as_step` ending in ``assert_never``,
  so a new step kind is a type error in every driver that forgets it.

Extensions beyond SCENARIOS.md (all optional; files without them mean exactly
what the contract says):

* ``clear_dirty_log: {slot, first_page, num_pages, pages}`` - a step issuing
  KVM_CLEAR_DIRTY_LOG (``first_page`` defaults to 0; ``pages``, the bits set in the
  user bitmap, to the whole window).
* ``enable_cap: {cap, args, flags}`` - KVM_ENABLE_CAP on the VM; ``cap`` names one of
  :data:`VM_CAPS` (``manual_dirty_log_protect2``, the dirty ring's three, ``arm_mte``).
* ``mte`` (top level, bool) - arm64 KVM_CAP_ARM_MTE enabled right after KVM_CREATE_VM;
  ``cpu_features`` may name ``mte``; mapping kinds ``vfio-bar`` (a PCI BAR through
  vfio-pci, kvmmem.host.vfio) and ``device-cacheable`` (Grace-style cacheable device
  memory).
* ``dirty_ring`` (top level, bytes) and ``dirty_ring_with_bitmap`` - the VM's dirty
  ring, enabled before any vCPU (kernel-semantics.md §7.2); ``harvest_dirty_ring:
  {vcpu}`` reads a vCPU's ring (``dirty``: gfns in ring order) and
  ``reset_dirty_rings`` is KVM_RESET_DIRTY_RINGS (``reset``: the entries reset).
* ``ipa_bits`` (top level, 32..52) - the guest physical address size asked for
  at VM creation (arm64 ``KVM_VM_TYPE_ARM_IPA_SIZE``); ``None`` means the
  architecture's default.
* ``path: native | emulated`` on ``guest_read`` / ``guest_write`` /
  ``guest_exec`` - whether the access takes KVM's real fault path or the
  instruction emulator (on real KVM the guest mode decides it; see
  kvm-on-this-host.md); ``None`` leaves it to the runner.
* ``vcpu`` on ``prefault`` (default 0): the vCPU whose ioctl pre-faults.
* ``advice`` of ``host_madvise`` takes ``dontneed``, ``remove``,
  ``hugepage`` and ``nohugepage``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import ClassVar, TypeAlias

from kvmmem.errors import InputError
from kvmmem.types import EXEC_FETCH_SIZE, format_size
from kvmmem.variants import Variant, get_variant

# --- vocabularies shared with the loader ---------------------------------------

FORMAT_VERSION = 1

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4

ARCHES = ("x86", "arm64", "riscv")
GRANULES: dict[str, int] = {"4K": 4 << 10, "16K": 16 << 10, "64K": 64 << 10}
MAPPING_KINDS = (
    "anon",
    "memfd",
    "file",
    "file-shared",
    "hugetlb",
    "thp",
    "device",
    "device-lazy",
    "dmabuf",
    "guest_memfd",
    "vfio-bar",
    "device-cacheable",
)
GMEM_FLAGS: dict[str, int] = {"mmap": 1 << 0, "init_shared": 1 << 1}
"""``KVM_CREATE_GUEST_MEMFD`` flags by name (GUEST_MEMFD_FLAG_MMAP, _INIT_SHARED, v6.18)."""
VM_CAPS: dict[str, int] = {"manual_dirty_log_protect2": 168, "dirty_log_ring": 192,
                           "dirty_log_ring_acq_rel": 223,
                           "dirty_log_ring_with_bitmap": 225, "arm_mte": 205}
"""``enable_cap`` capabilities by name -> their ``KVM_CAP_*`` number
(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_CAP_DIRTY_LOG_RING, _ACQ_REL, _WITH_BITMAP,
KVM_CAP_ARM_MTE)."""
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1
ENABLE_CAP_ARGS = 4
"""``struct kvm_enable_cap`` has ``__u64 args[4]``."""
MEMORY_ATTRIBUTES: dict[str, int] = {"private": 1 << 3}
"""``KVM_SET_MEMORY_ATTRIBUTES`` attributes by name (KVM_MEMORY_ATTRIBUTE_PRIVATE, v6.8)."""
ACCESS_SIZES = (1, 2, 4, 8)
ADVICES = ("dontneed", "remove", "hugepage", "nohugepage")
GUEST_PATHS = ("native", "emulated")

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
MEMSLOT_FLAGS: dict[str, int] = {
    "log_dirty": KVM_MEM_LOG_DIRTY_PAGES,
    "readonly": KVM_MEM_READONLY,
    "guest_memfd": KVM_MEM_GUEST_MEMFD,
}

RESULTS = ("ok", "mmio", "fault", "error", "signal", "abort", "exit")
RESULT_KEYS: dict[str, tuple[str, ...]] = {
    "ok": ("value", "dirty", "remaining", "faults", "reset"),
    "mmio": ("gpa", "len", "is_write", "data", "value", "faults"),
    "fault": ("gpa", "size", "flags", "faults"),
    "error": ("errno", "faults"),
    "signal": ("signal",),
    "abort": ("abort", "faults"),
    "exit": ("exit_reason", "suberror", "faults"),
}
"""The extra keys an outcome with each ``result`` may carry (SCENARIOS.md, Outcomes)."""
EXPECT_KEYS = (
    "result",
    "value",
    "errno",
    "gpa",
    "len",
    "is_write",
    "data",
    "size",
    "flags",
    "dirty",
    "signal",
    "abort",
    "remaining",
    "exit_reason",
    "suberror",
    "faults",
    "reset",
)


def prot_letters(prot: int) -> str:
    """``PROT_*`` bits as the file writes them: ``"rw"``, ``"rx"``, ``"none"``."""
    text = "".join(c for bit, c in ((PROT_READ, "r"), (PROT_WRITE, "w"), (PROT_EXEC, "x"))
                   if prot & bit)
    return text or "none"


# --- host mappings ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HvaRef:
    """``{memory: NAME, offset: N}``: ``offset`` bytes into the range ``memory`` was given."""

    memory: str
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Mapping:
    """One host mapping (a ``memory`` entry or what a ``host_mmap`` step creates).

    ``prot`` holds ``PROT_*`` bits; ``fill`` is the byte the host writes to
    every byte right after mmap (``None``: the mapping is left untouched);
    ``at`` places it with MAP_FIXED.  Kind ``guest_memfd`` creates a
    guest_memfd of ``size`` with ``gmem_flags`` (names of :data:`GMEM_FLAGS`)
    and maps it only when they hold ``mmap``.
    """

    name: str
    size: int
    kind: str
    prot: int
    fill: int | None = None
    at: HvaRef | None = None
    line: int = 0
    gmem_flags: tuple[str, ...] = ()

    @property
    def gmem_flag_bits(self) -> int:
        """``gmem_flags`` as the uapi bit mask."""
        bits = 0
        for name in self.gmem_flags:
            bits |= GMEM_FLAGS[name]
        return bits

    @property
    def mapped(self) -> bool:
        """Whether the mapping has a host address range (a guest_memfd only with mmap)."""
        return self.kind != "guest_memfd" or "mmap" in self.gmem_flags


# --- steps -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """Fields every step carries.  ``op`` (a class attribute) is the step's YAML name.

    ``index`` is the position in ``steps`` (or in the thread's list, or in
    ``memslots``), ``line`` the 1-based source line, ``thread`` the thread's
    name (``None`` for sequential steps and top-level memslots), ``expect``
    the expected outcome keys (``None`` when the step has none).

    Class attributes: ``actor`` is who performs the step (``"vcpu"``: a guest
    access or a vCPU ioctl, on the step's ``vcpu``; ``"host"``: userspace on
    its address space; ``"kvm"``: a VM ioctl); ``reports`` the outcome keys,
    beyond ``result``, an ``ok`` outcome of the step can carry.
    """

    op: ClassVar[str] = ""
    actor: ClassVar[str] = "kvm"
    reports: ClassVar[tuple[str, ...]] = ()
    index: int
    line: int
    expect: dict[str, object] | None = None
    thread: str | None = None

    def args(self) -> dict[str, object]:
        """The step's own keys (SCENARIOS.md names, in declaration order) -> values:
        every field but ``index``, ``line``, ``expect`` and ``thread``."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in _COMMON_FIELDS}


_COMMON_FIELDS = frozenset({"index", "line", "expect", "thread"})
"""The :class:`Step` fields every step kind has (not part of its own keys)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestRead(Step):
    """``guest_read``: the guest loads ``size`` bytes at ``gpa`` on ``vcpu``."""

    op: ClassVar[str] = "guest_read"
    actor: ClassVar[str] = "vcpu"
    reports: ClassVar[tuple[str, ...]] = ("value", "faults")
    gpa: int = 0
    size: int
    vcpu: int = 0
    path: str | None = None
    count_faults: bool = False

    @property
    def access_size(self) -> int:
        """The bytes the access touches at ``gpa``."""
        return self.size


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestWrite(Step):
    """``guest_write``: the guest stores ``value`` (little-endian, ``size`` bytes) at ``gpa``."""

    op: ClassVar[str] = "guest_write"
    actor: ClassVar[str] = "vcpu"
    reports: ClassVar[tuple[str, ...]] = ("faults",)
    gpa: int = 0
    size: int
    value: int
    vcpu: int = 0
    path: str | None = None
    count_faults: bool = False

    @property
    def access_size(self) -> int:
        """The bytes the access touches at ``gpa``."""
        return self.size


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestExec(Step):
    """``guest_exec``: an instruction fetch at ``gpa`` on ``vcpu``."""

    op: ClassVar[str] = "guest_exec"
    actor: ClassVar[str] = "vcpu"
    reports: ClassVar[tuple[str, ...]] = ("faults",)
    gpa: int = 0
    vcpu: int = 0
    path: str | None = None
    count_faults: bool = False

    @property
    def access_size(self) -> int:
        """The bytes the fetch touches at ``gpa`` (:data:`~kvmmem.types.EXEC_FETCH_SIZE`)."""
        return EXEC_FETCH_SIZE


@dataclass(frozen=True, slots=True, kw_only=True)
class HostRead(Step):
    """``host_read``: a userspace load of ``size`` bytes at ``memory`` + ``offset``."""

    op: ClassVar[str] = "host_read"
    actor: ClassVar[str] = "host"
    reports: ClassVar[tuple[str, ...]] = ("value",)
    memory: str
    offset: int = 0
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HostWrite(Step):
    """``host_write``: a userspace store of ``value`` (``size`` bytes) at memory + offset."""

    op: ClassVar[str] = "host_write"
    actor: ClassVar[str] = "host"
    memory: str
    offset: int = 0
    size: int
    value: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HostMmap(Step):
    """``host_mmap``: create the mapping ``name`` (the fields of :class:`Mapping`)."""

    op: ClassVar[str] = "host_mmap"
    actor: ClassVar[str] = "host"
    name: str
    size: int
    kind: str
    prot: int
    fill: int | None = None
    at: HvaRef | None = None
    gmem_flags: tuple[str, ...] = ()

    @property
    def mapping(self) -> Mapping:
        """The :class:`Mapping` this step creates."""
        return Mapping(self.name, self.size, self.kind, self.prot, self.fill, self.at, self.line,
                       self.gmem_flags)


@dataclass(frozen=True, slots=True, kw_only=True)
class HostMunmap(Step):
    """``host_munmap``: unmap ``size`` bytes (``None``: the mapping's whole range)."""

    op: ClassVar[str] = "host_munmap"
    actor: ClassVar[str] = "host"
    memory: str
    offset: int = 0
    size: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HostMprotect(Step):
    """``host_mprotect``: change ``size`` bytes at ``memory`` + ``offset`` to ``prot`` bits."""

    op: ClassVar[str] = "host_mprotect"
    actor: ClassVar[str] = "host"
    memory: str
    offset: int = 0
    size: int
    prot: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HostMadvise(Step):
    """``host_madvise``: madvise(``advice``) on ``size`` bytes at ``memory`` + ``offset``."""

    op: ClassVar[str] = "host_madvise"
    actor: ClassVar[str] = "host"
    memory: str
    offset: int = 0
    size: int
    advice: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PunchHole(Step):
    """``punch_hole``: ``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`` of
    ``size`` bytes at ``offset`` into the file behind mapping ``memory`` (a
    memfd, a file, a guest_memfd)."""

    op: ClassVar[str] = "punch_hole"
    actor: ClassVar[str] = "host"
    memory: str
    offset: int = 0
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SetMemoryAttributes(Step):
    """``set_memory_attributes``: KVM_SET_MEMORY_ATTRIBUTES of ``size`` bytes at ``gpa``
    to ``attributes`` (names of :data:`MEMORY_ATTRIBUTES`; none: shared), with the
    ioctl's ``flags`` (0; anything else is the kernel's EINVAL)."""

    op: ClassVar[str] = "set_memory_attributes"
    gpa: int = 0
    size: int
    attributes: tuple[str, ...] = ()
    flags: int = 0

    @property
    def attribute_bits(self) -> int:
        """``attributes`` as the uapi bit mask."""
        bits = 0
        for name in self.attributes:
            bits |= MEMORY_ATTRIBUTES[name]
        return bits


@dataclass(frozen=True, slots=True, kw_only=True)
class SetMemslot(Step):
    """``set_memslot`` (KVM_SET_USER_MEMORY_REGION); also a top-level ``memslots`` entry.

    The host address is ``memory`` + ``offset`` when ``memory`` is given
    (then ``hva`` is ``None``), else the raw ``hva`` (default 0).  ``size`` 0
    deletes the slot.  ``flags`` are names from :data:`MEMSLOT_FLAGS`.
    ``guest_memfd`` names a ``guest_memfd`` mapping whose file the slot binds
    at ``guest_memfd_offset`` (KVM_SET_USER_MEMORY_REGION2; the ``guest_memfd``
    flag is given apart, as the ioctl takes it).
    """

    op: ClassVar[str] = "set_memslot"
    slot: int
    gpa: int = 0
    size: int
    memory: str | None = None
    offset: int = 0
    hva: int | None = None
    flags: tuple[str, ...] = ()
    guest_memfd: str | None = None
    guest_memfd_offset: int = 0

    @property
    def region2(self) -> bool:
        """Whether the request needs KVM_SET_USER_MEMORY_REGION2 (a guest_memfd field
        or flag)."""
        return self.guest_memfd is not None or "guest_memfd" in self.flags

    @property
    def flag_bits(self) -> int:
        """``flags`` as the uapi bit mask (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY)."""
        bits = 0
        for name in self.flags:
            bits |= MEMSLOT_FLAGS[name]
        return bits


@dataclass(frozen=True, slots=True, kw_only=True)
class Prefault(Step):
    """``prefault``: KVM_PRE_FAULT_MEMORY of ``size`` bytes at ``gpa`` on ``vcpu``."""

    op: ClassVar[str] = "prefault"
    actor: ClassVar[str] = "vcpu"
    reports: ClassVar[tuple[str, ...]] = ("remaining",)
    gpa: int = 0
    size: int
    vcpu: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class GetDirtyLog(Step):
    """``get_dirty_log``: KVM_GET_DIRTY_LOG of ``slot`` (reports; clears and re-protects
    unless manual protect is on)."""

    op: ClassVar[str] = "get_dirty_log"
    reports: ClassVar[tuple[str, ...]] = ("dirty",)
    slot: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ClearDirtyLog(Step):
    """``clear_dirty_log`` (extension): KVM_CLEAR_DIRTY_LOG of ``num_pages`` from
    ``first_page``; ``pages``: the slot's pages whose bits the user bitmap sets (``None``:
    every page of the window)."""

    op: ClassVar[str] = "clear_dirty_log"
    slot: int
    first_page: int = 0
    num_pages: int
    pages: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class EnableCap(Step):
    """``enable_cap`` (extension): KVM_ENABLE_CAP on the VM fd with capability ``cap`` (a
    name of :data:`VM_CAPS`), ``args`` (up to four u64; missing ones are 0; the field
    is ``cap_args``, as :meth:`Step.args` is taken) and ``flags``.
    ``manual_dirty_log_protect2``: ``args[0]`` is KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE (1)
    | KVM_DIRTY_LOG_INITIALLY_SET (2)."""

    op: ClassVar[str] = "enable_cap"
    cap: str
    cap_args: tuple[int, ...] = ()
    flags: int = 0

    def args(self) -> dict[str, object]:
        """The step's own keys under their file names: ``cap``, ``args``, ``flags``."""
        return {"cap": self.cap, "args": self.cap_args, "flags": self.flags}

    @property
    def cap_number(self) -> int:
        """``cap`` as its ``KVM_CAP_*`` number."""
        return VM_CAPS[self.cap]

    @property
    def all_args(self) -> tuple[int, int, int, int]:
        """``args`` padded with zeros to the struct's four."""
        a = (*self.cap_args, 0, 0, 0, 0)
        return (a[0], a[1], a[2], a[3])


@dataclass(frozen=True, slots=True, kw_only=True)
class HarvestDirtyRing(Step):
    """``harvest_dirty_ring`` (extension): the VMM reads ``vcpu``'s dirty ring from its
    fetch index, collecting the entries flagged KVM_DIRTY_GFN_F_DIRTY and flagging each
    KVM_DIRTY_GFN_F_RESET; ``dirty`` is their absolute gfns in ring order."""

    op: ClassVar[str] = "harvest_dirty_ring"
    reports: ClassVar[tuple[str, ...]] = ("dirty",)
    vcpu: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ResetDirtyRings(Step):
    """``reset_dirty_rings`` (extension): KVM_RESET_DIRTY_RINGS; ``reset`` is its return
    value, the entries reset (their pages are write-protected again)."""

    op: ClassVar[str] = "reset_dirty_rings"
    reports: ClassVar[tuple[str, ...]] = ("reset",)


AnyStep: TypeAlias = (GuestRead | GuestWrite | GuestExec | HostRead | HostWrite | HostMmap
                      | HostMunmap | HostMprotect | HostMadvise | SetMemslot | Prefault
                      | GetDirtyLog | ClearDirtyLog | PunchHole | SetMemoryAttributes
                      | EnableCap | HarvestDirtyRing | ResetDirtyRings)
"""Every step kind, in the order SCENARIOS.md lists them: what a driver's ``match`` covers."""

GuestAccess: TypeAlias = GuestRead | GuestWrite | GuestExec
"""The guest accesses (they alone can end in ``mmio``, ``fault``, ``abort``, ``exit``)."""

STEP_TYPES: dict[str, type[Step]] = {cls.op: cls for cls in AnyStep.__args__}
"""Step kind name -> class, in the order SCENARIOS.md lists them."""

GUEST_STEPS = tuple(cls.op for cls in GuestAccess.__args__)
"""The guest accesses' kind names."""


def as_step(step: Step) -> AnyStep:
    """``step`` as one of the step kinds (:data:`AnyStep`), for a ``match`` that ends in
    ``assert_never``.  Raises TypeError for a :class:`Step` of no kind (the bare base)."""
    if isinstance(step, AnyStep):
        return step
    raise TypeError(f"{type(step).__name__} is not a scenario step kind")


# --- the scenario --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated scenario file.

    Exactly one of ``steps`` (sequential) and ``threads`` (concurrent; thread
    name -> its steps, in file order) is set.  ``memory`` is ordered as in the
    file (mappings are made in that order), ``granule`` is in bytes,
    ``variant`` names a variant (:func:`kvmmem.variants.get_variant`: a release such as
    ``6.1``, ``upstream``, ``linux-5.4``, a mutation); ``variant_given`` says whether the
    file named it (``kvmmem conform`` runs a scenario that names none at the real
    kernel's release).  ``page_size`` is the host page size the file pins (bytes), None
    when it names none (the variant's suffix, else 4 KiB: :func:`host_page_size`);
    ``granule_given`` says whether it named a ``granule``.
    """

    name: str
    description: str = ""
    arches: tuple[str, ...] = ("x86",)
    variant: str = "upstream"
    granule: int = 4 << 10
    vcpus: int = 1
    memory: dict[str, Mapping] = field(default_factory=dict)
    memslots: tuple[SetMemslot, ...] = ()
    steps: tuple[Step, ...] | None = None
    threads: dict[str, tuple[Step, ...]] | None = None
    ipa_bits: int | None = None
    cpu_features: tuple[str, ...] = ()
    vm_type: str = "default"
    source: str = "<string>"
    variant_given: bool = False
    dirty_ring: int = 0
    dirty_ring_with_bitmap: bool = False
    dirty_ring_line: int = 0
    mte: bool = False
    mte_line: int = 0
    page_size: int | None = None
    granule_given: bool = False

    @property
    def is_concurrent(self) -> bool:
        """True when the scenario has ``threads`` (for ``kvmmem explore``)."""
        return self.threads is not None

    def all_steps(self) -> Iterator[Step]:
        """Every step: ``steps`` in order, or each thread's steps, thread by thread."""
        if self.steps is not None:
            yield from self.steps
        if self.threads is not None:
            for steps in self.threads.values():
                yield from steps


def host_page_size(scenario: Scenario, variant: str | Variant) -> int:
    """The host ``PAGE_SIZE`` a run of ``scenario`` as ``variant`` has: the variant's
    page-size suffix (``7.3-16k``), else the file's ``page_size``, else 4 KiB.  Raises
    :class:`InputError` naming both when the variant names a page size the file does
    not pin (a scenario written for 16 KiB pages does not run on a 4 KiB kernel)."""
    v = get_variant(variant) if isinstance(variant, str) else variant
    pinned = scenario.page_size
    if v.page_size is not None and pinned is not None and v.page_size != pinned:
        raise InputError(f"{scenario.source}: page_size: the scenario pins "
                         f"{format_size(pinned)} host pages; variant {v.name} is a kernel "
                         f"built with {format_size(v.page_size)} pages")
    return v.page_size or pinned or 4096
