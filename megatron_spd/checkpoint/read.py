"""Reading a checkpoint: what it holds (``read_checkpoint``: ours, Megatron-LM's ``iter_*`` /
``release`` torch_dist at any TP, format 1), its Megatron-LM args, and its weights, either as the
full state dict without a model or loaded into a model built at any TP.

dist_checkpointing stores every tensor globally, so a checkpoint written at any TP loads at any
TP the plan allows. Every file the manifest lists is checked first (manifest.py). megatron.core
(seconds to import) is imported only inside the two functions that need it, so reading a
checkpoint's metadata and args does not import it.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional


from ..convert.hf import ConversionError
from ..convert.mcore import mcore_plain_to_full
from ..convert.safe_load import UnsafePickleError, check_dcp_metadata, load_torch
from ..core.config import FullStateDict
from ..parallel.mcore_versions import COMMON_FILE, read_embedded_common_state
from .args import DENSE_SOURCE_ARG, config_from_args, plan_from_args
from .layout import (
    LEGACY_FORMAT,
    META_FILE,
    TRACKER_FILE,
    CheckpointError,
    StoredCheckpoint,
    is_dist_dir,
    locate,
    read_meta,
)
from .legacy import read_legacy
from .manifest import check_manifest


def read_checkpoint(path: str | Path, *, verify: bool = True) -> StoredCheckpoint:
    """Config, plan, tokenizer ref and weights location of a checkpoint, after checking every
    file the manifest lists (size always; sha256 unless ``verify`` is False)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    meta = read_meta(path) if (path / META_FILE).is_file() else None
    if meta is not None and meta.get("format") == LEGACY_FORMAT:
        return read_legacy(path, meta, verify)
    root, weights = locate(path)
    if meta is None and root != path and (root / META_FILE).is_file():
        meta = read_meta(root)
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


def read_args(path: str | Path) -> Optional[argparse.Namespace]:
    """The args namespace of the checkpoint at ``path`` (None if ``path`` holds none yet, e.g.
    a fresh training run's --save directory that is also its --load)."""
    path = Path(path)
    if not path.is_dir() or not ((path / TRACKER_FILE).is_file() or is_dist_dir(path)):
        return None
    return _read_args(locate(path)[1])


def _read_args(weights: Path):
    if not (weights / COMMON_FILE).is_file():
        try:
            common = read_embedded_common_state(weights)
        except UnsafePickleError:
            raise
        except Exception as e:  # megatron-core < 0.19 cannot read the embedded common state
            raise CheckpointError(
                f"{weights} keeps its args inside the torch_dist files (saved by megatron-core "
                f">= 0.19 without common.pt) and they cannot be read here ({type(e).__name__}: "
                f"{str(e)[:200]}); open it with megatron-core >= 0.19, or re-save it there "
                "with megatron-spd, whose saves also write common.pt") from None
        return _args_of(common, weights)
    try:
        common = load_torch(weights / "common.pt")
    except UnsafePickleError:
        raise
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


def read_full_state_dict(ckpt: StoredCheckpoint) -> FullStateDict:
    """The full (TP=1, fp32) state dict, read with no process group; only the model's tensors
    are read (a Megatron-LM checkpoint's optimizer state stays on disk)."""
    from ..core.compensation import full_shapes  # lazy: it imports megatron.core

    extra = None if ckpt.plan is None else full_shapes(ckpt.config, ckpt.plan)
    try:
        return mcore_plain_to_full(ckpt.weights, ckpt.config, extra)
    except ConversionError as e:
        raise CheckpointError(f"{ckpt.root}: {e}") from None


def load_into(model, ckpt: StoredCheckpoint) -> None:
    """Load the checkpoint's weights into ``model`` (built at any TP; every rank calls it)."""
    from megatron.core import dist_checkpointing  # lazy: megatron.core takes seconds to import
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    legacy = ckpt.layout == "legacy"
    request = model.sharded_state_dict() if legacy else {"model": model.sharded_state_dict()}
    try:
        check_dcp_metadata(ckpt.weights)
        state = dist_checkpointing.load(request, str(ckpt.weights))
        model.load_state_dict(state if legacy else state["model"])
    except UnsafePickleError:
        raise
    except (Exception, CheckpointException) as e:
        detail = " ".join(str(e).split())[:300]  # DCP's message spans lines and ranks
        raise CheckpointError(f"{ckpt.root}: the weights could not be loaded into the model its "
                              f"args describe ({type(e).__name__}: {detail}); the config "
                              "does not match the weights or a weight file is corrupt: re-save "
                              "or re-convert the checkpoint") from e
