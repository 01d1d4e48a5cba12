"""kvmmem: an executable, bit-faithful model of how Linux KVM maps guest
physical memory onto host memory (memslots over host VMAs, stage-2 tables of
arm64, x86 and RISC-V, MMU-notifier invalidation, one fault-in path)."""

__version__ = "0.1.0"
