"""The scenario file format, version 1, as data: every key, its type, default and meaning.

This is the one declaration of what a scenario file may hold.  The loader
(:mod:`kvmmem.scenario.loader`) builds its checks from it (which keys a
section takes, which are required, how each value is parsed), and
:func:`json_schema` turns it into a JSON Schema (draft 2020-12) for editors:
``docs/scenario.schema.json`` is that schema, regenerated with
``kvmmem schema --output docs/scenario.schema.json`` (a test keeps the two equal).

A :class:`Key` names a *type* (:data:`TYPES`): how the loader reads the value
and what the JSON Schema allows.  Structural sections (``memory``,
``memslots``, ``steps``, ``threads``) are declared here too; the loader walks
them itself, since their checks span entries (names declared before use,
duplicate slots).

What the loader checks beyond a JSON Schema (and editors therefore do not):
sizes that are page multiples (2M for hugetlb), names used before they exist,
a value that does not fit the access size, ``vcpu`` below ``vcpus``, keys of
``expect`` that no single outcome carries together, and YAML-level matters
(duplicate keys, ambiguous leading zeros).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kvmmem.scenario.model import (
    ACCESS_SIZES,
    ADVICES,
    ARCHES,
    ENABLE_CAP_ARGS,
    FORMAT_VERSION,
    GMEM_FLAGS,
    GRANULES,
    GUEST_PATHS,
    MAPPING_KINDS,
    MEMORY_ATTRIBUTES,
    MEMSLOT_FLAGS,
    RESULT_KEYS,
    RESULTS,
    VM_CAPS,
)
from kvmmem.types import CPU_FEATURES, VM_TYPES
from kvmmem.variants import MUTATIONS, VARIANTS

MAX_VCPUS = 1024
"""Upper bound of ``vcpus``."""
IPA_BITS_RANGE = (32, 52)
"""Accepted ``ipa_bits``: arm64 KVM_VM_TYPE_ARM_IPA_SIZE takes 32 up to the CPU's limit (<= 52)."""
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

TYPES: dict[str, str] = {
    "version": "the format version, 1",
    "name": "a non-empty string",
    "string": "a string",
    "arches": "an architecture or a list of them",
    "variant": "a variant: a release 5.4 .. 7.3 (6.1), upstream, linux-5.4, a mutation, "
               "or RELEASE+MUTATION, the release with an optional page-size suffix "
               "(7.3-16k) (docs/versions.md)",
    "granule": "a stage-2 granule: 4K, 16K or 64K",
    "page_size": "a host page size: 4K, 16K or 64K",
    "range": "an integer in a range",
    "size": "a size or address: an integer, hex (0x1000), or a K/M/G/T suffix (2M)",
    "u32": "an integer 0 .. 2^32 - 1",
    "u64": "an integer 0 .. 2^64 - 1",
    "access_size": "an access size: 1, 2, 4 or 8",
    "vcpu": "a vCPU index, below vcpus",
    "prot": "protection letters r, w, x (each at most once), or none",
    "fill": "a byte, 0..255",
    "choice": "one of a list of words",
    "memory": "the name of a host mapping",
    "hva_ref": "{memory: NAME, offset: N}",
    "flags": "a list of memslot flags",
    "gmem_flags": "a list of guest_memfd flags: mmap, init_shared",
    "mem_attributes": "a list of memory attributes: private",
    "cap_args": "a list of at most 4 integers 0 .. 2^64 - 1",
    "cpu_features": "a list of CPU features: fwb, dic, mte",
    "bool": "true or false",
    "errno": "an errno name (EINVAL, EEXIST, EFAULT, ...)",
    "signal": "a signal name (SIGSEGV, SIGBUS, ...)",
    "gfns": "a list of gfns",
    "pages": "a list of page numbers within a slot",
    "mappings": "a mapping of name -> host mapping",
    "memslots": "a list of memslots",
    "steps": "a list of steps",
    "threads": "a mapping of thread name -> list of steps",
}
"""Every value type a :class:`Key` may name, with how the documentation says it."""


@dataclass(frozen=True, slots=True)
class Key:
    """One key of a section: its ``name``, value ``type`` (:data:`TYPES`), whether it
    is ``required``, its ``default`` as the documentation states it (None: no
    default, the key is simply absent), and its meaning (``doc``).

    ``choices`` and ``what`` qualify a ``choice`` (the words, and how a message
    names them); ``low``/``high`` bound a ``range``."""

    name: str
    type: str
    doc: str
    required: bool = False
    default: str | None = None
    choices: tuple[str, ...] = ()
    what: str = ""
    low: int = 0
    high: int = 0


def _choice(name: str, choices: tuple[str, ...], what: str, doc: str, *,
            required: bool = False, default: str | None = None) -> Key:
    return Key(name, "choice", doc, required, default, choices, what)


# --- the top level ----------------------------------------------------------------------

TOP_KEYS: tuple[Key, ...] = (
    Key("kvmmem", "version", f"the format version: {FORMAT_VERSION}", required=True),
    Key("name", "name", "the scenario's name, used in every report", required=True),
    Key("description", "string", "free text: what the scenario shows and where the rule "
        "comes from", default='""'),
    Key("arch", "arches", "the architecture(s) it runs on and whose behaviour its "
        f"expectations describe: {', '.join(ARCHES)}, or a list", default="x86"),
    Key("variant", "variant", "the behaviour set (docs/variants.md)", default="upstream"),
    Key("page_size", "page_size", "the host kernel's page size (PAGE_SIZE, a property of "
        "its build like the release: arm64 CONFIG_ARM64_16K_PAGES / _64K_PAGES, Debian's "
        "linux-image-arm64-16k); 16K and 64K are arm64 only (x86 and riscv hosts have 4K "
        "pages).  It sets memslot alignment (EINVAL unless gpa, size and hva are "
        "page-aligned), mmap/munmap/mprotect granularity, the THP and hugetlb size (the "
        "PMD: 2M, 32M, 512M), gfns and the arm64 stage-2 granule and blocks.  Absent: the "
        "variant's page-size suffix (--variant 7.3-16k), else 4K; a variant naming "
        "another page size does not run the scenario (naming both)",
        default="4K (or the variant's -16k/-64k suffix)"),
    Key("granule", "granule", "arm64 stage-2 granule (the translation granule of the "
        "stage-2 tables): always the host's page size (kvm_get_vtcr), so it may only "
        "repeat page_size (another value is refused naming both); ignored by x86 and "
        "riscv", default="the page size"),
    Key("vcpus", "range", "how many vCPUs the VM has", default="1", low=1, high=MAX_VCPUS),
    Key("ipa_bits", "range", "the guest physical address size asked for at VM creation "
        "(arm64 KVM_VM_TYPE_ARM_IPA_SIZE); absent: the architecture's default",
        low=IPA_BITS_RANGE[0], high=IPA_BITS_RANGE[1]),
    Key("cpu_features", "cpu_features", "optional features of the host CPU the kernel "
        "asks about: arm64 fwb (FEAT_S2FWB: the stage-2 memory-type encodings) and dic "
        "(CTR_EL0.DIC: cacheable memory mapped executable at once), which together decide "
        "whether cacheable VM_PFNMAP memory is accepted and mapped cacheable (v6.17), and "
        "mte (the Memory Tagging Extension: KVM_CAP_ARM_MTE, VM_MTE_ALLOWED); ignored by "
        "x86 and riscv", default="[] (none, as QEMU's -cpu max)"),
    _choice("vm_type", tuple(VM_TYPES), "a VM type", "the KVM_CREATE_VM type: default, or "
            "sw_protected (x86 KVM_X86_SW_PROTECTED_VM, v6.8: private memory, memory "
            "attributes, guest_memfd slots before v6.18)", default="default"),
    Key("memory", "mappings", "host mappings made, in order, before the first step",
        default="{}"),
    Key("memslots", "memslots", "memslots made, in order, after memory and before the "
        "first step (their outcomes are the run's setup)", default="[]"),
    Key("steps", "steps", "a sequential scenario: the steps, in order (kvmmem run, "
        "compare, conform); give steps or threads"),
    Key("threads", "threads", "a concurrent scenario: named lists of steps run side by "
        "side (kvmmem explore); give steps or threads"),
    Key("dirty_ring", "size", "bytes of each vCPU's dirty ring: KVM_ENABLE_CAP of "
        "KVM_CAP_DIRTY_LOG_RING_ACQ_REL (where offered, else KVM_CAP_DIRTY_LOG_RING) right "
        "after KVM_CREATE_VM, before any vCPU; a size the kernel refuses makes the "
        "scenario not applicable (naming the errno); absent: no ring", default="0 (none)"),
    Key("dirty_ring_with_bitmap", "bool", "with dirty_ring, enable "
        "KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP too (arm64): logged slots keep a bitmap for "
        "writes without a running vCPU, and KVM_GET_DIRTY_LOG works", default="false"),
    Key("mte", "bool", "arm64: KVM_ENABLE_CAP(KVM_CAP_ARM_MTE) right after KVM_CREATE_VM, "
        "before any vCPU (v5.14): an MTE VM, whose memslots must be over VMAs that can hold "
        "tags (VM_MTE_ALLOWED since v6.2, not VM_SHARED before); needs cpu_features mte, "
        "else the kernel refuses (EINVAL) and the scenario is not applicable",
        default="false"),
)

# --- host mappings ------------------------------------------------------------------------

MAPPING_KEYS: tuple[Key, ...] = (
    Key("size", "size", "bytes, a multiple of the page size (of 2M for hugetlb; a power "
        "of two for vfio-bar)", required=True),
    _choice("kind", MAPPING_KINDS, "a mapping kind", "what backs the mapping "
            "(docs/scenarios.md, Mapping kinds)", required=True),
    Key("prot", "prot", "its protection", required=True),
    Key("fill", "fill", "a byte the host process writes to every byte right after mmap "
        "(the pages become present); absent: the mapping is left untouched"),
    Key("at", "hva_ref", "place the mapping exactly there (MAP_FIXED), replacing whatever "
        "was mapped"),
    Key("gmem_flags", "gmem_flags", "kind guest_memfd: the KVM_CREATE_GUEST_MEMFD flags "
        "(mmap: GUEST_MEMFD_FLAG_MMAP, init_shared: GUEST_MEMFD_FLAG_INIT_SHARED, v6.18); "
        "the file is mapped (MAP_SHARED) only with mmap", default="[]"),
)

HVA_REF_KEYS: tuple[Key, ...] = (
    Key("memory", "memory", "a mapping's name: the address range it was given (also after "
        "it was unmapped or replaced)", required=True),
    Key("offset", "size", "bytes into that range", default="0"),
)

# --- memslots ---------------------------------------------------------------------------------

MEMSLOT_KEYS: tuple[Key, ...] = (
    Key("slot", "u32", "the slot id (KVM's as_id << 16 | id)", required=True),
    Key("gpa", "size", "guest physical address of the slot", default="0"),
    Key("size", "size", "bytes; 0 deletes the slot (set_memslot only)", required=True),
    Key("memory", "memory", "the host mapping whose range backs the slot (with offset)"),
    Key("offset", "size", "bytes into memory", default="0"),
    Key("hva", "size", "a raw host address instead of memory (for requests KVM must "
        "refuse)", default="0 when memory is absent"),
    Key("flags", "flags", f"any of {', '.join(MEMSLOT_FLAGS)}", default="[]"),
    Key("guest_memfd", "memory", "a guest_memfd mapping whose file the slot binds "
        "(KVM_SET_USER_MEMORY_REGION2 guest_memfd); give the guest_memfd flag too"),
    Key("guest_memfd_offset", "size", "bytes into the guest_memfd file", default="0"),
)

# --- steps -------------------------------------------------------------------------------------

_VCPU = Key("vcpu", "vcpu", "the vCPU that makes the access", default="0")
_PATH = _choice("path", GUEST_PATHS, "a guest path", "x86: native takes KVM's MMU fault "
                "path, emulated KVM's instruction emulator (arm64 and riscv have none); "
                "absent: native", )
_COUNT = Key("count_faults", "bool", "report faults: the stage-2 (TDP) faults KVM took "
             "for this access (a premapped or block-mapped page takes none)", default="false")
_MEM = Key("memory", "memory", "the host mapping whose address range is meant",
           required=True)
_OFFSET = Key("offset", "size", "bytes into memory", default="0")


@dataclass(frozen=True, slots=True)
class StepKind:
    """One step kind: its YAML name, what it does, its keys."""

    op: str
    doc: str
    keys: tuple[Key, ...]


STEP_KINDS: tuple[StepKind, ...] = (
    StepKind("guest_read", "the guest loads size bytes at gpa", (
        Key("gpa", "size", "guest physical address", default="0"),
        Key("size", "access_size", "bytes", required=True), _VCPU, _PATH, _COUNT)),
    StepKind("guest_write", "the guest stores value (little-endian, size bytes) at gpa", (
        Key("gpa", "size", "guest physical address", default="0"),
        Key("size", "access_size", "bytes", required=True),
        Key("value", "u64", "the value stored; must fit in size bytes", required=True),
        _VCPU, _PATH, _COUNT)),
    StepKind("guest_exec", "an instruction fetch (4 bytes) at gpa", (
        Key("gpa", "size", "guest physical address", default="0"), _VCPU, _PATH, _COUNT)),
    StepKind("host_read", "a userspace load through the host address", (
        _MEM, _OFFSET, Key("size", "access_size", "bytes", required=True))),
    StepKind("host_write", "a userspace store through the host address", (
        _MEM, _OFFSET, Key("size", "access_size", "bytes", required=True),
        Key("value", "u64", "the value stored; must fit in size bytes", required=True))),
    StepKind("host_mmap", "mmap a new host mapping named name (the keys of a memory entry)",
             (Key("name", "name", "the new mapping's name", required=True),
              *MAPPING_KEYS)),
    StepKind("host_munmap", "munmap size bytes at memory + offset", (
        _MEM, _OFFSET, Key("size", "size", "bytes", default="the rest of the named range "
                           "from offset"))),
    StepKind("host_mprotect", "mprotect size bytes at memory + offset to prot", (
        _MEM, _OFFSET, Key("size", "size", "bytes", required=True),
        Key("prot", "prot", "the new protection", required=True))),
    StepKind("host_madvise", "madvise(advice) on size bytes at memory + offset", (
        _MEM, _OFFSET, Key("size", "size", "bytes", required=True),
        _choice("advice", ADVICES, "an advice", "MADV_DONTNEED, MADV_REMOVE, "
                "MADV_HUGEPAGE, MADV_NOHUGEPAGE", required=True))),
    StepKind("set_memslot", "KVM_SET_USER_MEMORY_REGION (REGION2 with guest_memfd): "
             "create, move, change flags of, or (size 0) delete a slot", MEMSLOT_KEYS),
    StepKind("prefault", "KVM_PRE_FAULT_MEMORY of size bytes at gpa", (
        Key("gpa", "size", "guest physical address", default="0"),
        Key("size", "size", "bytes", required=True), _VCPU)),
    StepKind("get_dirty_log", "KVM_GET_DIRTY_LOG of the slot (reports; clears and "
             "re-protects unless manual protect is on)", (
        Key("slot", "u32", "the slot id", required=True),)),
    StepKind("clear_dirty_log", "KVM_CLEAR_DIRTY_LOG of num_pages from first_page "
             "(extension)", (
                 Key("slot", "u32", "the slot id", required=True),
                 Key("first_page", "u64", "first page of the slot", default="0"),
                 Key("num_pages", "u32", "how many pages", required=True),
                 Key("pages", "pages", "the pages (numbered from the slot's start, as "
                     "first_page is) whose bits the user bitmap sets; each must lie in "
                     "the window", default="every page of the window"))),
    StepKind("punch_hole", "fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) of size "
             "bytes at offset into the file behind memory (a memfd, file or guest_memfd "
             "mapping) (extension)", (
                 Key("memory", "memory", "the mapping whose file is punched", required=True),
                 Key("offset", "size", "bytes into the file", default="0"),
                 Key("size", "size", "bytes", required=True))),
    StepKind("set_memory_attributes", "KVM_SET_MEMORY_ATTRIBUTES of size bytes at gpa "
             "(extension)", (
                 Key("gpa", "size", "guest physical address", default="0"),
                 Key("size", "size", "bytes", required=True),
                 Key("attributes", "mem_attributes", "the attributes the range gets (private: "
                     "KVM_MEMORY_ATTRIBUTE_PRIVATE); none makes it shared", default="[]"),
                 Key("flags", "u64", "the ioctl's flags (must be 0)", default="0"))),
    StepKind("enable_cap", "KVM_ENABLE_CAP on the VM: turn a capability on (extension)", (
        _choice("cap", tuple(VM_CAPS), "a capability", "the capability: "
                "manual_dirty_log_protect2 (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; args[0]: "
                "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE 1 | KVM_DIRTY_LOG_INITIALLY_SET 2), "
                "dirty_log_ring / dirty_log_ring_acq_rel (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]; "
                "args[0]: the ring's size in bytes), dirty_log_ring_with_bitmap "
                "(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, arm64), arm_mte (KVM_CAP_ARM_MTE, "
                "arm64 v5.14: EINVAL once a vCPU exists, as in every step, or without "
                "cpu_features mte)",
                required=True),
        Key("args", "cap_args", "struct kvm_enable_cap's args; missing ones are 0",
            default="[]"),
        Key("flags", "u32", "struct kvm_enable_cap's flags (must be 0)", default="0"))),
    StepKind("harvest_dirty_ring", "the VMM reads the vCPU's dirty ring from its fetch "
             "index: the entries flagged dirty, each then flagged reset; reports their gfns "
             "in ring order (extension; needs dirty_ring)", (
                 Key("vcpu", "vcpu", "the vCPU whose ring is read", default="0"),)),
    StepKind("reset_dirty_rings", "KVM_RESET_DIRTY_RINGS: the harvested entries are reset "
             "and their pages write-protected again; reports how many (extension)", ()),
)
"""Every step kind, in the order the documentation lists them."""

STEPS_BY_OP: dict[str, StepKind] = {kind.op: kind for kind in STEP_KINDS}

# --- expectations (outcome keys) -------------------------------------------------------------

EXPECT_KEYS: tuple[Key, ...] = (
    _choice("result", RESULTS, "a result", "how the step ended"),
    Key("value", "u64", "guest_read / host_read: the value read (little-endian); an MMIO "
        "read: the bytes that were inside a memslot"),
    Key("errno", "errno", "error: the errno name"),
    Key("gpa", "u64", "mmio: the exit's address; fault: the memory-fault address, where "
        "the kernel reports one"),
    Key("len", "range", "mmio: the exit's length", low=1, high=8),
    Key("is_write", "bool", "mmio: the exit's direction"),
    Key("data", "u64", "mmio, a write: the bytes written (little-endian)"),
    Key("size", "u64", "fault: the memory-fault size, where the kernel reports one"),
    Key("flags", "u64", "fault: the memory-fault flags, where the kernel reports them"),
    Key("dirty", "gfns", "get_dirty_log: the gfns reported dirty, sorted"),
    Key("signal", "signal", "signal: the signal the host access raised"),
    Key("abort", "string", "abort: the exception injected into the guest"),
    Key("remaining", "u64", "prefault: bytes of the range left unprocessed"),
    Key("exit_reason", "string", "exit: the KVM_EXIT_* name"),
    Key("suberror", "u64", "exit: the internal error's suberror"),
    Key("faults", "u64", "a guest access with count_faults: the stage-2 faults KVM took "
        "for it (real kernels report it on arm64: kvm_guest_fault events, and on x86 "
        "with TDP: kvm_page_fault events)"),
    Key("reset", "u64", "reset_dirty_rings: the entries reset (the ioctl's return value)"),
)
"""The keys ``expect`` takes: every outcome key (RESULT_KEYS says which result has which)."""

assert {k.name for k in EXPECT_KEYS} == {"result"} | {
    key for keys in RESULT_KEYS.values() for key in keys}


# --- JSON Schema -------------------------------------------------------------------------------

SCHEMA_ID = "https://kvmmem.invalid/scenario.schema.json"
_SIZE_PATTERN = r"^\s*(0[xX][0-9a-fA-F_]+|[0-9][0-9_]*)\s*([KMGTkmgt]?)([iI]?[bB])?\s*$"


def _uint(high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": high}


def _value_schema(key: Key) -> dict[str, Any]:
    """The JSON Schema of one key's value."""
    t = key.type
    if t == "version":
        out: dict[str, Any] = {"const": FORMAT_VERSION}
    elif t in ("name",):
        out = {"type": "string", "minLength": 1, "pattern": r"\S"}
    elif t == "string":
        out = {"type": "string"}
    elif t == "arches":
        one = {"enum": list(ARCHES)}
        out = {"anyOf": [one, {"type": "array", "items": one, "minItems": 1,
                               "uniqueItems": True}]}
    elif t == "variant":
        # a named variant, a release X.Y (a YAML number too: 6.1), or RELEASE+MUTATION
        release = r"(\d+\.\d+|upstream|linux-5\.4)"
        mutation = "(" + "|".join(MUTATIONS) + ")"
        out = {"anyOf": [{"enum": list(VARIANTS)}, {"type": "number"},
                         {"type": "string",
                          "pattern": rf"^{release}(-(4k|16k|64k))?(\+{mutation})?$"}]}
    elif t in ("granule", "page_size"):
        out = {"enum": list(GRANULES)}
    elif t == "range":
        out = {"type": "integer", "minimum": key.low, "maximum": key.high}
    elif t == "size":
        out = {"anyOf": [_uint(U64_MAX), {"type": "string", "pattern": _SIZE_PATTERN}]}
    elif t in ("u32", "u64"):
        out = _uint(U32_MAX if t == "u32" else U64_MAX)
    elif t == "access_size":
        out = {"enum": list(ACCESS_SIZES)}
    elif t == "vcpu":
        out = _uint(MAX_VCPUS - 1)
    elif t == "prot":
        out = {"type": "string", "pattern": r"^(none|(?!.*(.).*\2)[rwx]{1,3})$"}
    elif t == "fill":
        out = _uint(0xFF)
    elif t == "choice":
        out = {"enum": list(key.choices)}
    elif t == "memory":
        out = {"type": "string", "minLength": 1}
    elif t == "hva_ref":
        out = _object(HVA_REF_KEYS)
    elif t == "flags":
        out = {"type": "array", "items": {"enum": list(MEMSLOT_FLAGS)}, "uniqueItems": True}
    elif t == "cap_args":
        out = {"type": "array", "items": _uint(U64_MAX), "maxItems": ENABLE_CAP_ARGS}
    elif t == "mem_attributes":
        out = {"type": "array", "items": {"enum": list(MEMORY_ATTRIBUTES)}, "uniqueItems": True}
    elif t == "gmem_flags":
        out = {"type": "array", "items": {"enum": list(GMEM_FLAGS)}, "uniqueItems": True}
    elif t == "cpu_features":
        out = {"type": "array", "items": {"enum": list(CPU_FEATURES)}, "uniqueItems": True}
    elif t == "bool":
        out = {"type": "boolean"}
    elif t == "errno":
        out = {"type": "string", "pattern": "^E[A-Z0-9]+$"}
    elif t == "signal":
        out = {"type": "string", "pattern": "^SIG[A-Z0-9+-]+$"}
    elif t in ("gfns", "pages"):
        out = {"type": "array", "items": _uint(U64_MAX)}
    elif t == "mappings":
        out = {"type": "object", "additionalProperties": {"$ref": "#/$defs/mapping"}}
    elif t == "memslots":
        out = {"type": "array", "items": {"$ref": "#/$defs/memslot"}}
    elif t == "steps":
        out = {"type": "array", "items": {"$ref": "#/$defs/step"}}
    elif t == "threads":
        out = {"type": "object", "minProperties": 1, "additionalProperties": {
            "type": "array", "minItems": 1, "items": {"$ref": "#/$defs/step"}}}
    else:  # pragma: no cover - TYPES lists every type
        raise ValueError(f"unknown key type {t!r}")
    doc = key.doc + (f" (default: {key.default})" if key.default is not None else "")
    return {"description": doc, **out}


def _object(keys: tuple[Key, ...], *, nullable: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": ["object", "null"] if nullable else "object",
        "properties": {k.name: _value_schema(k) for k in keys},
        "additionalProperties": False,
    }
    required = [k.name for k in keys if k.required]
    if required:
        out["required"] = required
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a version-1 scenario file, from the
    declarations of this module; the content of ``docs/scenario.schema.json``."""
    steps = []
    for kind in STEP_KINDS:
        args = _object(kind.keys, nullable=not any(k.required for k in kind.keys))
        steps.append({
            "type": "object",
            "description": kind.doc,
            "properties": {kind.op: args, "expect": {"$ref": "#/$defs/expect"}},
            "required": [kind.op],
            "additionalProperties": False,
        })
    top = _object(TOP_KEYS)
    top["oneOf"] = [{"required": ["steps"]}, {"required": ["threads"]}]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": f"kvmmem scenario, format version {FORMAT_VERSION}",
        "description": "Generated from kvmmem.scenario.schema (kvmmem schema); see "
                       "docs/scenarios.md.",
        **top,
        "$defs": {
            "mapping": _object(MAPPING_KEYS),
            "memslot": _object(MEMSLOT_KEYS),
            "step": {"oneOf": steps},
            "expect": _object(EXPECT_KEYS),
        },
    }


def json_schema_text() -> str:
    """:func:`json_schema` as the shipped file holds it: indented, sorted as declared,
    ending in a newline."""
    return json.dumps(json_schema(), indent=2) + "\n"
