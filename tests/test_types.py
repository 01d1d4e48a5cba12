"""Address types and size parsing (SCENARIOS.md: sizes are ints, hex or K/M/G/T suffixes)."""

import pytest

from kvmmem.errors import InputError
from kvmmem.types import (
    Gfn,
    Gpa,
    align_down,
    align_up,
    format_size,
    gfn_to_gpa,
    gpa_to_gfn,
    is_aligned,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [("2M", 0x200000), ("0x1000", 4096), (4096, 4096), ("4K", 4096), ("1G", 1 << 30),
     ("1T", 1 << 40), ("0", 0), ("16KiB", 16384), ("0x2M", 0x200000)],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["-1", "2X", "", "1.5M", True, -4096, None, [1]])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(InputError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


def test_gfn_conversions_mirror_kernel_helpers() -> None:
    # gpa_to_gfn()/gfn_to_gpa() in include/linux/kvm_host.h shift by PAGE_SHIFT.
    assert gpa_to_gfn(Gpa(0x12345678)) == 0x12345
    assert gfn_to_gpa(Gfn(0x12345)) == 0x12345000


def test_alignment() -> None:
    assert align_down(0x2FFFFF, 0x200000) == 0x200000
    assert align_up(0x200001, 0x200000) == 0x400000
    assert is_aligned(0x400000, 0x200000)
    assert format_size(0x200000) == "2M"
