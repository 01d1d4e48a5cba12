"""Suite-wide settings: hypothesis keeps no example database (tests leave no
files behind) and never times a single example (the machine is shared)."""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "kvmmem",
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("kvmmem")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A fresh directory, removed after the test (pytest's own ``tmp_path``
    keeps the last runs' directories under /tmp: tests leave no files)."""
    with tempfile.TemporaryDirectory(prefix="kvmmem-test-") as directory:
        yield Path(directory)
