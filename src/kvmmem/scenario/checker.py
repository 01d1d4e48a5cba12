"""The structural checker of the scenario format: the schema's sections and their
cross-entry rules (mapping names and their scopes, memslots, steps and threads,
expectations), on top of the value checks of :mod:`kvmmem.scenario.values`.
"""

from __future__ import annotations

import errno as _errno
import signal as _signal
from collections.abc import Iterator
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from kvmmem.errors import InputError
from kvmmem.scenario import schema
from kvmmem.scenario.model import (
    ARCHES,
    FORMAT_VERSION,
    GRANULES,
    GUEST_STEPS,
    RESULT_KEYS,
    RESULTS,
    STEP_TYPES,
    HvaRef,
    Mapping,
    Scenario,
    SetMemslot,
    Step,
)
from kvmmem.scenario.nodes import (
    _INT,
    _MAP,
    _NULL,
    _STRINGISH,
    Parser,
    _Bad,
    _hint,
    _join,
    _line,
    _listing,
    _Names,
    _show,
)
from kvmmem.scenario.values import _ValueChecker
from kvmmem.types import PAGE_SIZE, PMD_SIZE, format_size
from kvmmem.variants import split_page_size

_TOP_KEYS = tuple(k.name for k in schema.TOP_KEYS)
_STRUCTURAL = frozenset({"mappings", "memslots", "steps", "threads"})
"""Key types the checker walks itself (their checks span entries)."""
_ERRNO_NAMES = frozenset(n for n in dir(_errno) if n.startswith("E") and n.isupper())
"""Every errno name, aliases included (EOPNOTSUPP as well as ENOTSUP)."""
_SIGNAL_NAMES = frozenset(_signal.Signals.__members__)


def _reporters(key: str) -> str:
    """The step kinds whose outcome can carry ``key``: ``guest_read and host_read``."""
    return " and ".join(op for op, cls in STEP_TYPES.items() if key in cls.reports)


# --- the checker ----------------------------------------------------------------------


class _Checker(_ValueChecker):
    """Walks a composed YAML tree against the v1 schema, recording mistakes."""

    # -- the schema's keys ---------------------------------------------------------------

    def parser(self, key: schema.Key, names: _Names | None) -> Parser:
        """How a value of ``key`` is read (:data:`kvmmem.scenario.schema.TYPES`);
        ``names``: the mapping names usable here (for ``memory`` and ``hva_ref``)."""
        t = key.type
        if t == "choice":
            return lambda n, p: self.choice(n, p, key.choices, key.what)
        if t == "range":
            return lambda n, p: self.bounded(n, p, key.low, key.high)
        if t in ("memory", "hva_ref"):
            assert names is not None
            if t == "memory":
                return lambda n, p: self.ref(n, p, names)
            return lambda n, p: self.hva_ref(n, p, names)
        simple: dict[str, Parser] = {
            "version": lambda n, p: None, "name": self.name, "string": self.string,
            "arches": self.arches,
            "variant": self.variant_name,
            "granule": self.granule, "page_size": self.page_size, "size": self.size,
            "u32": self.u32, "u64": self.u64,
            "access_size": self.access_size, "vcpu": self.vcpu, "prot": self.prot,
            "fill": self.fill, "flags": self.flags, "cpu_features": self.cpu_features,
            "gmem_flags": self.gmem_flags, "mem_attributes": self.mem_attributes,
            "cap_args": self.cap_args,
            "bool": self.boolean,
            "errno": self.errno_name, "signal": self.signal_name, "gfns": self.gfn_list,
            "pages": self.page_list,
        }
        return simple[t]

    def fields(self, keys: tuple[schema.Key, ...],
               names: _Names | None = None) -> dict[str, Parser]:
        """``{key name: parser}`` of a section, in the declared order."""
        return {k.name: self.parser(k, names) for k in keys if k.type not in _STRUCTURAL}

    @staticmethod
    def required(keys: tuple[schema.Key, ...]) -> tuple[str, ...]:
        """The names of the required keys of a section."""
        return tuple(k.name for k in keys if k.required)

    # -- mappings of fields ---------------------------------------------------------------

    def record(self, node: Node, path: str, fields: dict[str, Parser],
               required: tuple[str, ...] = (), *, null_is_empty: bool = False,
               ) -> dict[str, tuple[Any, Node]] | None:
        """Parse a mapping of known ``fields``: ``{key: (value, value_node)}``, or None
        after recording every mistake (unknown key, bad value, missing key)."""
        if null_is_empty and isinstance(node, ScalarNode) and node.tag == _NULL:
            node = MappingNode(_MAP, [], node.start_mark, node.end_mark)
        if not isinstance(node, MappingNode):
            self.err(node, path, f"expected a mapping of {_listing(fields)}, got {_show(node)}")
            return None
        out: dict[str, tuple[Any, Node]] = {}
        present: set[str] = set()
        ok = True
        keys = tuple(fields)
        for key, knode, vnode in self.entries(node, path):
            if key not in fields:
                self.err(knode, _join(path, key),
                         f"unknown key{_hint(key, keys)} (known keys: {_listing(keys)})")
                ok = False
                continue
            present.add(key)
            try:
                out[key] = (fields[key](vnode, _join(path, key)), vnode)
            except _Bad:
                ok = False
        for key in required:
            if key not in present:
                self.err(node, _join(path, key), "required key missing", at_end=True)
                ok = False
        return out if ok else None

    # -- the scenario -----------------------------------------------------------------------

    def scenario(self, root: Node) -> Scenario:
        """The validated :class:`Scenario`; raises InputError with the first mistake."""
        if not isinstance(root, MappingNode):
            raise InputError(
                f"{self.filename}:{_line(root)}: the top level must be a mapping "
                f"(kvmmem: 1, name: ..., steps: ...), not {_show(root)}"
            )
        self.prewalk(root)
        top = {key: (knode, vnode) for key, knode, vnode in self.entries(root, "")}
        self.check_version(root, top)

        values: dict[str, Any] = {}
        scalar_fields = self.fields(schema.TOP_KEYS)
        for key, knode, vnode in self.entries(root, ""):
            if key not in _TOP_KEYS:
                self.err(knode, _join("", key),
                         f"unknown key{_hint(key, _TOP_KEYS)} (known keys: {_listing(_TOP_KEYS)})")
            elif key in scalar_fields:
                try:
                    values[key] = scalar_fields[key](vnode, key)
                except _Bad:
                    if key == "vcpus":
                        self.vcpus = None
        if "vcpus" in values:
            self.vcpus = values["vcpus"]
        if "name" not in top:
            self.err(root, "name", "required key missing", at_end=True)
        self.check_page_size(values, top)

        mmap_sites = self.mmap_sites(top)
        memory = self.memory(top.get("memory"), mmap_sites)
        memslots = self.memslots(top.get("memslots"), memory, mmap_sites)
        steps, threads = self.step_lists(root, top, memory, mmap_sites)

        if self.errors:
            raise self.first_error()
        assert memory is not None and memslots is not None
        return Scenario(
            name=values["name"],
            description=values.get("description", ""),
            arches=values.get("arch", ("x86",)),
            variant=values.get("variant", "upstream"),
            variant_given="variant" in values,
            granule=values.get("granule", GRANULES["4K"]),
            vcpus=values.get("vcpus", 1),
            memory={n: m for n, m in memory.items() if m is not None},
            memslots=memslots,
            steps=steps,
            threads=threads,
            ipa_bits=values.get("ipa_bits"),
            cpu_features=values.get("cpu_features", ()),
            vm_type=values.get("vm_type", "default"),
            source=self.filename,
            dirty_ring=values.get("dirty_ring", 0),
            dirty_ring_with_bitmap=values.get("dirty_ring_with_bitmap", False),
            dirty_ring_line=_line(top["dirty_ring"][1]) if "dirty_ring" in top else 0,
            mte=values.get("mte", False),
            mte_line=_line(top["mte"][1]) if "mte" in top else 0,
            page_size=values.get("page_size"),
            granule_given="granule" in values,
        )

    def check_page_size(self, values: dict[str, Any],
                        top: dict[str, tuple[ScalarNode, Node]]) -> None:
        """``page_size`` against the architectures, the ``granule`` and a variant's
        page-size suffix: 16K and 64K host pages are arm64's; the arm64 stage-2 granule
        is the host's page size (``kvm_get_vtcr``), so a granule other than the pinned
        page size is refused naming both, as is a variant built with another one."""
        page_size = values.get("page_size")
        if page_size is None:
            return
        node = top["page_size"][1]
        others = [a for a in values.get("arch", ("x86",)) if a != "arm64"]
        if page_size != 4096 and others:
            self.err(node, "page_size", f"{format_size(page_size)} host pages are arm64's "
                     f"(CONFIG_ARM64_{format_size(page_size)}_PAGES); {others[0]} hosts have "
                     "4K pages: name arch: arm64 only")
        granule = values.get("granule")
        if granule is not None and granule != page_size:
            self.err(top["granule"][1], "granule", f"{format_size(granule)} differs from "
                     f"page_size {format_size(page_size)}: the stage-2 granule is the host's "
                     "page size")
        if "variant" in values:
            suffixed = split_page_size(values["variant"].partition("+")[0])[1]
            if suffixed is not None and suffixed != page_size:
                self.err(node, "page_size", f"{format_size(page_size)} differs from variant "
                         f"{values['variant']}, a kernel built with "
                         f"{format_size(suffixed)} pages")

    def check_version(self, root: MappingNode, top: dict[str, tuple[ScalarNode, Node]]) -> None:
        """``kvmmem: 1`` first: a file of another version is not checked any further."""
        if "kvmmem" not in top:
            raise InputError(f"{self.filename}:{_line(root)}: kvmmem: required key missing "
                             f"(the format version: kvmmem: {FORMAT_VERSION})")
        node = top["kvmmem"][1]
        if (not isinstance(node, ScalarNode) or node.tag != _INT
                or str(node.value) != str(FORMAT_VERSION)):
            raise InputError(f"{self.filename}:{_line(node)}: kvmmem: unsupported format "
                             f"version {_show(node)} (this kvmmem reads version "
                             f"{FORMAT_VERSION})")

    def arches(self, node: Node, path: str) -> tuple[str, ...]:
        if isinstance(node, SequenceNode):
            if not node.value:
                raise self.err(node, path, "the list of architectures is empty")
            return self.word_list(node, path, ARCHES, "architecture", "an architecture")
        return (self.choice(node, path, ARCHES, "an architecture"),)

    def granule(self, node: Node, path: str) -> int:
        value = self.size(node, path)
        if value not in GRANULES.values():
            raise self.err(node, path, f"{_show(node)} is not a stage-2 granule "
                                       f"({_listing(GRANULES)})")
        return value

    def page_size(self, node: Node, path: str) -> int:
        value = self.size(node, path)
        if value not in GRANULES.values():
            raise self.err(node, path, f"{_show(node)} is not a host page size "
                                       f"({_listing(GRANULES)})")
        return value

    # -- mappings ------------------------------------------------------------------------------

    def hva_ref(self, node: Node, path: str, names: _Names) -> HvaRef:
        rec = self.record(node, path, self.fields(schema.HVA_REF_KEYS, names),
                          self.required(schema.HVA_REF_KEYS))
        if rec is None:
            raise _Bad()
        return HvaRef(rec["memory"][0], rec.get("offset", (0, None))[0])

    def check_mapping_size(self, rec: dict[str, tuple[Any, Node]], path: str,
                           allow_empty: bool) -> bool:
        """Page-multiple size (2M multiple for hugetlb); records and returns False if not."""
        size, node = rec["size"]
        if size == 0 and not allow_empty:
            self.err(node, _join(path, "size"), "a mapping cannot be empty (size 0)")
            return False
        if rec["kind"][0] == "hugetlb" and size % PMD_SIZE:
            self.err(node, _join(path, "size"), f"{_show(node)} is not a multiple of the "
                                                f"huge page size ({format_size(PMD_SIZE)})")
            return False
        if size % PAGE_SIZE:
            self.err(node, _join(path, "size"), f"{_show(node)} is not a multiple of the "
                                                f"page size ({format_size(PAGE_SIZE)})")
            return False
        if rec["kind"][0] == "vfio-bar" and size & (size - 1):
            self.err(node, _join(path, "size"), f"{_show(node)} is not a power of two (a "
                                                "vfio-bar maps a whole PCI BAR)")
            return False
        return True

    def mmap_sites(self, top: dict[str, tuple[ScalarNode, Node]]) -> dict[str, tuple[str, int]]:
        """Names created by host_mmap steps anywhere -> (thread or "", line): a cheap
        look-ahead so that a use before the creating step gets a precise message."""
        sites: dict[str, tuple[str, int]] = {}
        for label, steps in self.raw_step_lists(top):
            for step in steps:
                if not isinstance(step, MappingNode):
                    continue
                for key, _, args in self.entries(step, ""):
                    if key != "host_mmap" or not isinstance(args, MappingNode):
                        continue
                    for akey, _, anode in self.entries(args, ""):
                        if (akey == "name" and isinstance(anode, ScalarNode)
                                and anode.tag in _STRINGISH):
                            sites.setdefault(str(anode.value), (label, _line(anode)))
        return sites

    def raw_step_lists(self, top: dict[str, tuple[ScalarNode, Node]],
                       ) -> Iterator[tuple[str, list[Node]]]:
        steps = top.get("steps")
        if steps is not None and isinstance(steps[1], SequenceNode):
            yield "", list(steps[1].value)
        threads = top.get("threads")
        if threads is not None and isinstance(threads[1], MappingNode):
            for key, _, vnode in self.entries(threads[1], "threads"):
                if isinstance(vnode, SequenceNode):
                    yield key, list(vnode.value)

    def memory(self, item: tuple[ScalarNode, Node] | None,
               sites: dict[str, tuple[str, int]]) -> dict[str, Mapping | None]:
        """The ``memory`` section: name -> Mapping (None for a bad entry, whose name
        still counts as declared)."""
        out: dict[str, Mapping | None] = {}
        if item is None:
            return out
        node = item[1]
        if not isinstance(node, MappingNode):
            self.err(node, "memory", f"expected a mapping of name -> {{size, kind, prot}}, "
                                     f"got {_show(node)}")
            return out
        entries = self.entries(node, "memory")
        later = {key: _line(knode) for key, knode, _ in entries}
        known: dict[str, int] = {}
        for key, knode, vnode in entries:
            path = _join("memory", key)
            if knode.tag not in _STRINGISH or not key.strip():
                self.err(knode, path, f"a mapping name must be a non-empty string, "
                                      f"not {_show(knode)}")
                continue
            elsewhere = {n: f"is declared after this one (line {line})"
                         for n, line in later.items() if n not in known}
            elsewhere[key] = "cannot be placed at itself"
            elsewhere.update({n: f"is created by a step (line {line}); 'at' in memory can "
                                 "only name mappings declared before it"
                              for n, (_, line) in sites.items() if n not in later})
            names = _Names(dict(known), elsewhere)
            rec = self.record(vnode, path, self.fields(schema.MAPPING_KEYS, names),
                              self.required(schema.MAPPING_KEYS))
            known[key] = _line(knode)
            if rec is None or not self.check_mapping_size(rec, path, allow_empty=False) \
                    or not self.check_gmem_mapping(rec, path):
                out[key] = None
                continue
            out[key] = Mapping(
                name=key, size=rec["size"][0], kind=rec["kind"][0], prot=rec["prot"][0],
                fill=rec.get("fill", (None, None))[0], at=rec.get("at", (None, None))[0],
                line=_line(knode), gmem_flags=rec.get("gmem_flags", ((), None))[0],
            )
        return out

    def check_gmem_mapping(self, rec: dict[str, tuple[Any, Node]], path: str) -> bool:
        """``gmem_flags`` only on kind guest_memfd; ``fill`` and ``at`` only where the
        guest_memfd is mapped (flag mmap).  Records and returns False if not."""
        kind = rec["kind"][0]
        if "gmem_flags" in rec and kind != "guest_memfd":
            self.err(rec["gmem_flags"][1], _join(path, "gmem_flags"),
                     f"gmem_flags belong to kind guest_memfd, not {kind}")
            return False
        if kind == "guest_memfd" and "mmap" not in rec.get("gmem_flags", ((), None))[0]:
            for key in ("fill", "at"):
                if key in rec:
                    self.err(rec[key][1], _join(path, key),
                             f"{key} needs a mapped guest_memfd (gmem_flags: [mmap])")
                    return False
        return True

    # -- memslots ---------------------------------------------------------------------------------

    def memslot_args(self, rec: dict[str, tuple[Any, Node]], path: str) -> dict[str, Any] | None:
        """Cross-field checks of a memslot; the SetMemslot keyword arguments, or None."""
        if "memory" in rec and "hva" in rec:
            later = max(rec["memory"][1], rec["hva"][1],
                        key=lambda n: (n.start_mark.line, n.start_mark.column))
            key = "hva" if later is rec["hva"][1] else "memory"
            self.err(later, _join(path, key), "give memory (+ offset) or hva, not both")
            return None
        if "offset" in rec and "memory" not in rec:
            self.err(rec["offset"][1], _join(path, "offset"),
                     "offset needs memory (a raw address goes in hva)")
            return None
        args = {key: value for key, (value, _) in rec.items()}
        if "memory" not in rec:
            args.setdefault("hva", 0)
        return args

    def check_gmem_refs(self, rec: dict[str, tuple[Any, Node]], path: str,
                        memory: dict[str, Mapping | None]) -> bool:
        """A memslot's ``guest_memfd`` names a guest_memfd mapping, and its ``memory`` a
        mapping with a host range.  Records and returns False if not."""
        if "guest_memfd" in rec:
            name, node = rec["guest_memfd"]
            m = memory.get(name)
            if m is not None and m.kind != "guest_memfd":
                self.err(node, _join(path, "guest_memfd"),
                         f"{name} is a {m.kind} mapping, not a guest_memfd")
                return False
        elif "guest_memfd_offset" in rec:
            self.err(rec["guest_memfd_offset"][1], _join(path, "guest_memfd_offset"),
                     "guest_memfd_offset needs guest_memfd")
            return False
        if "memory" in rec:
            name, node = rec["memory"]
            m = memory.get(name)
            if m is not None and not m.mapped:
                self.err(node, _join(path, "memory"),
                         f"{name} is a guest_memfd without gmem_flags: [mmap]: it has no "
                         "host address")
                return False
        return True

    def memslots(self, item: tuple[ScalarNode, Node] | None, memory: dict[str, Mapping | None],
                 sites: dict[str, tuple[str, int]]) -> tuple[SetMemslot, ...] | None:
        if item is None:
            return ()
        node = item[1]
        if not isinstance(node, SequenceNode):
            self.err(node, "memslots", f"expected a list of memslots, got {_show(node)}")
            return None
        names = _Names(
            {n: 0 for n in memory},
            {n: f"is created by a step (line {line}); memslots can only use memory"
             for n, (_, line) in sites.items() if n not in memory},
        )
        out: list[SetMemslot] = []
        used: dict[int, str] = {}
        ok = True
        for i, entry in enumerate(node.value):
            path = f"memslots[{i}]"
            rec = self.record(entry, path, self.fields(schema.MEMSLOT_KEYS, names),
                              self.required(schema.MEMSLOT_KEYS))
            if rec is None:
                ok = False
                continue
            slot, snode = rec["slot"]
            if slot in used:
                self.err(snode, _join(path, "slot"), f"duplicate slot {slot} "
                                                     f"(already used by {used[slot]})")
                ok = False
                continue
            used[slot] = path
            size, znode = rec["size"]
            if size == 0:
                self.err(znode, _join(path, "size"), "a memslot made before the steps cannot "
                                                     "be empty (size 0 deletes: use a "
                                                     "set_memslot step)")
                ok = False
                continue
            args = self.memslot_args(rec, path)
            if args is None or not self.check_gmem_refs(rec, path, memory):
                ok = False
                continue
            out.append(SetMemslot(index=i, line=_line(entry), **args))
        return tuple(out) if ok else None

    # -- steps ---------------------------------------------------------------------------

    def step_lists(self, root: MappingNode, top: dict[str, tuple[ScalarNode, Node]],
                   memory: dict[str, Mapping | None], sites: dict[str, tuple[str, int]],
                   ) -> tuple[tuple[Step, ...] | None, dict[str, tuple[Step, ...]] | None]:
        if "steps" in top and "threads" in top:
            ks, kt = top["steps"][0], top["threads"][0]
            later, key = (kt, "threads") if _line(kt) >= _line(ks) else (ks, "steps")
            self.err(later, key, "give steps or threads, not both")
            return None, None
        if "steps" not in top and "threads" not in top:
            self.err(root, "steps", "required key missing (or threads, for a concurrent "
                                    "scenario)", at_end=True)
            return None, None
        declared = dict.fromkeys(memory, 0)
        if "steps" in top:
            node = top["steps"][1]
            if not isinstance(node, SequenceNode):
                self.err(node, "steps", f"expected a list of steps, got {_show(node)}")
                return None, None
            steps = self.step_list(node.value, "steps", None, memory, sites, declared)
            return steps, None
        node = top["threads"][1]
        if not isinstance(node, MappingNode):
            self.err(node, "threads", f"expected a mapping of thread name -> list of steps, "
                                      f"got {_show(node)}")
            return None, None
        entries = self.entries(node, "threads")
        if not entries:
            self.err(node, "threads", "no threads given")
            return None, None
        threads: dict[str, tuple[Step, ...]] = {}
        ok = True
        for key, knode, vnode in entries:
            path = _join("threads", key)
            if knode.tag not in _STRINGISH or not key.strip():
                self.err(knode, path, f"a thread name must be a non-empty string, "
                                      f"not {_show(knode)}")
                ok = False
                continue
            if not isinstance(vnode, SequenceNode):
                self.err(vnode, path, f"expected a list of steps, got {_show(vnode)}")
                ok = False
                continue
            if not vnode.value:
                self.err(vnode, path, "a thread needs at least one step")
                ok = False
                continue
            tsteps = self.step_list(vnode.value, path, key, memory, sites, declared)
            if tsteps is None:
                ok = False
            else:
                threads[key] = tsteps
        return None, (threads if ok else None)

    def step_list(self, nodes: list[Node], path: str, thread: str | None,
                  memory: dict[str, Mapping | None], sites: dict[str, tuple[str, int]],
                  declared: dict[str, int]) -> tuple[Step, ...] | None:
        """One list of steps (``steps`` or a thread's); ``declared`` collects every
        mapping name (memory and host_mmap) to catch duplicates across threads."""
        label = thread or ""
        names = _Names(dict.fromkeys(memory, 0), {})
        for name, (where, line) in sites.items():
            if name in memory:
                continue
            if where == label:
                names.elsewhere[name] = (f"does not exist yet here (host_mmap creates it "
                                         f"on line {line})")
            else:
                owner = f"thread {where!r}" if where else "the steps"
                names.elsewhere[name] = (f"belongs to {owner} (created on line {line}); a "
                                         "thread can use memory and its own host_mmap names")
        out: list[Step] = []
        ok = True
        for i, node in enumerate(nodes):
            step = self.step(node, f"{path}[{i}]", i, thread, names, declared)
            if step is None:
                ok = False
            else:
                out.append(step)
        return tuple(out) if ok else None

    def step_fields(self, op: str, names: _Names) -> tuple[dict[str, Parser], tuple[str, ...]]:
        """The keys of step kind ``op`` with their parsers, and the required ones."""
        keys = schema.STEPS_BY_OP[op].keys
        return self.fields(keys, names), self.required(keys)

    def step(self, node: Node, path: str, index: int, thread: str | None, names: _Names,
             declared: dict[str, int]) -> Step | None:
        kinds = tuple(STEP_TYPES)
        if not isinstance(node, MappingNode):
            self.err(node, path, f"a step must be a mapping like {{guest_read: {{...}}}}, "
                                 f"got {_show(node)}")
            return None
        kind: tuple[str, Node] | None = None
        expect_node: Node | None = None
        ok = True
        for key, knode, vnode in self.entries(node, path):
            if key == "expect":
                expect_node = vnode
            elif key in STEP_TYPES:
                if kind is not None:
                    self.err(knode, _join(path, key), f"a step has one kind, this one "
                                                      f"already is {kind[0]}")
                    ok = False
                else:
                    kind = (key, vnode)
            else:
                self.err(knode, _join(path, key), f"unknown step kind{_hint(key, kinds)} "
                                                  f"(step kinds: {_listing(kinds)})")
                ok = False
        if kind is None:
            if ok:
                self.err(node, path, f"no step kind given (one of {_listing(kinds)})",
                         at_end=True)
            return None
        op, args_node = kind
        fields, required = self.step_fields(op, names)
        apath = _join(path, op)
        rec = self.record(args_node, apath, fields, required, null_is_empty=True)
        if op == "host_mmap" and rec is not None and not self.check_mapping_size(
                rec, apath, allow_empty=True):
            rec = None
        if op == "host_mmap":
            self.declare(args_node, apath, names, declared)
        expect = None
        if expect_node is not None:
            try:
                expect = self.expect(expect_node, _join(path, "expect"), op, rec)
            except _Bad:
                ok = False
        if rec is None or not ok or not self.value_fits(op, rec, apath):
            return None
        if op == "set_memslot":
            args = self.memslot_args(rec, apath)
            if args is None:
                return None
        else:
            args = {key: value for key, (value, _) in rec.items()}
            if op == "enable_cap" and "args" in args:
                args["cap_args"] = args.pop("args")  # Step.args is a method
        cls = STEP_TYPES[op]
        return cls(index=index, line=_line(node), expect=expect, thread=thread, **args)

    def declare(self, args: Node, path: str, names: _Names, declared: dict[str, int]) -> None:
        """Make a host_mmap's name usable by the steps after it (and catch duplicates)."""
        if not isinstance(args, MappingNode):
            return
        for key, _, vnode in self.entries(args, path):
            if key != "name" or not isinstance(vnode, ScalarNode) or vnode.tag not in _STRINGISH:
                continue
            name = str(vnode.value)
            if name in declared:
                first = declared[name]
                where = f" on line {first}" if first else " in memory"
                self.err(vnode, _join(path, "name"),
                         f"duplicate mapping name {name!r} (already declared{where})")
                continue
            declared[name] = _line(vnode)
            names.known[name] = _line(vnode)
            names.elsewhere.pop(name, None)

    def value_fits(self, op: str, rec: dict[str, tuple[Any, Node]], path: str) -> bool:
        if op == "clear_dirty_log" and "pages" in rec:
            first = rec["first_page"][0] if "first_page" in rec else 0
            end = first + rec["num_pages"][0]
            pages, pnode = rec["pages"]
            outside = [p for p in pages if not first <= p < end]
            if outside:
                self.err(pnode, _join(path, "pages"),
                         f"page {outside[0]} is outside the window [{first}, {end}): the user "
                         "bitmap of KVM_CLEAR_DIRTY_LOG covers the window only")
                return False
        if "value" in rec:  # a store of ``size`` bytes: guest_write, host_write
            value, vnode = rec["value"]
            size = rec["size"][0]
            if value >> (8 * size):
                unit = "byte" if size == 1 else "bytes"
                self.err(vnode, _join(path, "value"),
                         f"{_show(vnode)} does not fit in {size} {unit}")
                return False
        return True

    # -- expectations --------------------------------------------------------------------

    def expect(self, node: Node, path: str, op: str,
               args: dict[str, tuple[Any, Node]] | None) -> dict[str, object]:
        """The ``expect`` mapping: outcome key -> value, checked against the outcome table."""
        keys = tuple(k.name for k in schema.EXPECT_KEYS)
        parsers = self.fields(schema.EXPECT_KEYS)
        if not isinstance(node, MappingNode):
            raise self.err(node, path, f"expected a mapping of outcome keys "
                                       f"({_listing(keys)}), got {_show(node)}")
        out: dict[str, object] = {}
        nodes: dict[str, Node] = {}
        ok = True
        for key, knode, vnode in self.entries(node, path):
            if key not in parsers:
                self.err(knode, _join(path, key),
                         f"unknown key{_hint(key, keys)} (outcome keys: {_listing(keys)})")
                ok = False
                continue
            try:
                out[key] = parsers[key](vnode, _join(path, key))
                nodes[key] = knode
            except _Bad:
                ok = False
        if not ok:
            raise _Bad()
        self.expect_consistent(out, nodes, path, op, args)
        return out

    def expect_consistent(self, out: dict[str, object], nodes: dict[str, Node], path: str,
                          op: str, args: dict[str, tuple[Any, Node]] | None) -> None:
        """Keys that no single outcome of ``op`` can carry together are a mistake."""
        result = out.get("result")
        if result in ("mmio", "fault") and op not in GUEST_STEPS:
            raise self.err(nodes["result"], _join(path, "result"),
                           f"{op} cannot end in {result!r} (only guest accesses do)")
        candidates = [result] if isinstance(result, str) else list(RESULTS)
        seen: list[str] = []
        for key in out:
            if key == "result":
                continue
            left = [r for r in candidates if key in RESULT_KEYS[r]]
            if not left:
                if isinstance(result, str):
                    allowed = _listing(RESULT_KEYS[result])
                    msg = f"an outcome with result {result!r} has no {key} (it has: {allowed})"
                else:
                    msg = f"{key} and {_listing(seen)} never appear in the same outcome"
                raise self.err(nodes[key], _join(path, key), msg)
            candidates = left
            seen.append(key)
        if "value" in out:
            if "value" not in STEP_TYPES[op].reports:
                raise self.err(nodes["value"], _join(path, "value"),
                               f"{op} reports no value (only {_reporters('value')} do)")
            if args is not None:
                size = args["size"][0]
                value = out["value"]
                assert isinstance(value, int)
                if value >> (8 * size):
                    unit = "byte" if size == 1 else "bytes"
                    raise self.err(nodes["value"], _join(path, "value"),
                                   f"{value:#x} does not fit in the {size} {unit} read")
        if "dirty" in out and "dirty" not in STEP_TYPES[op].reports:
            raise self.err(nodes["dirty"], _join(path, "dirty"),
                           f"{op} reports no dirty list (only {_reporters('dirty')} "
                           f"{'do' if ' and ' in _reporters('dirty') else 'does'})")

    def errno_name(self, node: Node, path: str) -> str:
        text = self.string(node, path)
        if text not in _ERRNO_NAMES:
            raise self.err(node, path, f"{_show(node)} is not an errno name "
                                       "(like EINVAL, EEXIST, EFAULT)")
        return text

    def signal_name(self, node: Node, path: str) -> str:
        text = self.string(node, path)
        if text not in _SIGNAL_NAMES:
            raise self.err(node, path, f"{_show(node)} is not a signal name "
                                       "(like SIGSEGV, SIGBUS)")
        return text

