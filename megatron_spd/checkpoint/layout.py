"""The checkpoint format on disk: a Megatron-LM checkpoint with the SPD plan inline.

Every checkpoint the tools write is one Megatron-LM's ``--load`` reads as its own:

    CKPT/
      latest_checkpointed_iteration.txt  "release" (Megatron-LM's tracker; model-only weights)
      release/                           megatron.core.dist_checkpointing (torch_dist): *.distcp,
                                         .metadata, metadata.json, common.pt = {args, iteration,
                                         checkpoint_version}; ``args`` carry the model shape and
                                         the plan inline (args.py)
      spd_checkpoint.json                ours: format, tokenizer ref, dense origin, saved TP,
                                         manifest (bytes and sha256 of every file: manifest.py)
      tokenizer/                         the vocabulary files

The args are the one source of the model shape and the plan; ``spd_checkpoint.json`` only adds
what Megatron-LM has no place for. Reading (read.py) also accepts an ``iter_*``/``release``
directory, Megatron-LM's own torch_dist checkpoints at any TP (optimizer and RNG tensors are
ignored; the plan and shape come from their args; the tokenizer must then be given), and format-1
megatron-spd checkpoints (legacy.py). Writing: save.py.

This module holds the names on disk, where the weights of a named directory are (``locate``),
our metadata file, and ``StoredCheckpoint``, what a checkpoint holds.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core.config import ModelConfig
from ..core.plan import SPDPlan
from ..data.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from ..errors import SPDError
from ..files import read_json_object
from ..parallel.mcore_versions import has_common_state

CKPT_FORMAT = "megatron-spd-checkpoint/2"
LEGACY_FORMAT = "megatron-spd-checkpoint/1"  # spd_checkpoint.json + weights/ (read only)
META_FILE = "spd_checkpoint.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's name
RELEASE_DIR = "release"
TOKENIZER_DIR = "tokenizer"
_ITER_DIR = re.compile(r"^(iter_\d{7}|release)$")


class CheckpointError(SPDError, ValueError):
    """A checkpoint that cannot be read or written as asked; the message says what to do."""


@dataclass
class StoredCheckpoint:
    """What a checkpoint on disk holds, read without a model or a process group."""

    root: Path                       # the directory the user named (or its checkpoint root)
    weights: Path                    # the torch_dist directory
    config: ModelConfig
    plan: Optional[SPDPlan]          # None: the args carry no plan (a dense Megatron-LM model)
    tokenizer_ref: Any = None        # our ref, a path from Megatron-LM's args, or None
    dense_source: Optional[str] = None
    saved_tp: Optional[int] = None
    layout: str = "megatron-lm"      # megatron-lm | legacy
    meta: dict[str, Any] = field(default_factory=dict)

    def tokenizer(self, override: Any = None) -> Tokenizer:
        """``override`` (anything ``load_tokenizer`` takes), else the checkpoint's own."""
        if override is not None:
            return load_tokenizer(override)
        if self.tokenizer_ref is None:
            raise TokenizerError(f"{self.root} carries no tokenizer (a Megatron-LM checkpoint "
                                 "keeps it outside, and its --tokenizer-model path is not here):"
                                 " pass --tokenizer PATH (tokenizer.json, tokenizer.model, a "
                                 "Hugging Face directory or a .gguf file), e.g. "
                                 "tools/convert_checkpoint.py --mcore CKPT --tokenizer PATH "
                                 "--out NEW writes a checkpoint that carries it")
        if isinstance(self.tokenizer_ref, dict) and self.tokenizer_ref.get("path"):
            inside(self.root, str(self.tokenizer_ref["path"]), "the tokenizer path")
        return load_tokenizer(self.tokenizer_ref, base_dir=self.root)


def is_checkpoint(path: str | Path) -> bool:
    """A directory in a layout ``read_checkpoint`` understands (without reading it)."""
    p = Path(path)
    return p.is_dir() and ((p / META_FILE).is_file() or (p / TRACKER_FILE).is_file()
                           or is_dist_dir(p))


#: Files Megatron-LM adds to a checkpoint directory it saves into, and those a training step
#: adds to its checkpoint after the manifest (train/state.py, with their atomic-write temporaries).
_ADDED_FILES = re.compile(r"latest_checkpointed_iteration\.txt|progress\.txt"
                          r"|(iter_\d{7}|release)/(__\d+_\d+\.distcp|\.metadata|common\.pt"
                          r"|metadata\.json)"
                          r"|trainer/\.?(state\.json|optim_tp\d+\.pt)(\.\w+\.tmp)?")
_ADDED_DIRS = re.compile(r"iter_\d{7}|release|trainer|tokenizer")


def foreign_entries(path: str | Path) -> list[str]:
    """What in a checkpoint directory is not part of the checkpoint: entries neither in its
    manifest nor files Megatron-LM or a training step adds (a user's ``notes.txt``,
    ``results/``), and every symlink; every entry when it has no readable metadata."""
    root = Path(path)
    try:
        files = read_meta(root).get("files", {})
        listed = set(files if isinstance(files, dict) else {}) | {META_FILE}
    except (CheckpointError, OSError):
        return sorted(p.name for p in root.iterdir())
    known_dirs = {str(Path(rel).parent) for rel in listed}
    found = []
    for dirpath, dirs, names in os.walk(root):
        here = Path(dirpath)
        for name in list(dirs):
            rel = (here / name).relative_to(root).as_posix()
            if (here / name).is_symlink() or not (rel in known_dirs or
                                                  _ADDED_DIRS.fullmatch(rel.split("/")[-1])):
                found.append(rel + "/")
                dirs.remove(name)
        for name in names:
            rel = (here / name).relative_to(root).as_posix()
            if (here / name).is_symlink() or not (rel in listed or _ADDED_FILES.fullmatch(rel)):
                found.append(rel)
    return sorted(found)


def is_ours(path: str | Path) -> bool:
    """A checkpoint this package wrote (it has our metadata file) holding nothing else
    (``foreign_entries``); Megatron-LM's own are not ours."""
    return (Path(path) / META_FILE).is_file() and not foreign_entries(path)


def inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel``, or CheckpointError if ``rel`` (read from the checkpoint's metadata) leads
    outside ``root``: a checkpoint's own paths never reach the files beside it."""
    path = root / rel
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(root.resolve()):
        raise CheckpointError(f"{root / META_FILE}: {what} {rel!r} points outside the checkpoint;"
                              " its metadata is damaged or was altered: re-save or re-convert it")
    return path


def is_dist_dir(p: Path) -> bool:
    """A torch_dist weights directory (``release/``, ``iter_*/`` or one named directly)."""
    return (p / "metadata.json").is_file() and has_common_state(p)


def locate(path: Path) -> tuple[Path, Path]:
    """(checkpoint root, torch_dist weights directory) of whatever directory was named."""
    if (path / TRACKER_FILE).is_file():
        text = (path / TRACKER_FILE).read_text().strip()
        if text == RELEASE_DIR:
            name = RELEASE_DIR
        elif text.isdigit():
            name = f"iter_{int(text):07d}"
        else:
            raise CheckpointError(f"{path / TRACKER_FILE} holds {text!r}, neither an iteration "
                                  "number nor 'release'; the checkpoint is damaged")
        weights = path / name
        if not weights.is_dir():
            raise CheckpointError(f"{path / TRACKER_FILE} points to {name}/, which is missing; "
                                  "the checkpoint is incomplete: copy it again")
        if not is_dist_dir(weights):
            raise CheckpointError(
                f"{weights} is not a torch_dist checkpoint (no metadata.json with common.pt or "
                ".metadata): "
                "megatron-spd reads Megatron-LM's torch_dist format only; convert a legacy "
                "'torch' checkpoint with Megatron-LM (--ckpt-format torch "
                "--ckpt-convert-format torch_dist --ckpt-convert-save NEW_DIR)")
        return path, weights
    if is_dist_dir(path):
        root = path.parent if _ITER_DIR.match(path.name) else path
        return root, path
    raise CheckpointError(f"{path} holds no {TRACKER_FILE}, no {META_FILE} and no torch_dist "
                          "weights: it is not a checkpoint (an interrupted save leaves none: "
                          "save it again)")


def read_meta(root: Path) -> dict[str, Any]:
    """Our metadata object (``spd_checkpoint.json``) of ``root``; an unknown format is refused."""
    path = root / META_FILE
    meta = read_json_object(path, "the checkpoint's metadata object; the checkpoint is corrupt "
                                  "and cannot be trusted: save or convert it again",
                            CheckpointError)
    if meta.get("format") not in (CKPT_FORMAT, LEGACY_FORMAT):
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {CKPT_FORMAT!r}")
    if not isinstance(meta.get("files", {}), dict):
        raise CheckpointError(f"{path} is corrupt: 'files' is not the manifest object; save or "
                              "convert the checkpoint again")
    return meta
