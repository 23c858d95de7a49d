"""The manifest in ``spd_checkpoint.json``: the bytes and sha256 of every file of a checkpoint,
written at save and checked at load.

The sha256 turns a damaged file into a clear error at load; hashing reads every byte once more
(``sha256_file``: 254 MiB/s, ~4 s per GiB, measured on this project's busy 2-core machine), so
it can be skipped (``verify=False``, ``--no-verify``) for very large checkpoints; the size check
always runs.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .layout import META_FILE, TOKENIZER_DIR, CheckpointError, inside

_HASH_CHUNK = 1 << 24


def check_manifest(root: Path, meta: dict[str, Any], verify: bool = True) -> None:
    """Every file the manifest lists lies inside ``root`` and exists with its size (and sha256
    when ``verify``)."""
    for rel, entry in meta.get("files", {}).items():
        f = inside(root, rel, "the manifest entry")
        if rel.startswith(TOKENIZER_DIR + "/"):
            continue  # load_tokenizer reports these (and they can be overridden)
        if isinstance(entry, dict) and isinstance(entry.get("bytes"), int):
            size, digest = entry["bytes"], entry.get("sha256")
        elif isinstance(entry, int):
            size, digest = entry, None
        else:
            raise CheckpointError(f"{root / META_FILE}: the manifest entry {rel!r} has no "
                                  "'bytes' (its size); the metadata is damaged: re-save or "
                                  "re-convert the checkpoint")
        if not f.is_file():
            raise CheckpointError(f"{root}: file {rel} is missing; the checkpoint is "
                                  "incomplete: copy it again or re-save it")
        if f.stat().st_size != size:
            raise CheckpointError(f"{root}: file {rel} has {f.stat().st_size} bytes but "
                                  f"{size} were written; the checkpoint is truncated or corrupt:"
                                  " copy it again or re-save it")
        if verify and digest is not None and sha256_file(f) != digest:
            raise CheckpointError(f"{root}: file {rel} does not match the sha256 recorded when "
                                  "it was saved; its content is damaged: copy the checkpoint "
                                  "again or re-save it (--no-verify skips this check)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def make_manifest(root: Path) -> dict[str, dict[str, Any]]:
    """The manifest of every file under ``root`` (paths relative to it)."""
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file()}
