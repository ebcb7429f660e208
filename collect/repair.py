"""Repair a store: keep its longest prefix of good shards, so that the next collection resumes after it.

    python -m saetron.collect --repair runs/pilot/activations

A shard is bad when it is missing, truncated, or disagrees with the manifest (store.check_shard).
Shards after a bad one are dropped too: a store is one ordered stream of text. Every manifest entry
carries the stream state right after its shard, so the repaired manifest resumes exactly there, and
re-running the collection command then gives the store an uninterrupted run would have written.
Shard files the manifest does not list (a crash between a shard's rename and the manifest's rewrite,
or an earlier collection) and temporaries are removed. A manifest that fails validation cannot be
repaired (its error says which field): restore it or collect again.

The folder of a multi-site collection (stores in layer_L.HOOK_POINT/ subfolders) is repaired site by site;
the next collection then drops the shards a site holds beyond the others (collector.align_sites), so
every site resumes from the same text.
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

from .lock import StoreLock
from .store import StoreError, check_shard, orphan_shards, read_manifest, write_manifest

logger = logging.getLogger(__name__)


def first_bad_shard(folder: str | Path, manifest: dict) -> tuple[int, str] | None:
    """(index, reason) of the first shard that fails check_shard, or None when all pass."""
    for index in range(len(manifest["shards"])):
        try:
            check_shard(Path(folder), manifest, index)
        except StoreError as e:
            return index, str(e)
    return None


def truncate_store(folder: str | Path, manifest: dict, keep: int) -> list[dict]:
    """Keep the first `keep` shards of the store in `folder` (its manifest rewritten to resume after them,
    then the other shard files removed); returns the dropped entries. Under the store's lock."""
    dropped, kept = manifest["shards"][keep:], manifest["shards"][:keep]
    manifest.update(shards=kept, total_tokens=sum(e["tokens"] for e in kept),
                    stream_state=kept[-1]["stream_state"] if kept else None, stream_ended=False)
    write_manifest(folder, manifest)  # first: from here on the dropped shards are orphans
    for entry in dropped:
        Path(folder, entry["file"]).unlink(missing_ok=True)
    return dropped


def site_stores(folder: str | Path) -> list[Path]:
    """The site stores (layer_L.HOOK_POINT/ with a manifest) of a multi-site collection folder."""
    return sorted(p.parent for p in Path(folder).glob("layer_*.*/manifest.json"))


def repair_store(folder: str | Path) -> dict:
    """Cut the store in `folder` back to its shards before the first bad one (under the store's lock);
    returns the manifest as written. The folder of a multi-site collection: each site's store, under the
    folder's lock too; returns {site folder name: manifest}."""
    folder = Path(folder)
    sites = site_stores(folder) if folder.is_dir() and not (folder / "manifest.json").exists() else []
    if sites:
        with StoreLock(folder):
            return {site.name: repair_store(site) for site in sites}
    read_manifest(folder)  # no folder or no manifest: said before a lock file is made
    with StoreLock(folder):
        manifest = read_manifest(folder)
        bad = first_bad_shard(folder, manifest)
        if bad is not None:
            index, reason = bad
            dropped = truncate_store(folder, manifest, index)
            logger.warning("%s; dropped it and the %d shard(s) after it (%d tokens): the store keeps %d "
                           "shards, %d tokens, and resumes after them", reason, len(dropped) - 1,
                           sum(e["tokens"] for e in dropped), len(manifest["shards"]),
                           manifest["total_tokens"])
        temporaries = [os.path.basename(p) for p in glob.glob(str(folder / "*.tmp"))]
        leftovers = orphan_shards(folder, manifest) + temporaries
        for name in leftovers:
            os.remove(folder / name)
        if leftovers:
            logger.warning("removed %d file(s) the manifest does not list: %s", len(leftovers), leftovers[:5])
        if bad is None and not leftovers:
            logger.info("%s: all %d shards are complete and match the manifest; nothing to repair", folder,
                        len(manifest["shards"]))
    return manifest
