"""The checkpoint format: a Megatron-LM checkpoint with the SPD plan inline, read and written.

Every checkpoint the tools write is one Megatron-LM's ``--load`` reads as its own:

    CKPT/
      latest_checkpointed_iteration.txt  "release" (Megatron-LM's tracker; model-only weights)
      release/                           megatron.core.dist_checkpointing (torch_dist): *.distcp,
                                         .metadata, metadata.json, common.pt = {args, iteration,
                                         checkpoint_version}; ``args`` carry the model shape and
                                         the plan inline (checkpoint_args.py)
      spd_checkpoint.json                ours: format, tokenizer ref, dense origin, saved TP,
                                         manifest (bytes and sha256 of every file)
      tokenizer/                         the vocabulary files

The args are the one source of the model shape and the plan; ``spd_checkpoint.json`` only adds
what Megatron-LM has no place for. Reading also accepts an ``iter_*``/``release`` directory,
Megatron-LM's own torch_dist checkpoints at any TP (optimizer and RNG tensors are ignored; the
plan and shape come from their args; the tokenizer must then be given), and format-1 megatron-spd
checkpoints (``spd_checkpoint.json`` with the config and plan + ``weights/``).

dist_checkpointing stores every tensor globally, so a checkpoint written at any TP loads at any
TP the plan allows. Saves go to a sibling ``.NAME.saving`` directory swapped in when complete
(``io.replace_dir``); the weights are written in this process (``_in_process_strategy``), so a
killed save leaves no writer process behind, and the next save removes the stale directory.
``save_checkpoint`` never replaces anything but one of our checkpoints, and that only with
``overwrite=True`` (``check_output_dir``). The manifest's sha256 turns a damaged file into a
clear error at load; hashing reads every byte once more (``sha256_file``: 254 MiB/s, ~4 s per
GiB, measured on this project's busy 2-core machine), so it can be skipped (``verify=False``,
``--no-verify``) for very large checkpoints; the size check always runs.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..convert.hf import ConversionError
from ..core.config import FullStateDict, ModelConfig
from ..core.plan import SPDPlan
from ..data.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from ..errors import OutputError, SPDError
from ..files import (
    OutputKind,
    atomic_write_json,
    atomic_write_text,
    check_output,
    read_json_object,
    replace_dir,
)
from ..parallel.mcore_versions import (
    COMMON_FILE,
    has_common_state,
    read_common_state,
    write_common_file,
)
from .args import (
    CHECKPOINT_VERSION,
    DENSE_SOURCE_ARG,
    args_from_config,
    config_from_args,
    plan_from_args,
)

CKPT_FORMAT = "megatron-spd-checkpoint/2"
LEGACY_FORMAT = "megatron-spd-checkpoint/1"  # spd_checkpoint.json + weights/ (read only)
META_FILE = "spd_checkpoint.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's name
RELEASE_DIR = "release"
LEGACY_WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
_ITER_DIR = re.compile(r"^(iter_\d{7}|release)$")
_HASH_CHUNK = 1 << 24
# what Megatron-LM's saver records about the sharded layout (_build_sharded_state_dict_metadata)
_CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


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
        return load_tokenizer(self.tokenizer_ref, base_dir=self.root)


# ----- where the weights are ---------------------------------------------------------------------

def is_checkpoint(path: str | Path) -> bool:
    """A directory in a layout ``read_checkpoint`` understands (without reading it)."""
    p = Path(path)
    return p.is_dir() and ((p / META_FILE).is_file() or (p / TRACKER_FILE).is_file()
                           or _is_dist_dir(p))


def _is_dist_dir(p: Path) -> bool:
    return (p / "metadata.json").is_file() and has_common_state(p)


def _locate(path: Path) -> tuple[Path, Path]:
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
        if not _is_dist_dir(weights):
            raise CheckpointError(
                f"{weights} is not a torch_dist checkpoint (no metadata.json with common.pt or "
                ".metadata): "
                "megatron-spd reads Megatron-LM's torch_dist format only; convert a legacy "
                "'torch' checkpoint with Megatron-LM (--ckpt-format torch "
                "--ckpt-convert-format torch_dist --ckpt-convert-save NEW_DIR)")
        return path, weights
    if _is_dist_dir(path):
        root = path.parent if _ITER_DIR.match(path.name) else path
        return root, path
    raise CheckpointError(f"{path} holds no {TRACKER_FILE}, no {META_FILE} and no torch_dist "
                          "weights: it is not a checkpoint (an interrupted save leaves none: "
                          "save it again)")


# ----- reading ---------------------------------------------------------------------------------

def read_checkpoint(path: str | Path, *, verify: bool = True) -> StoredCheckpoint:
    """Config, plan, tokenizer ref and weights location of a checkpoint, after checking every
    file the manifest lists (size always; sha256 unless ``verify`` is False)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    meta = _read_meta(path) if (path / META_FILE).is_file() else None
    if meta is not None and meta.get("format") == LEGACY_FORMAT:
        return _read_legacy(path, meta, verify)
    root, weights = _locate(path)
    if meta is None and root != path and (root / META_FILE).is_file():
        meta = _read_meta(root)
    meta = meta or {}
    if meta.get("weights") == weights.name:  # else Megatron-LM saved newer weights beside ours
        check_manifest(root, meta, verify)
    args = _read_args(weights)
    try:
        cfg = config_from_args(args, str(weights))
        plan = plan_from_args(args, str(weights))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return StoredCheckpoint(
        root, weights, cfg, plan, meta.get("tokenizer") or _tokenizer_from_args(args, root),
        meta.get("dense_source") or getattr(args, DENSE_SOURCE_ARG, None),
        getattr(args, "tensor_model_parallel_size", None), "megatron-lm", meta)


def _read_meta(root: Path) -> dict[str, Any]:
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


def _read_legacy(root: Path, meta: dict[str, Any], verify: bool) -> StoredCheckpoint:
    missing = [k for k in ("model_config", "plan", "tokenizer") if k not in meta]
    if missing:
        raise CheckpointError(f"{root / META_FILE} is corrupt: key(s) {missing} missing; save "
                              "or convert the checkpoint again")
    check_manifest(root, meta, verify)
    weights = root / LEGACY_WEIGHTS_DIR
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{root / META_FILE}: model_config is malformed ({e}); save or "
                              "convert the checkpoint again") from None
    plan = SPDPlan.from_dict(meta["plan"], source=str(root / META_FILE))
    return StoredCheckpoint(root, weights, cfg, plan, meta["tokenizer"], meta.get("dense_source"),
                            meta.get("saved_tp"), "legacy", meta)


def read_args(path: str | Path) -> Optional[argparse.Namespace]:
    """The args namespace of the checkpoint at ``path`` (None if ``path`` holds none yet, e.g.
    a fresh training run's --save directory that is also its --load)."""
    path = Path(path)
    if not path.is_dir() or not ((path / TRACKER_FILE).is_file() or _is_dist_dir(path)):
        return None
    return _read_args(_locate(path)[1])


def _read_args(weights: Path):
    import torch

    if not (weights / COMMON_FILE).is_file():
        try:
            common = read_common_state(weights)
        except Exception as e:  # megatron-core < 0.19 cannot read the embedded common state
            raise CheckpointError(
                f"{weights} keeps its args inside the torch_dist files (saved by megatron-core "
                f">= 0.19 without common.pt) and they cannot be read here ({type(e).__name__}: "
                f"{str(e)[:200]}); open it with megatron-core >= 0.19, or re-save it there "
                "with megatron-spd, whose saves also write common.pt") from None
        return _args_of(common, weights)
    try:
        common = read_common_state(weights)
    except ModuleNotFoundError as e:
        raise CheckpointError(f"{weights}/common.pt refers to a module this environment lacks "
                              f"({e}); install it or re-save the checkpoint") from None
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"{weights}/common.pt cannot be read ({type(e).__name__}: {e}); "
                              "the checkpoint is damaged: copy or save it again") from None
    return _args_of(common, weights)


def _args_of(common: Any, weights: Path):
    if not isinstance(common, dict) or common.get("args") is None:
        raise CheckpointError(f"{weights}: the common state has no 'args': it was not saved by "
                              "Megatron-LM or megatron-spd, so the model shape is unknown")
    return common["args"]


def _tokenizer_from_args(args, root: Path) -> Optional[str]:
    """A Megatron-LM run's tokenizer path when it is one we can read and it still exists (a
    relative one, as our saves write it, is relative to the checkpoint: ``tokenizer_path``)."""
    model = tokenizer_path(args, root)
    if getattr(args, "tokenizer_type", None) in ("HuggingFaceTokenizer", "SentencePieceTokenizer",
                                                 "Llama2Tokenizer", "GPTSentencePieceTokenizer") \
            and model and Path(model).exists():
        return str(model)
    return None


def tokenizer_path(args, root: str | Path) -> Optional[str]:
    """``args.tokenizer_model`` with a relative path taken relative to the checkpoint ``root``
    (our saves store ``tokenizer/...`` so a moved checkpoint keeps its tokenizer; the patched
    Megatron-LM resolves it the same way, megatron_lm.restore_checkpoint_args)."""
    model = getattr(args, "tokenizer_model", None)
    if model and not Path(model).is_absolute() and (Path(root) / model).exists():
        return str(Path(root).absolute() / model)
    return model


def check_manifest(root: Path, meta: dict[str, Any], verify: bool = True) -> None:
    """Every file the manifest lists exists with its size (and sha256 when ``verify``)."""
    for rel, entry in meta.get("files", {}).items():
        if rel.startswith(TOKENIZER_DIR + "/"):
            continue  # load_tokenizer reports these (and they can be overridden)
        size, digest = (entry, None) if isinstance(entry, int) else (entry["bytes"],
                                                                     entry.get("sha256"))
        f = root / rel
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


def _manifest(root: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----- weights: without a model, or into one ---------------------------------------------------

def read_full_state_dict(ckpt: StoredCheckpoint) -> FullStateDict:
    """The full (TP=1, fp32) state dict, read with no process group; only the model's tensors
    are read (a Megatron-LM checkpoint's optimizer state stays on disk)."""
    from ..convert.mcore import mcore_plain_to_full
    from ..core.compensation import full_shapes

    extra = None if ckpt.plan is None else full_shapes(ckpt.config, ckpt.plan)
    try:
        return mcore_plain_to_full(ckpt.weights, ckpt.config, extra)
    except ConversionError as e:
        raise CheckpointError(f"{ckpt.root}: {e}") from None


def load_into(model, ckpt: StoredCheckpoint) -> None:
    """Load the checkpoint's weights into ``model`` (built at any TP; every rank calls it)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    legacy = ckpt.layout == "legacy"
    request = model.sharded_state_dict() if legacy else {"model": model.sharded_state_dict()}
    try:
        state = dist_checkpointing.load(request, str(ckpt.weights))
        model.load_state_dict(state if legacy else state["model"])
    except (Exception, CheckpointException) as e:
        detail = " ".join(str(e).split())[:300]  # DCP's message spans lines and ranks
        raise CheckpointError(f"{ckpt.root}: the weights could not be loaded into the model its "
                              f"args describe ({type(e).__name__}: {detail}); the config "
                              "does not match the weights or a weight file is corrupt: re-save "
                              "or re-convert the checkpoint") from e


# ----- writing ---------------------------------------------------------------------------------

def is_ours(path: str | Path) -> bool:
    """A checkpoint this package wrote (it has our metadata file); Megatron-LM's own are not."""
    return (Path(path) / META_FILE).is_file()


#: What a checkpoint output may replace (``io.check_output``; the tools' ``--out`` at parsing).
CHECKPOINT_OUTPUT = OutputKind("megatron-spd checkpoint", directory=True, ours=is_ours)


def check_output_dir(path: str | Path, overwrite: bool = False) -> None:
    """Raise CheckpointError unless a checkpoint may be written at ``path``: it does not exist,
    is an empty directory, or is one of our checkpoints and ``overwrite`` is set (the rule of
    ``CHECKPOINT_OUTPUT``, which the tools check while parsing ``--out``)."""
    try:
        check_output(path, CHECKPOINT_OUTPUT, overwrite=overwrite, flag="output")
    except OutputError as e:
        raise CheckpointError(str(e)) from None


def save_checkpoint(model, out_dir: str | Path, *, config: ModelConfig, plan: SPDPlan,
                    tokenizer: Tokenizer, dense_source: Optional[str] = None,
                    overwrite: bool = False) -> None:
    """Write ``model`` (any TP) as a Megatron-LM checkpoint with the plan inline; every rank
    calls it. Atomic: written to ``.NAME.saving`` and swapped in when complete. An existing
    ``out_dir`` is replaced only if it is one of ours and ``overwrite`` is set.
    ``dense_source``: the original dense model when these weights were changed for SPD."""
    from megatron.core import parallel_state

    from ..parallel.distributed import barrier, is_rank0

    out_dir = Path(out_dir).absolute()
    tmp = out_dir.with_name(f".{out_dir.name}.saving")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    check_output_dir(out_dir, overwrite)  # on every rank: all refuse together, before any work
    if is_rank0():
        if tmp.exists():
            print(f"[megatron-spd] removing {tmp}, left by an interrupted save", flush=True)
            shutil.rmtree(tmp)
        (tmp / RELEASE_DIR).mkdir(parents=True)
    barrier()
    args = args_from_config(config, plan, tp=tp, **_tokenizer_args(tokenizer))
    state = {"model": model.sharded_state_dict(), "args": args, "iteration": 0,
             "checkpoint_version": CHECKPOINT_VERSION}
    _write_weights(state, str(tmp / RELEASE_DIR))
    barrier()
    if is_rank0():
        write_common_file(tmp / RELEASE_DIR)
        tok_ref = tokenizer.save(tmp / TOKENIZER_DIR)
        tok_ref["path"] = f"{TOKENIZER_DIR}/{tok_ref['path']}"
        atomic_write_text(tmp / TRACKER_FILE, RELEASE_DIR + "\n")
        meta = {"format": CKPT_FORMAT, "weights": RELEASE_DIR, "tokenizer": tok_ref,
                "saved_tp": tp, "num_parameters": config.num_parameters(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": _manifest(tmp)}
        if dense_source:
            meta["dense_source"] = dense_source
        atomic_write_json(tmp / META_FILE, meta)
        replace_dir(tmp, out_dir, ours=is_ours)
    barrier()


def _tokenizer_args(tokenizer: Tokenizer) -> dict[str, Optional[str]]:
    """Megatron-LM's --tokenizer-type/--tokenizer-model for the copy saved in the checkpoint,
    relative to the checkpoint (``tokenizer_path`` resolves it), so it survives a move."""
    kind = getattr(tokenizer, "kind", None)
    if kind == "sentencepiece":
        return {"tokenizer_type": "SentencePieceTokenizer",
                "tokenizer_model": f"{TOKENIZER_DIR}/tokenizer.model"}
    if kind in ("hf", "gguf"):
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER_DIR}
    return {}


def _write_weights(state: dict, directory: str) -> None:
    """The one call that writes weights (tests replace it to simulate a save killed midway)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, directory, sharded_strategy=_in_process_strategy(),
                            content_metadata=dict(_CONTENT_METADATA))


def _in_process_strategy():
    """megatron's torch_dist save strategy, its files written in this process.

    ``TorchDistSaveShardedStrategy`` (megatron.core 0.16.1, strategies/filesystem_async.py) forks
    one writer process per file and starts a multiprocessing Manager that lives as long as the
    saver; a saver killed with SIGKILL orphans them. Here the same translation and planner feed
    torch.distributed.checkpoint's synchronous ``FileSystemWriter`` (same files, same metadata,
    read by megatron's torch_dist load strategy), so no process outlives a killed save. This
    re-states the few lines of ``TorchDistSaveShardedStrategy.async_save`` that prepare the
    state dict, because megatron offers no synchronous writer.
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir) -> None:
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                  self.keep_only_main_replica)
            dcp.save(mcore_to_pyt_state_dict(sd, False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                     planner=MCoreSavePlanner(dedup_replicated_tensors=False,
                                              flatten_state_dict=False))

    return InProcessTorchDistSave("torch_dist", 1)
