"""Measurements of the model and of this host's real KVM, for ``kvmmem bench`` and
the ``bench/*.py`` scripts (which print their own tables around these).

* :mod:`~kvmmem.benchmarks.faults` - model guest faults (fresh / host page present)
  and MMIO exits, on :class:`~kvmmem.kvm.vm.Vm`;
* :mod:`~kvmmem.benchmarks.memslots` - model KVM_SET_USER_MEMORY_REGION cost with
  0..32,000 slots present;
* :mod:`~kvmmem.benchmarks.stage2` - page-table engine map/unmap rates and bytes
  per mapped 4K page, per architecture;
* :mod:`~kvmmem.benchmarks.realkvm` - the same figures on /dev/kvm;
* :mod:`~kvmmem.benchmarks.suite` - the ``kvmmem bench`` set: names, units, the
  model / real KVM runs with shared sizes, the JSON and the side-by-side table.

Every function returns plain numbers; nothing here asserts on a time.  Each module's
``run(quick, tick)`` returns ``{name: value}``; ``tick`` is called with a label after
each piece of work (:mod:`~kvmmem.benchmarks.common`).
"""
