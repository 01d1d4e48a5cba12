"""Replay tokens: a schedule as a short printable string.

A token holds the scenario's name and a digest of its content, the
architecture, the variant and the *choices* of the schedule: the thread
picked at every transition where more than one thread could run (where only
one can, there is nothing to record).  It is the zlib-compressed JSON of
those fields in URL-safe base64 behind the prefix ``kx1.``, so it survives a
shell, a URL and an e-mail.

The explorer also writes the token of a violation to
``<replay-dir>/<scenario name>.<arch>.<variant>.replay`` (``--replay-dir``,
default the current directory); ``kvmmem explore FILE --replay`` takes the
token itself or the path of such a file.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from kvmmem.errors import InputError
from kvmmem.scenario.model import Scenario

PREFIX = "kx1."


def scenario_digest(scenario: Scenario) -> str:
    """A short digest of what the scenario says (not where it was loaded from)."""
    text = repr(dataclasses.replace(scenario, source=""))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Token:
    """A decoded replay token."""

    scenario: str
    digest: str
    arch: str
    variant: str
    choices: tuple[int, ...]

    def encode(self) -> str:
        """The printable token."""
        body = json.dumps({"n": self.scenario, "h": self.digest, "a": self.arch,
                           "v": self.variant,
                           "c": base64.b64encode(bytes(self.choices)).decode()},
                          separators=(",", ":"), sort_keys=True)
        packed = zlib.compress(body.encode(), 9)
        return PREFIX + base64.urlsafe_b64encode(packed).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Token:
        """Parse a token (or raise InputError saying what is wrong with it)."""
        text = text.strip()
        if not text.startswith(PREFIX):
            raise InputError(f"--replay: not a kvmmem replay token (expected '{PREFIX}...')")
        raw = text[len(PREFIX):]
        try:
            packed = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
            body = json.loads(zlib.decompress(packed).decode())
            choices = tuple(base64.b64decode(body["c"]))
            return cls(str(body["n"]), str(body["h"]), str(body["a"]), str(body["v"]), choices)
        except (ValueError, KeyError, TypeError, zlib.error) as err:
            raise InputError(f"--replay: damaged replay token ({err})") from None

    def check(self, scenario: Scenario) -> None:
        """Raise InputError unless the token was made for this scenario content."""
        if self.digest != scenario_digest(scenario):
            raise InputError(f"--replay: the token was made for scenario {self.scenario!r} with "
                             f"other content (digest {self.digest}); this file is "
                             f"{scenario.name!r} ({scenario_digest(scenario)})")


def read_token(value: str) -> Token:
    """A token given on the command line: the token itself, or a file holding it."""
    if not value.strip().startswith(PREFIX):
        path = Path(value)
        if not path.is_file():
            raise InputError(f"--replay: {value!r} is neither a replay token ({PREFIX}...) "
                             "nor a replay file")
        try:
            return Token.decode(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"--replay: cannot read {value}: {err}") from None
    return Token.decode(value)


def replay_file_name(scenario: str, arch: str, variant: str) -> str:
    """``<scenario>.<arch>.<variant>.replay`` (path separators replaced)."""
    safe = scenario.replace("/", "_").replace("\\", "_")
    return f"{safe}.{arch}.{variant}.replay"


def write_token(directory: Path, token: Token) -> Path:
    """Write ``token`` to its replay file in ``directory``; returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / replay_file_name(token.scenario, token.arch, token.variant)
    path.write_text(token.encode() + "\n", encoding="utf-8")
    return path
