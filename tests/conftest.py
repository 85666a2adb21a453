"""Shared fixtures. Keep minimal; helpers that several test files use live in tests/helpers.py."""

import uuid

import pytest


@pytest.fixture
def memory_store_url():
    """A fresh ``memory://`` URL (fsspec's in-process filesystem: the non-rename publish path)."""
    import fsspec

    name = f"test-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)
