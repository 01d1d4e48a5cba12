"""The private apt configuration and the parsing of apt's output."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmmem.machine import MachineError, MachineUnavailable
from kvmmem.machine.apt import AptConfig, depends, last_error_line, mirror_uri, parse_record
from kvmmem.machine.fetch import kernel_packages

DEB822 = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822_skips_comments_and_security(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822)
    assert mirror_uri((sources,)) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources(tmp_path: Path) -> None:
    sources = tmp_path / "sources.list"
    sources.write_text("# deb http://old/ x main\n"
                       "deb http://security.example/debian-security bookworm-security main\n"
                       "deb [arch=amd64] http://ftp.example/debian/ bookworm main\n")
    assert mirror_uri((tmp_path / "absent", sources)) == "http://ftp.example/debian"


def test_no_mirror_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(MachineUnavailable, match="no Debian mirror"):
        mirror_uri((tmp_path / "absent",))


def test_private_config_names_suite_arch_and_own_state(tmp_path: Path) -> None:
    apt = AptConfig(tmp_path / "apt", "trixie-backports", "riscv64", "http://m/debian")
    apt.prepare()
    line = apt.sources_file.read_text()
    assert line.startswith("deb [arch=riscv64")
    assert line.rstrip().endswith("http://m/debian trixie-backports main")
    opts = apt.options()
    pairs = dict(o.split("=", 1) for o in opts[1::2])
    assert opts[0::2] == ["-o"] * len(pairs)
    assert pairs["Dir::Etc::SourceList"] == str(apt.sources_file)
    assert pairs["Dir::Etc::SourceParts"] == "/dev/null"
    assert pairs["Dir::State::status"] == "/dev/null"
    assert pairs["Dir::State::Lists"] == str(tmp_path / "apt/lists")
    assert pairs["Dir::Cache"] == str(tmp_path / "apt/cache")
    assert pairs["APT::Architectures::"] == "riscv64"
    assert pairs["APT::Architecture"] == "riscv64"
    assert (tmp_path / "apt/lists/partial").is_dir()


def test_records_and_depends() -> None:
    record = parse_record("Package: linux-image-arm64\nVersion: 7.3.4-1~bpo13+1\n"
                          "Depends: linux-base-arm64 (= 7.3.4-1~bpo13+1), dracut | "
                          "initramfs-tools (>= 0.120), libc6:arm64 (>= 2.38)\n"
                          "Description: x\n more\n\nPackage: other\n")
    assert record["Version"] == "7.3.4-1~bpo13+1"
    assert record["Description"] == "x\nmore"
    assert depends(record) == [["linux-base-arm64"], ["dracut", "initramfs-tools"], ["libc6"]]


def test_last_error_line() -> None:
    out = "Reading package lists...\nE: Unable to locate package foo\nW: later warning\n"
    assert last_error_line(out) == "E: Unable to locate package foo"
    assert last_error_line("a\n\nb\n") == "b"
    assert last_error_line("") == "no output"


class FakeApt(AptConfig):
    def __init__(self, records: dict[str, str]) -> None:
        super().__init__(Path("/nonexistent"), "trixie-backports", "arm64", "http://m")
        object.__setattr__(self, "records", records)

    def show(self, package: str) -> dict[str, str]:
        records: dict[str, str] = self.records  # type: ignore[attr-defined]
        if package not in records:
            raise MachineError(f"E: No packages found: {package}")
        return {"Package": package, "Version": "7.3.4-1", "Depends": records[package]}


def test_kernel_packages_follow_the_7x_split() -> None:
    apt = FakeApt({
        "linux-image-arm64": "linux-base-arm64 (= 1), linux-image-7.3.4+deb13-arm64 (= 1), "
                             "linux-modules-arm64 (= 1)",
        "linux-base-arm64": "linux-base-7.3.4+deb13-arm64 (= 1)",
        "linux-modules-arm64": "linux-base-arm64, linux-modules-7.3.4+deb13-arm64",
        "linux-image-7.3.4+deb13-arm64": "dracut | initramfs-tools | linux-initramfs-tool, "
                                         "linux-base-7.3.4+deb13-arm64, "
                                         "linux-binary-7.3.4+deb13-arm64, "
                                         "linux-modules-7.3.4+deb13-arm64",
        "linux-base-7.3.4+deb13-arm64": "",
        "linux-binary-7.3.4+deb13-arm64": "",
        "linux-modules-7.3.4+deb13-arm64": "kmod, linux-base-7.3.4+deb13-arm64",
    })
    version, found = kernel_packages(apt, "linux-image-arm64")
    assert version == "7.3.4-1"
    assert sorted(found) == ["linux-base-7.3.4+deb13-arm64", "linux-binary-7.3.4+deb13-arm64",
                             "linux-image-7.3.4+deb13-arm64",
                             "linux-modules-7.3.4+deb13-arm64"]


def test_kernel_packages_of_a_6x_image() -> None:
    apt = FakeApt({"linux-image-amd64": "linux-image-6.1.0-50-amd64 (= 6.1.176-1)",
                   "linux-image-6.1.0-50-amd64": "kmod, linux-base (>= 4.3~), "
                                                 "initramfs-tools | linux-initramfs-tool",
                   "linux-base": "debconf"})
    assert list(kernel_packages(apt, "linux-image-amd64")[1]) == ["linux-image-6.1.0-50-amd64"]


def test_missing_metapackage_is_a_machine_error() -> None:
    with pytest.raises(MachineError, match="No packages found: linux-image-arm64-16k"):
        kernel_packages(FakeApt({}), "linux-image-arm64-16k")
