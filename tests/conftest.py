"""Shared fixtures. Keep minimal: each package's tests own their helpers."""

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
