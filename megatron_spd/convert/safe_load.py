"""Reading pickled checkpoint files without running code from them (issue 23).

A checkpoint is data. Every file a user passes in (a Megatron-LM checkpoint, one of ours, a
training run's optimizer state) may have been written by someone else, and a pickle can name any
callable: plain ``pickle.load`` or ``torch.load(weights_only=False)`` on such a file runs
whatever it says. The manifest's sha256 is no defence, since whoever supplies the checkpoint
writes the manifest too. So every pickle the package reads, and every one that megatron-core and
torch.distributed.checkpoint read on its behalf, goes through an allow-list of types; any other
global is refused with one line naming the file and the global, before anything is called.

What the Python environment holds (torch, megatron-core, this package) is trusted; no file
passed in is.

Three readers, one allow-list each:

- ``load_torch``: ``torch.load(weights_only=True)`` (torch's own restricted unpickler: tensors,
  containers, dtypes) plus ``TORCH_LOAD_GLOBALS``: ``argparse.Namespace`` and the enums, configs
  and numpy RNG state that Megatron-LM puts in ``common.pt`` (the same list megatron-core
  registers with ``torch.serialization.add_safe_globals`` at import, megatron/core/safe_globals.py
  in 0.16.1 and 0.19.2; those registered by megatron-core are allowed process-wide by torch as
  well, they are enums, configs and ``io.BytesIO``). Used for ``common.pt`` (checkpoint
  ``_read_args``) and the optimizer state (train/state.py).
- ``SafeUnpickler``: a ``pickle.Unpickler`` whose ``find_class`` admits only
  ``DCP_METADATA_GLOBALS``: the dataclasses and enums of torch.distributed.checkpoint's
  ``Metadata`` (plus ``torch.Size``, dtypes, ``PosixPath``). torch writes ``.metadata`` with plain
  ``pickle.dump`` and reads it with plain ``pickle.load``; torch has no restricted reader for it.
- the bytes items of a DCP checkpoint (megatron's ``ShardedObject``, e.g. ``_extra_state``),
  which torch's ``DefaultLoadPlanner.load_bytes`` reads with ``torch.load(weights_only=False)``:
  read with ``load_torch`` instead.

``install()`` (run when this module is imported; the checkpoint readers import it) replaces
``FileSystemReader.read_metadata`` and ``DefaultLoadPlanner.load_bytes`` on their classes, so
every reader built anywhere uses them. That covers, for torch 2.13:
``torch.distributed.checkpoint.load``/``load_state_dict`` (``_load_state_dict`` calls the
reader's ``read_metadata`` and the planner's ``load_bytes``), and ``FileSystemReader`` used
directly (convert/mcore.py ``read_global_tensors``); and for megatron-core 0.16.1 and 0.19.2,
``dist_checkpointing.strategies.torch``: ``TorchDistLoadShardedStrategy.load`` (a
``CachedMetadataFileSystemReader``, whose ``read_metadata`` calls ``super().read_metadata()``),
``load_tensors_metadata``, ``load_sharded_metadata`` and ``remove_sharded_tensors`` (plain
``FileSystemReader``), and ``MCoreLoadPlanner`` (inherits ``load_bytes``). A subclass that
overrides ``read_metadata`` without calling ``super()`` (megatron's optional multi-storage-client
reader, off by default) is not covered. megatron-core's ``TorchCommonLoadStrategy.load_common``
reads ``common.pt`` with ``torch.load`` and torch's default, ``weights_only=True`` since torch
2.6; our ``read_checkpoint`` reads the same file through ``load_torch`` before it.

The two replaced methods re-state torch 2.13's few lines (FileSystemReader.read_metadata,
DefaultLoadPlanner.load_bytes) with the unpickler swapped, because torch offers no hook for it.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import SPDError

#: (module, name) that ``load_torch`` admits besides torch's own weights-only set: what
#: Megatron-LM's ``common.pt`` (args, rerun state, numpy RNG state) and our files hold.
TORCH_LOAD_GLOBALS: tuple[tuple[str, str], ...] = (
    ("argparse", "Namespace"), ("types", "SimpleNamespace"), ("pathlib", "PosixPath"),
    ("signal", "Signals"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.dtypes", "UInt32DType"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("megatron.core.enums", "ModelType"),
    ("megatron.core.transformer.enums", "AttnBackend"),
    ("megatron.core.transformer.enums", "CudaGraphScope"),
    ("megatron.core.transformer.enums", "CudaGraphModule"),
    ("megatron.core.transformer.enums", "InferenceCudaGraphScope"),
    ("megatron.core.optimizer", "OptimizerConfig"),
    ("megatron.core.rerun_state_machine", "RerunDiagnostic"),
    ("megatron.core.rerun_state_machine", "RerunMode"),
    ("megatron.core.rerun_state_machine", "RerunState"),
)

_DCP = "torch.distributed.checkpoint.metadata"
#: (module, name) that a DCP ``.metadata`` file may name (torch 2.13's Metadata and its parts).
DCP_METADATA_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP, "Metadata"), (_DCP, "TensorStorageMetadata"), (_DCP, "BytesStorageMetadata"),
    (_DCP, "ChunkStorageMetadata"), (_DCP, "TensorProperties"), (_DCP, "MetadataIndex"),
    (_DCP, "StorageMeta"), (_DCP, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.planner", name)  # megatron-core's saves keep the plans
      for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
})


class UnsafePickleError(SPDError, ValueError):
    """A pickled file names a global outside the allow-list; nothing from it ran."""


def _refusal(path: Any, name: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refused to load {name}, which is not a type a checkpoint may hold (a "
        "checkpoint is data: no code from it runs); the file was not written by torch, "
        "megatron-core or megatron-spd, or was altered: use a checkpoint from a source you trust")


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals in ``allowed`` (and torch dtypes when
    ``("torch", "<dtype>")`` is asked for); anything else raises ``UnsafePickleError``."""

    def __init__(self, file: BinaryIO, source: Any,
                 allowed: frozenset[tuple[str, str]] = DCP_METADATA_GLOBALS) -> None:
        super().__init__(file)
        self._source, self._allowed = source, allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        if module == "torch":
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise _refusal(self._source, f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _refusal(self._source, f"persistent id {str(pid)[:40]!r}")


def _torch_globals() -> list[Any]:
    import importlib

    found = []
    for module, name in TORCH_LOAD_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another numpy/megatron-core version
            continue
    return found


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+) (?:was not an allowed|whose module)")


def load_torch(source: str | Path | BinaryIO, what: str = "") -> Any:
    """``torch.load(source, weights_only=True)`` on the CPU with ``TORCH_LOAD_GLOBALS`` allowed;
    a file naming any other global raises ``UnsafePickleError`` (one line: the file and the
    global). Other failures (truncated, not a torch file) raise what torch raises, an
    ``UnpicklingError`` with torch's one-line reason. ``what`` names a file-like ``source``."""
    import torch

    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" not in text:
            raise
        hit = _GLOBAL_IN_MESSAGE.search(text)
        if hit:
            raise _refusal(what or source, hit.group(1)) from None
        detail = next((ln.split("error:", 1)[1].strip() for ln in text.splitlines()
                       if "WeightsUnpickler error:" in ln), "")
        raise pickle.UnpicklingError(detail or "not a torch file torch's weights-only reader "
                                     "accepts") from None


# ----- torch.distributed.checkpoint --------------------------------------------------------------

def read_dcp_metadata(reader: Any, *args: Any, **kwargs: Any) -> Any:
    """``FileSystemReader.read_metadata`` with ``SafeUnpickler`` (torch 2.13's body otherwise)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = reader._get_metadata_path(kwargs.get("rank"))
    with reader.fs.create_stream(path, "rb") as f:
        metadata = SafeUnpickler(f, path).load()
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = reader.load_id
    return metadata


def check_dcp_metadata(directory: str | Path) -> None:
    """Read a DCP directory's ``.metadata`` through ``SafeUnpickler`` so a refusal surfaces as
    itself: inside ``torch.distributed.checkpoint.load`` torch catches the reader's exception
    and raises an AssertionError holding its text (state_dict_loader.py ``local_step``)."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    read_dcp_metadata(FileSystemReader(str(directory)))


def _load_bytes(planner: Any, read_item: Any, value: io.BytesIO) -> None:
    """``DefaultLoadPlanner.load_bytes`` with ``load_torch`` (torch 2.13's body otherwise)."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    obj = load_torch(value, what=f"the checkpoint's object {fqn!r}")
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[fqn], obj)
    else:
        planner.state_dict[fqn] = obj


def install() -> None:
    """Route every DCP metadata read and bytes load through the allow-lists, and allow
    ``TORCH_LOAD_GLOBALS`` in torch's weights-only reader (idempotent). The torch globals are
    registered for the process, as megatron-core registers its own: torch's ``safe_globals``
    context manager would, on exit, also remove those megatron-core had registered."""
    import torch
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    torch.serialization.add_safe_globals(_torch_globals())

    FileSystemReader.read_metadata = read_dcp_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes


install()
