"""Writing a checkpoint (layout.py) from a model at any TP, and what a checkpoint output may
replace.

Saves go to a sibling ``.NAME.saving`` directory swapped in when complete (``files.replace_dir``);
the weights are written in this process (``_in_process_strategy``), so a killed save leaves no
writer process behind, and the next save removes the stale directory. That directory is claimed
by one process (``files.saving_dir``): a second writer of the same output is refused, and a
failed save (a full disk: "no space left on ...") removes it. ``save_checkpoint`` never replaces
anything but one of our checkpoints holding nothing but its manifest's files and those
Megatron-LM or training add (``layout.foreign_entries``: a user's files in it are named and
kept), and that only with ``overwrite=True`` (``check_output_dir``).

megatron.core (seconds to import) is imported inside the functions that write, because the
command-line tools import ``CHECKPOINT_OUTPUT`` from here while parsing their arguments.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.config import ModelConfig
from ..core.plan import SPDPlan
from ..data.tokenizer import Tokenizer
from ..errors import OutputError
from ..files import (
    OutputKind,
    atomic_write_json,
    atomic_write_text,
    check_output,
    check_space,
    is_no_space,
    no_space,
    replace_dir,
    saving_dir,
)
from ..parallel.mcore_versions import write_common_file
from .args import CHECKPOINT_VERSION, args_from_config
from .layout import (
    CKPT_FORMAT,
    META_FILE,
    RELEASE_DIR,
    TOKENIZER_DIR,
    TRACKER_FILE,
    CheckpointError,
    foreign_entries,
    is_ours,
)
from .manifest import make_manifest

# what Megatron-LM's saver records about the sharded layout (_build_sharded_state_dict_metadata)
_CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}

#: What a checkpoint output may replace (``files.check_output``; the tools' ``--out`` at parsing).
CHECKPOINT_OUTPUT = OutputKind("megatron-spd checkpoint", directory=True, ours=is_ours,
                               foreign=lambda path: (foreign_entries(path)
                                                     if (path / META_FILE).is_file() else []))


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
    from megatron.core import parallel_state  # lazy, as the module docstring says
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from ..parallel.distributed import barrier, is_rank0  # lazy: it imports megatron.core

    out_dir = Path(out_dir).absolute()
    tmp = out_dir.with_name(f".{out_dir.name}.saving")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    check_output_dir(out_dir, overwrite)  # on every rank: all refuse together, before any work
    need = config.num_parameters() * next(model.parameters()).element_size()
    with contextlib.ExitStack() as claim:
        _rank0_first(lambda: (check_space(out_dir, need), claim.enter_context(saving_dir(out_dir)),
                              (tmp / RELEASE_DIR).mkdir()))
        try:
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
                        "files": make_manifest(tmp)}
                if dense_source:
                    meta["dense_source"] = dense_source
                atomic_write_json(tmp / META_FILE, meta)
                replace_dir(tmp, out_dir, ours=is_ours)
        except (Exception, CheckpointException) as e:
            if is_no_space(e):
                raise CheckpointError(str(no_space(out_dir, need))) from None
            raise
    barrier()


def _rank0_first(step: Callable[[], Any]) -> None:
    """``step`` on global rank 0, then a barrier; if it raised, every rank raises (rank 0 its
    own error, the others a CheckpointError with its message) instead of waiting forever."""
    import torch.distributed as dist

    from ..parallel.distributed import is_rank0

    error: Optional[BaseException] = None
    if is_rank0():
        try:
            step()
        except (OutputError, OSError) as e:
            error = e
    if dist.is_initialized():
        message = [str(error) if error else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] and error is None:
            raise CheckpointError(message[0])
    if error is not None:
        raise CheckpointError(str(error)) from None


def _tokenizer_args(tokenizer: Tokenizer) -> dict[str, Optional[str]]:
    """Megatron-LM's --tokenizer-type/--tokenizer-model for the copy saved in the checkpoint,
    relative to the checkpoint (``read.tokenizer_path`` resolves it), so it survives a move."""
    kind = getattr(tokenizer, "kind", None)
    if kind == "sentencepiece":
        return {"tokenizer_type": "SentencePieceTokenizer",
                "tokenizer_model": f"{TOKENIZER_DIR}/tokenizer.model"}
    if kind in ("hf", "gguf"):
        return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": TOKENIZER_DIR}
    return {}


def _write_weights(state: dict, directory: str) -> None:
    """The one call that writes weights (tests replace it to simulate a save killed midway)."""
    from megatron.core import dist_checkpointing  # lazy, as the module docstring says

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
    from megatron.core.dist_checkpointing.strategies.torch import (  # lazy, as the module says
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
