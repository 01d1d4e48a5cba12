"""A private apt configuration: one Debian suite and one architecture, own lists and
cache, ``status`` /dev/null.  The system's apt state is never read or written
(kernel-matrix.md §1); only the mirror URI is taken from the system's sources."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmmem.machine.errors import MachineError, MachineUnavailable

SYSTEM_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def mirror_uri(paths: tuple[Path, ...] = SYSTEM_SOURCES) -> str:
    """Returns the Debian archive URI of the system's apt sources (deb822 ``URIs:``
    or one-line ``deb URI suite ...``), the first that is not a security archive.

    Raises :class:`MachineUnavailable` when no source names one."""
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for uri in _uris(text):
            if "security" not in uri:
                return uri.rstrip("/")
    names = ", ".join(str(p) for p in paths)
    raise MachineUnavailable(f"no Debian mirror found in the system's apt sources ({names})")


def _uris(text: str) -> list[str]:
    uris: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        m = re.match(r"URIs:\s*(.+)", line, re.IGNORECASE)
        if m:
            uris.extend(m.group(1).split())
            continue
        m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", line)
        if m:
            uris.append(m.group(1))
    return uris


@dataclass(frozen=True)
class AptConfig:
    """apt for ``suite`` and Debian architecture ``arch`` rooted at ``root`` (its
    sources file, lists and cache live there)."""

    root: Path
    suite: str
    arch: str
    mirror: str

    @property
    def sources_file(self) -> Path:
        """Path of the private sources file."""
        return self.root / "sources.list"

    def sources_text(self) -> str:
        """Returns the one-line sources file naming the mirror, suite and arch."""
        signed = f" signed-by={KEYRING}" if KEYRING.exists() else ""
        return f"deb [arch={self.arch}{signed}] {self.mirror} {self.suite} main\n"

    def options(self) -> list[str]:
        """Returns the ``-o`` options that point apt at this configuration only."""
        opts = {
            "Dir::Etc::SourceList": str(self.sources_file),
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": "/dev/null",
            "Dir::State::Lists": str(self.root / "lists"),
            "Dir::Cache": str(self.root / "cache"),
            "Dir::State::status": "/dev/null",
            "APT::Architectures::": self.arch,
            "APT::Architecture": self.arch,
            "APT::Get::AllowUnauthenticated": "false",
            "Debug::NoLocking": "true",
            "APT::Sandbox::User": "root",
        }
        out: list[str] = []
        for key, value in opts.items():
            out += ["-o", f"{key}={value}"]
        return out

    def prepare(self) -> None:
        """Creates the directories and the sources file."""
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.sources_file.write_text(self.sources_text(), encoding="utf-8")

    def _run(self, tool: str, args: list[str], cwd: Path | None = None,
             what: str = "") -> str:
        if shutil.which(tool) is None:
            raise MachineUnavailable(f"{tool} not found: this needs a Debian host with apt")
        proc = subprocess.run([tool, *self.options(), *args], cwd=cwd, capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise MachineError(f"{what or tool + ' ' + args[0]} failed ({self.suite} "
                               f"{self.arch}): {last_error_line(proc.stderr or proc.stdout)}")
        return proc.stdout

    def update(self) -> None:
        """``apt-get update`` of the private lists; raises :class:`MachineError`
        with apt's last error line."""
        self.prepare()
        self._run("apt-get", ["update", "-q"], what="apt-get update")

    def show(self, package: str) -> dict[str, str]:
        """Returns the candidate record of ``package`` (field -> value).

        Raises :class:`MachineError` when the suite has no such package."""
        text = self._run("apt-cache", ["show", "--no-all-versions", package],
                         what=f"apt-cache show {package}")
        return parse_record(text)

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """``apt-get download`` of ``packages`` into ``dest``; returns the .deb paths.

        Raises :class:`MachineError` naming the packages and apt's last error line."""
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        self._run("apt-get", ["download", "-q", *packages], cwd=dest,
                  what=f"download of {' '.join(packages)}")
        return sorted(set(dest.glob("*.deb")) - before)


def last_error_line(text: str) -> str:
    """Returns the most telling line of apt's output: the last ``E:`` line, else the
    last non-empty one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("E:", "Err:"))]
    if errors:
        return errors[-1]
    return lines[-1] if lines else "no output"


def parse_record(text: str) -> dict[str, str]:
    """Returns the first deb822 record of ``text`` as field -> value (continuation
    lines joined)."""
    record: dict[str, str] = {}
    key = ""
    for line in text.splitlines():
        if not line.strip():
            if record:
                break
            continue
        if line[0] in " \t" and key:
            record[key] += "\n" + line.strip()
            continue
        k, _, v = line.partition(":")
        key = k.strip()
        record[key] = v.strip()
    return record


def depends(record: dict[str, str]) -> list[list[str]]:
    """Returns ``Pre-Depends`` then ``Depends`` of a record as alternatives lists
    of bare package names (versions and arch qualifiers dropped)."""
    out: list[list[str]] = []
    for field in ("Pre-Depends", "Depends"):
        for clause in record.get(field, "").split(","):
            alts = [re.sub(r"\s*\(.*?\)|:\w+|\s*\[.*?\]", "", a).strip()
                    for a in clause.split("|")]
            alts = [a for a in alts if a]
            if alts:
                out.append(alts)
    return out
