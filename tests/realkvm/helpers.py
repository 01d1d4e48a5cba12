"""Constants and process probes shared by the real-KVM tests."""

from __future__ import annotations

import os

M = 2 << 20
G = 0x4000_0000
"""The guest physical base the tests put their slots at."""


def open_fds() -> int:
    """How many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))


def rss_bytes() -> int:
    """Resident set size of this process (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
