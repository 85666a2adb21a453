"""Durable writes, in the order that makes ``complete`` trustworthy after a power loss: every data
file and directory fsynced, then the ``complete: true`` marker written and fsynced, then the
rename into place, then the parent directory fsynced. Checked by recording every fsync and
rename of a real publish on a local store (a power loss itself cannot be staged in a test)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import storage.location as location_module
from storage import Store
from trainer.checkpoint import save_checkpoint

N, DIM, CHUNK = 1000, 8, 256
CURRICULUM = {"rounds": 4, "k": 1, "tau": 0.1, "mode": "progressive"}


@pytest.fixture
def journal(monkeypatch):
    """Every fsync (with whether its node's marker said complete at that moment) and rename."""
    events = []
    real_fsync, real_rename = location_module.fsync_path, os.rename

    def fsync_path(path):
        path = Path(path)
        # The staged node this file belongs to (its name starts with .tmp- or .staging-), if any.
        staged = next((p for p in (path, *path.parents) if p.name.startswith((".tmp-", ".staging-"))), None)
        marker = staged / "zarr.json" if staged else None
        complete = bool(marker and marker.exists()
                        and json.loads(marker.read_text()).get("attributes", {}).get("complete"))
        events.append(("fsync", str(path), complete))
        real_fsync(path)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(location_module, "fsync_path", fsync_path)
    monkeypatch.setattr(location_module.os, "rename", rename)
    return events


def _files_under(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")} | {str(root)}


def _check_order(events, staged_prefix: str, final: Path):
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(final)]
    assert len(renames) == 1, events
    moved = renames[0]
    staged = Path(events[moved][1])
    assert staged.name.startswith(staged_prefix)
    before = [e for e in events[:moved] if e[0] == "fsync" and e[1].startswith(str(staged))]
    marker = str(staged / "zarr.json")
    # Every file and directory the node holds now was fsynced under its staging name.
    synced = {e[1].replace(str(staged), str(final), 1) for e in before}
    assert _files_under(final) <= synced, sorted(_files_under(final) - synced)
    # Data first (marker still false), then the marker itself (true), then the rename.
    marker_syncs = [i for i, e in enumerate(before) if e[1] == marker and e[2]]
    assert marker_syncs, "the complete marker was never fsynced"
    assert all(not e[2] for e in before[:marker_syncs[0]] if e[1] != marker)
    assert all(e[1] != marker or e[2] for e in before[marker_syncs[0]:])
    # After the rename: the parent directory, which records it.
    assert any(e[0] == "fsync" and e[1] == str(final.parent) for e in events[moved + 1:])


def test_publishing_neighbourhoods_syncs_data_then_marker_then_renames(tmp_path, journal):
    store = Store.create_or_open(str(tmp_path / "s"), N, DIM, "toy", CURRICULUM, chunk_rows=CHUNK)
    rng = np.random.default_rng(0)
    entropy = rng.random(N, dtype=np.float32)
    journal.clear()
    store.publish_neighbourhoods(1, rng.integers(0, N, (N, 1)), entropy, entropy < 0.25,
                                 {"tau": 0.1, "fraction": 0.25, "mode": "progressive", "source_features_round": 0,
                                  "backend": "torch", "seconds": 0.1})
    _check_order(journal, ".tmp-", tmp_path / "s" / "neighbourhoods" / "round-0001")


def test_completing_features_syncs_every_chunk_then_marker_then_renames(tmp_path, journal):
    store = Store.create_or_open(str(tmp_path / "s"), N, DIM, "toy", CURRICULUM, chunk_rows=CHUNK)
    bank = np.random.default_rng(1).standard_normal((N, DIM)).astype(np.float32)
    journal.clear()
    store.write_features(0, bank / np.linalg.norm(bank, axis=1, keepdims=True))
    _check_order(journal, ".staging-", tmp_path / "s" / "features" / "round-0000")
    # Each writer synced its own chunks as it wrote them, before completion began.
    n_chunks = -(-N // CHUNK)
    first = [e[1] for e in journal[:2 * n_chunks]]
    assert first == [f"{tmp_path}/s/features/.staging-round-0000-{store.writer}/{array}/c/{c}/0"
                     for c in range(n_chunks) for array in ("rows", "digests")]


def test_labels_are_published_durably(tmp_path, journal):
    store = Store.create_or_open(str(tmp_path / "s"), N, DIM, "toy", CURRICULUM, chunk_rows=CHUNK)
    journal.clear()
    store.write_labels(np.arange(N, dtype=np.int64) % 10)
    _check_order(journal, ".tmp-", tmp_path / "s" / "labels")


def test_a_checkpoint_is_fsynced_before_its_rename_and_its_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(str(path), {"memory": torch.ones(3, 2)})
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert ".tmp-" in events[0][1] and events[1][1] == str(path) and events[2][1] == str(tmp_path)
    assert torch.equal(torch.load(path, weights_only=True)["memory"], torch.ones(3, 2))
