"""The scenario loader against the v1 contract (SCENARIOS.md) and issue 5, item 1.

Good files load to exactly the expected objects; every file in ``broken/``
fails with the exact message on its ``# expect:`` line (FILE:LINE: FIELD:
WHAT); generated YAML, mutated scenarios, random text and random bytes yield a
Scenario or one InputError, never another exception.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmmem.errors import InputError
from kvmmem.scenario import (
    STEP_TYPES,
    ClearDirtyLog,
    GetDirtyLog,
    GuestExec,
    GuestRead,
    GuestWrite,
    HostMadvise,
    HostMmap,
    HostMprotect,
    HostMunmap,
    HostRead,
    HostWrite,
    HvaRef,
    Mapping,
    Prefault,
    PunchHole,
    Scenario,
    SetMemoryAttributes,
    SetMemslot,
    load_scenario,
    load_scenario_text,
)
from kvmmem.scenario.model import (
    EXPECT_KEYS,
    PROT_EXEC,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    RESULT_KEYS,
    EnableCap,
    HarvestDirtyRing,
    ResetDirtyRings,
    prot_letters,
)

HERE = Path(__file__).parent
BROKEN = sorted((HERE / "broken").glob("*.yaml"))

# --- four valid scenarios ----------------------------------------------------------

RO_MEMSLOT = """\
kvmmem: 1
name: ro-vma-after-create
description: |
  A writable memslot over a VMA that becomes read-only after creation.
arch: x86
memory:
  ram: {size: 2M, kind: anon, prot: rw, fill: 0x5a}
memslots:
  - {slot: 0, gpa: 0x0, size: 2M, memory: ram}
steps:
  - guest_read: {gpa: 0x1000, size: 8}
    expect: {result: ok, value: 0x5a5a5a5a5a5a5a5a}
  - host_mprotect: {memory: ram, offset: 0, size: 2M, prot: r}
  - guest_write: {gpa: 0x1000, size: 4, value: 0xdeadbeef}
    expect: {result: fault, gpa: 0x1000, size: 4096}
  - host_read: {memory: ram, offset: 0x1000, size: 4}
    expect: {result: ok, value: 0x5a5a5a5a}
"""

CONCURRENT = """\
kvmmem: 1
name: fault-vs-munmap
arch: [x86, arm64, riscv]
variant: no-invalidate-retry
vcpus: 2
memory:
  ram: {size: 4M, kind: thp, prot: rw}
memslots:
  - {slot: 0, gpa: 0x100000, size: 4M, memory: ram, flags: [log_dirty]}
threads:
  vcpu0:
    - guest_write: {gpa: 0x100000, size: 8, value: 1}
    - guest_read: {gpa: 0x100000, size: 8, vcpu: 1}
  host:
    - host_munmap: {memory: ram, offset: 0x200000, size: 2M}
    - host_mmap: {name: again, size: 2M, kind: anon, prot: rw,
                  at: {memory: ram, offset: 0x200000}}
    - host_write: {memory: again, size: 1, value: 0xff}
  vmm:
    - set_memslot: {slot: 0, gpa: 0x100000, size: 0}
"""

ARM64_ALL_STEPS = """\
kvmmem: 1
name: every-step-kind
arch: arm64
granule: 16K
ipa_bits: 40
vcpus: 2
defaults: &rw {kind: memfd, prot: rw}
"""

# ``defaults`` is not a scenario key: the merge example below defines the anchor inside
# ``memory`` instead (the file above is completed in the test and also shows the error).
ARM64_ALL_STEPS_OK = """\
kvmmem: 1
name: every-step-kind
arch: arm64
granule: 16K
ipa_bits: 40
vcpus: 2
memory:
  ram: &rw {size: 1M, kind: memfd, prot: rw}
  bar: {size: 64K, kind: device, prot: rw}
  ring: {<<: *rw, kind: device-lazy, size: 16K}
  code: {size: 4K, kind: file, prot: rx}
memslots:
  - {slot: 0, gpa: 0x40000000, size: 1M, memory: ram}
  - {slot: 1, gpa: 0x50000000, size: 64K, memory: bar}
steps:
  - prefault: {gpa: 0x40000000, size: 64K, vcpu: 1}
  - guest_read: {gpa: 0x50000000, size: 4, path: native}
    expect: {result: ok, value: 0}
  - guest_write: {gpa: 0x60000000, size: 2, value: 0x1234, path: emulated}
    expect: {result: mmio, gpa: 0x60000000, len: 2, is_write: true, data: 0x1234}
  - guest_exec: {gpa: 0x40000000}
  - host_madvise: {memory: ram, size: 64K, advice: dontneed}
  - host_mmap: {name: huge, size: 2M, kind: hugetlb, prot: rw, fill: 0}
  - set_memslot: {slot: 2, gpa: 0x80000000, size: 2M, memory: huge, flags: [readonly]}
  - set_memslot: {slot: 3, gpa: 0x1001, size: 4K, hva: 0x7f0000000000}
    expect: {result: error, errno: EINVAL}
  - host_munmap: {memory: huge}
  - host_read: {memory: huge, size: 1}
    expect: {result: signal, signal: SIGSEGV}
  - get_dirty_log: {slot: 0}
    expect: {result: error, errno: ENOENT}
  - clear_dirty_log: {slot: 0, first_page: 64, num_pages: 64}
  - host_mprotect: {memory: code, size: 4K, prot: none}
  - host_write: {memory: ring, offset: 8, size: 8, value: 0xffffffffffffffff}
  - punch_hole: {memory: ram, offset: 16K, size: 8K}
  - set_memory_attributes: {gpa: 0x40000000, size: 4K, attributes: [private], flags: 0}
  - enable_cap: {cap: manual_dirty_log_protect2, args: [3, 0x8000000000000000]}
  - harvest_dirty_ring: {vcpu: 1}
  - reset_dirty_rings: {}
"""

DIRTY_LOG = """\
kvmmem: 1
name: dirty-log
variant: linux-5.4
memory:
  ram: {size: 64K, kind: anon, prot: rw}
memslots:
  - {slot: 0, gpa: 0x10000, size: 64K, memory: ram, flags: [log_dirty]}
steps:
  - guest_write: {gpa: 0x12000, size: 1, value: 1}
  - guest_write: {gpa: 0x10000, size: 1, value: 1}
  - get_dirty_log: {slot: 0}
    expect: {result: ok, dirty: [0x10, 0x12]}
  - get_dirty_log: {slot: 0}
    expect: {dirty: []}
"""

GOOD = {"ro": RO_MEMSLOT, "threads": CONCURRENT, "arm64": ARM64_ALL_STEPS_OK,
        "dirty": DIRTY_LOG}


def test_ro_memslot_loads_to_the_expected_objects() -> None:
    """SCENARIOS.md top level, memory, memslots and steps -> one exact Scenario."""
    got = load_scenario_text(RO_MEMSLOT, "ro.yaml")
    ram = Mapping("ram", 0x200000, "anon", PROT_READ | PROT_WRITE, fill=0x5A, line=7)
    assert got == Scenario(
        name="ro-vma-after-create",
        description="A writable memslot over a VMA that becomes read-only after creation.\n",
        arches=("x86",),
        variant="upstream",
        granule=4096,
        vcpus=1,
        memory={"ram": ram},
        memslots=(SetMemslot(index=0, line=9, slot=0, gpa=0, size=0x200000, memory="ram"),),
        steps=(
            GuestRead(index=0, line=11, gpa=0x1000, size=8,
                      expect={"result": "ok", "value": 0x5A5A5A5A5A5A5A5A}),
            HostMprotect(index=1, line=13, memory="ram", offset=0, size=0x200000,
                         prot=PROT_READ),
            GuestWrite(index=2, line=14, gpa=0x1000, size=4, value=0xDEADBEEF,
                       expect={"result": "fault", "gpa": 0x1000, "size": 4096}),
            HostRead(index=3, line=16, memory="ram", offset=0x1000, size=4,
                     expect={"result": "ok", "value": 0x5A5A5A5A}),
        ),
        threads=None,
        ipa_bits=None,
        source="ro.yaml",
    )
    assert not got.is_concurrent
    assert [s.op for s in got.all_steps()] == ["guest_read", "host_mprotect", "guest_write",
                                               "host_read"]


def test_threads_load_with_thread_names_and_indices() -> None:
    """A concurrent scenario (``threads``) for ``kvmmem explore``; a name made by
    host_mmap is usable by the later steps of its own thread."""
    got = load_scenario_text(CONCURRENT)
    assert got.steps is None and got.is_concurrent
    assert got.arches == ("x86", "arm64", "riscv")
    assert got.variant == "no-invalidate-retry" and got.vcpus == 2
    assert got.memslots[0].flags == ("log_dirty",) and got.memslots[0].flag_bits == 1
    assert got.threads is not None and list(got.threads) == ["vcpu0", "host", "vmm"]
    vcpu0, host, vmm = got.threads.values()
    assert vcpu0[1] == GuestRead(index=1, line=13, thread="vcpu0", gpa=0x100000, size=8, vcpu=1)
    assert host[0] == HostMunmap(index=0, line=15, thread="host", memory="ram",
                                 offset=0x200000, size=0x200000)
    assert host[1] == HostMmap(index=1, line=16, thread="host", name="again", size=0x200000,
                               kind="anon", prot=PROT_READ | PROT_WRITE,
                               at=HvaRef("ram", 0x200000))
    assert host[1].mapping == Mapping("again", 0x200000, "anon", 3, None,
                                      HvaRef("ram", 0x200000), 16)
    assert host[2] == HostWrite(index=2, line=18, thread="host", memory="again", size=1,
                                value=0xFF)
    assert vmm == (SetMemslot(index=0, line=20, thread="vmm", slot=0, gpa=0x100000, size=0,
                              hva=0),)
    assert [s.thread for s in got.all_steps()] == ["vcpu0"] * 2 + ["host"] * 3 + ["vmm"]


def test_every_step_kind_and_the_extensions() -> None:
    """All 18 step kinds, merge keys, arm64 granule, ipa_bits, guest path, raw hva."""
    got = load_scenario_text(ARM64_ALL_STEPS_OK)
    assert got.arches == ("arm64",) and got.granule == 16384 and got.ipa_bits == 40
    assert got.memory["ring"] == Mapping("ring", 16384, "device-lazy", 3, line=10)
    assert got.memory["code"].prot == PROT_READ | PROT_EXEC
    assert got.steps is not None
    assert {type(s) for s in got.steps} == set(STEP_TYPES.values())
    by_op = {s.op: s for s in got.steps}
    assert set(by_op) == set(STEP_TYPES)
    assert by_op["prefault"] == Prefault(index=0, line=16, gpa=0x40000000, size=0x10000, vcpu=1)
    assert by_op["guest_write"] == GuestWrite(
        index=2, line=19, gpa=0x60000000, size=2, value=0x1234, path="emulated",
        expect={"result": "mmio", "gpa": 0x60000000, "len": 2, "is_write": True,
                "data": 0x1234})
    assert by_op["guest_exec"] == GuestExec(index=3, line=21, gpa=0x40000000)
    assert by_op["host_madvise"] == HostMadvise(index=4, line=22, memory="ram", size=0x10000,
                                                advice="dontneed")
    assert got.steps[6] == SetMemslot(index=6, line=24, slot=2, gpa=0x80000000, size=0x200000,
                                      memory="huge", flags=("readonly",))
    assert got.steps[6].flag_bits == 2
    assert got.steps[7] == SetMemslot(index=7, line=25, slot=3, gpa=0x1001, size=4096,
                                      hva=0x7F0000000000,
                                      expect={"result": "error", "errno": "EINVAL"})
    assert by_op["host_munmap"] == HostMunmap(index=8, line=27, memory="huge")
    assert by_op["get_dirty_log"] == GetDirtyLog(index=10, line=30, slot=0,
                                                 expect={"result": "error", "errno": "ENOENT"})
    assert by_op["clear_dirty_log"] == ClearDirtyLog(index=11, line=32, slot=0, first_page=64,
                                                     num_pages=64)
    assert by_op["host_mprotect"].prot == PROT_NONE  # type: ignore[attr-defined]
    assert by_op["host_write"].value == (1 << 64) - 1  # type: ignore[attr-defined]
    assert by_op["punch_hole"] == PunchHole(index=14, line=35, memory="ram", offset=0x4000,
                                            size=0x2000)
    assert by_op["set_memory_attributes"] == SetMemoryAttributes(
        index=15, line=36, gpa=0x40000000, size=0x1000, attributes=("private",))
    assert by_op["set_memory_attributes"].attribute_bits == 8  # type: ignore[attr-defined]
    cap = by_op["enable_cap"]
    assert cap == EnableCap(index=16, line=37, cap="manual_dirty_log_protect2",
                            cap_args=(3, 1 << 63))
    assert isinstance(cap, EnableCap) and cap.cap_number == 168
    assert cap.all_args == (3, 1 << 63, 0, 0)
    assert cap.args() == {"cap": "manual_dirty_log_protect2", "args": (3, 1 << 63), "flags": 0}
    assert by_op["harvest_dirty_ring"] == HarvestDirtyRing(index=17, line=38, vcpu=1)
    assert by_op["reset_dirty_rings"] == ResetDirtyRings(index=18, line=39)
    assert by_op["reset_dirty_rings"].args() == {}


@pytest.mark.parametrize(("step", "message"), [
    ("enable_cap: {cap: dirty_log_rings, args: [1]}", "cap: 'dirty_log_rings' is not"),
    ("enable_cap: {cap: manual_dirty_log_protect2, args: [1, 2, 3, 4, 5]}",
     "struct kvm_enable_cap has 4 args, got 5"),
    ("enable_cap: {cap: manual_dirty_log_protect2, args: 1}", "expected a list of at most 4"),
    ("enable_cap: {cap: manual_dirty_log_protect2, args: [-1]}", "args[0]"),
    ("enable_cap: {args: [1]}", "cap"),
])
def test_enable_cap_mistakes(step: str, message: str) -> None:
    """enable_cap: ``cap`` is a known name, ``args`` at most four u64."""
    text = f"kvmmem: 1\nname: cap\nsteps:\n  - {step}\n"
    with pytest.raises(InputError) as err:
        load_scenario_text(text, "cap.yaml")
    assert message in str(err.value)


def test_dirty_log_expectations() -> None:
    """get_dirty_log outcomes carry ``dirty``: sorted absolute gfns (SCENARIOS.md)."""
    got = load_scenario_text(DIRTY_LOG)
    assert got.variant == "linux-5.4"
    assert got.steps is not None
    assert got.steps[2].expect == {"result": "ok", "dirty": [0x10, 0x12]}
    assert got.steps[3].expect == {"dirty": []}


def test_minimal_file_takes_the_documented_defaults() -> None:
    """Defaults of SCENARIOS.md: arch x86, variant upstream, granule 4K, vcpus 1;
    gpa/offset default 0, hva 0 when no memory is named, no flags."""
    got = load_scenario_text("kvmmem: 1\nname: m\nsteps:\n  - set_memslot: {slot: 1, size: 4K}\n"
                             "  - guest_read: {size: 1}\n")
    assert (got.arches, got.variant, got.granule, got.vcpus) == (("x86",), "upstream", 4096, 1)
    assert got.memory == {} and got.memslots == () and got.description == ""
    assert got.steps == (SetMemslot(index=0, line=4, slot=1, size=4096, hva=0),
                         GuestRead(index=1, line=5, size=1))


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("0x1000", 4096), ("4K", 4096), ("'4K'", 4096), ("2M", 0x200000),
     ("1_048_576", 1 << 20), ("0b1000000000000", 4096), ("1G", 1 << 30), ("0", 0)],
)
def test_sizes_parse_like_parse_size(text: str, value: int) -> None:
    """Sizes: an integer, hex, or a power-of-two K/M/G/T suffix (SCENARIOS.md)."""
    got = load_scenario_text(f"kvmmem: 1\nname: s\nsteps:\n  - prefault: {{size: {text}}}\n")
    assert got.steps is not None
    assert got.steps[0].size == value  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("prot", "bits"),
    [("r", PROT_READ), ("rw", PROT_READ | PROT_WRITE), ("wr", PROT_READ | PROT_WRITE),
     ("rwx", 7), ("x", PROT_EXEC), ("none", PROT_NONE), ("w", PROT_WRITE)],
)
def test_prot_letters(prot: str, bits: int) -> None:
    """prot: any of r, w, x, or none -> PROT_READ=1 | PROT_WRITE=2 | PROT_EXEC=4 (mman.h)."""
    got = load_scenario_text(
        f"kvmmem: 1\nname: p\nmemory:\n  m: {{size: 4K, kind: anon, prot: {prot}}}\nsteps: []\n")
    assert got.memory["m"].prot == bits
    assert prot_letters(bits) == ("".join(sorted(prot, key="rwx".index)) if bits else "none")


def test_step_table_matches_scenarios_md() -> None:
    """Every step kind of SCENARIOS.md, plus the clear_dirty_log, punch_hole,
    set_memory_attributes and enable_cap extensions; outcome keys
    (SCENARIOS.md's, plus the extensions abort, remaining and faults)."""
    assert list(STEP_TYPES) == [
        "guest_read", "guest_write", "guest_exec", "host_read", "host_write", "host_mmap",
        "host_munmap", "host_mprotect", "host_madvise", "set_memslot", "prefault",
        "get_dirty_log", "clear_dirty_log", "punch_hole", "set_memory_attributes",
        "enable_cap", "harvest_dirty_ring", "reset_dirty_rings"]
    assert set(EXPECT_KEYS) == {"result", "value", "errno", "gpa", "len", "is_write", "data",
                                "size", "flags", "dirty", "signal", "abort", "remaining",
                                "exit_reason", "suberror", "faults", "reset"}
    assert {k for keys in RESULT_KEYS.values() for k in keys} | {"result"} == set(EXPECT_KEYS)


# --- the corpus of broken files ---------------------------------------------------------


def _expected(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name}: no '# expect:' line"
    return first[len("# expect: "):]


def test_corpus_is_big_enough() -> None:
    """Issue 5: at least 30 broken scenario files, each with its expected message."""
    assert len(BROKEN) >= 30


@pytest.mark.parametrize("path", BROKEN, ids=[p.stem for p in BROKEN])
def test_broken_file_gives_its_exact_message(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each broken file fails with exactly the message on its first line."""
    monkeypatch.chdir(HERE)
    relative = f"broken/{path.name}"
    with pytest.raises(InputError) as info:
        load_scenario(relative)
    assert str(info.value) == _expected(path)
    assert re.match(rf"^{re.escape(relative)}:\d+: ", str(info.value))


def test_missing_file_and_directory(tmp_path: Path) -> None:
    """A missing path and a directory are InputErrors naming the path."""
    with pytest.raises(InputError) as info:
        load_scenario(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: no such file"
    with pytest.raises(InputError) as info:
        load_scenario(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, not a scenario file"


def test_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"#" * (4 << 20) + b"\n")
    with pytest.raises(InputError, match=r"big\.yaml: too large for a scenario file"):
        load_scenario(path)


def test_bytes_bom_and_crlf_are_read(tmp_path: Path) -> None:
    """UTF-8 with a BOM and CRLF line ends load; lines still count from 1."""
    text = "\ufeff" + DIRTY_LOG.replace("\n", "\r\n")
    path = tmp_path / "crlf.yaml"
    path.write_bytes(text.encode())
    got = load_scenario(path)
    assert got.source == str(path) and got.steps is not None and got.steps[2].line == 11
    assert load_scenario_text(text.encode()) == load_scenario_text(DIRTY_LOG)


def test_first_mistake_in_file_order_wins() -> None:
    """A misspelt key inside a step is reported before the key it lacks; a bad memory
    entry does not make its later uses fail too."""
    text = "kvmmem: 1\nname: n\nsteps:\n  - guest_write: {gpa: 0, sise: 4, value: 1}\n"
    with pytest.raises(InputError, match=r"^<string>:4: steps\[0\]\.guest_write\.sise: "):
        load_scenario_text(text)
    text = ("kvmmem: 1\nname: n\nsteps:\n  - host_read: {memory: ram, size: 4}\n"
            "memory:\n  ram: {size: 3K, kind: anon, prot: rw}\n")
    with pytest.raises(InputError) as info:
        load_scenario_text(text, "f.yaml")
    assert str(info.value) == ("f.yaml:6: memory.ram.size: '3K' is not a multiple of the "
                               "page size (4K)")


def test_unknown_key_where_no_key_was_expected_is_reported() -> None:
    """The ARM64_ALL_STEPS header carries a stray ``defaults`` key: rejected by name."""
    with pytest.raises(InputError) as info:
        load_scenario_text(ARM64_ALL_STEPS + "steps: []\n", "a.yaml")
    assert str(info.value).startswith("a.yaml:7: defaults: unknown key (known keys: kvmmem,")


def test_loader_imports_no_model_code() -> None:
    """The loader must not import the host, arch or kvm models (nothing runs)."""
    code = ("import sys, kvmmem.scenario\n"
            "bad = [m for m in sys.modules if m.split('.')[:2] in "
            "(['kvmmem', 'host'], ['kvmmem', 'arch'], ['kvmmem', 'kvm'])]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- never a traceback --------------------------------------------------------------------

KEYS = ["kvmmem", "name", "description", "arch", "variant", "page_size", "granule", "vcpus",
        "ipa_bits", "memory", "memslots", "steps", "threads", *STEP_TYPES, "expect", "gpa", "size",
        "value", "vcpu", "offset", "kind", "prot", "fill", "at", "advice", "slot", "hva",
        "flags", "first_page", "num_pages", "path", *EXPECT_KEYS, "ram", "buf", "<<", "="]
WORDS = ["2M", "4K", "0x1000", "0x2M", "rw", "r", "rwx", "none", "anon", "hugetlb",
         "device-lazy", "ok", "mmio", "EEXIST", "SIGSEGV", "x86", "arm64", "riscv", "upstream",
         "ram", "buf", "readonly", "log_dirty", "dontneed", "1:20", "010", "0x_1", "1__0",
         "16K", "native", "", "~", "yes"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
    st.sampled_from(WORDS), st.text(max_size=8),
)
KEYS_ST = st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers(-3, 3),
                    st.booleans(), st.none())
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS_ST, inner,
                                                                         max_size=5)),
    max_leaves=30,
)


def _check(text: str | bytes) -> None:
    """load_scenario_text returns a Scenario or raises InputError naming file:line."""
    try:
        got = load_scenario_text(text, "gen.yaml")
    except InputError as exc:
        assert re.match(r"^gen\.yaml(:\d+)?: \S", str(exc)), str(exc)
        return
    assert isinstance(got, Scenario)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(top=st.dictionaries(KEYS_ST, TREES, max_size=8), versioned=st.booleans())
def test_generated_structures_never_escape(top: dict[Any, Any], versioned: bool) -> None:
    """Random YAML structures with plausible and implausible keys (hypothesis)."""
    if versioned:
        top = {"kvmmem": 1, "name": "gen", **top}
    _check(yaml.safe_dump(top))


def _mutate(node: Any, data: st.DataObject) -> Any:
    """One random change somewhere in ``node``: replace, delete or add."""
    if isinstance(node, dict) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node, key=str)))
        action = data.draw(st.sampled_from(["descend", "delete", "replace", "add"]))
        if action == "descend":
            node[key] = _mutate(node[key], data)
        elif action == "delete":
            del node[key]
        elif action == "replace":
            node[key] = data.draw(TREES)
        else:
            node[data.draw(KEYS_ST)] = data.draw(TREES)
        return node
    if isinstance(node, list) and node and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(node) - 1))
        action = data.draw(st.sampled_from(["descend", "delete", "replace", "duplicate"]))
        if action == "descend":
            node[i] = _mutate(node[i], data)
        elif action == "delete":
            del node[i]
        elif action == "replace":
            node[i] = data.draw(TREES)
        else:
            node.insert(i, copy.deepcopy(node[i]))
        return node
    return data.draw(TREES) if data.draw(st.booleans()) else node


PARSED_GOOD = {name: yaml.safe_load(text) for name, text in GOOD.items()}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(sorted(PARSED_GOOD)), rounds=st.integers(1, 4), data=st.data())
def test_mutated_valid_scenarios_never_escape(base: str, rounds: int,
                                              data: st.DataObject) -> None:
    """Valid scenarios with 1-4 random mutations (hypothesis)."""
    tree = copy.deepcopy(PARSED_GOOD[base])
    for _ in range(rounds):
        tree = _mutate(tree, data)
    _check(yaml.safe_dump(tree))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_escapes(text: str) -> None:
    _check(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape(raw: bytes) -> None:
    _check(raw)


@settings(max_examples=200, deadline=None)
@given(base=st.sampled_from(sorted(GOOD)), cut=st.integers(0, 2000), junk=st.text(max_size=5))
def test_truncated_and_spliced_text_never_escapes(base: str, cut: int, junk: str) -> None:
    """A valid file cut anywhere, with a few random characters spliced in."""
    text = GOOD[base]
    cut %= len(text) + 1
    _check(text[:cut] + junk + text[cut:])
    _check(text[:cut])


def test_good_examples_survive_a_yaml_round_trip() -> None:
    """safe_dump of a good scenario still loads to an equal object (lines aside)."""
    for name, text in GOOD.items():
        original = load_scenario_text(text)
        again = load_scenario_text(yaml.safe_dump(PARSED_GOOD[name], sort_keys=False))
        assert original.name == again.name and original.memory.keys() == again.memory.keys()
        assert [s.op for s in original.all_steps()] == [s.op for s in again.all_steps()]


def test_alias_bombs_are_not_expanded() -> None:
    """Aliases are followed as a graph (each node visited once), so a "billion laughs"
    file is rejected at once by the schema instead of being expanded."""
    lines = ["kvmmem: 1", "name: lol", 'x0: &a0 ["lol", "lol", "lol", "lol", "lol"]']
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    lines += ["steps: *a11"]
    with pytest.raises(InputError) as info:
        load_scenario_text("\n".join(lines) + "\n", "lol.yaml")
    assert str(info.value).startswith("lol.yaml:3: x0: unknown key")
    text = "\n".join([*lines[:2], "memory: {ram: {size: 4K, kind: anon, prot: rw}}",
                      "steps:", "  - host_read: {memory: ram, size: 8}",
                      "  - &r {host_read: {memory: ram, size: 8}}", "  - *r"]) + "\n"
    got = load_scenario_text(text)
    assert got.steps is not None and got.steps[1] == HostRead(index=1, line=6, memory="ram",
                                                              size=8)
    assert got.steps[2] == HostRead(index=2, line=6, memory="ram", size=8)
