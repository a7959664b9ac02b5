"""Shared fixtures for hubfast's Python tests."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:  # imported in the fixture, after the sanity check below has run
    from hubfast.server import TFHubServer


def pytest_sessionstart(session) -> None:
    """Sanity check: the native module must import, or nothing meaningful can run."""
    try:
        import hubfast._core  # noqa: F401
    except ImportError as e:
        raise pytest.UsageError(
            f"hubfast._core does not import ({e}). Build it first: `dev/build-inplace` "
            "(then run with PYTHONPATH=python) or `pip install -e .`") from e


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty TFHUB_CACHE_DIR for this test."""
    d = tmp_path / "tfhub_cache"
    d.mkdir()
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(d))
    return d


@pytest.fixture
def server() -> Iterator["TFHubServer"]:
    """A loopback TF Hub server with nothing on it; fails the test if it saw a server error.
    Modules that need it stocked define their own ``server``."""
    from hubfast.server import TFHubServer
    s = TFHubServer()
    s.start()
    try:
        yield s
    finally:
        s.close()
        assert not s.errors, s.errors
