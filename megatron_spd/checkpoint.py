"""Checkpoints: where a model comes from (HF dir, GGUF file, megatron-core checkpoint, default
SmolLM2) and how a megatron-core checkpoint with its SPD plan inside is written and read.

A megatron-spd checkpoint is a directory:

    spd_checkpoint.json   format, model config, plan, tokenizer ref, saved TP, file sizes
    tokenizer/            the vocabulary files (so the checkpoint is self-contained)
    weights/              megatron.core.dist_checkpointing (torch_dist), TP-agnostic

``dist_checkpointing`` stores every tensor globally (shards are views of it), so a checkpoint
saved at any TP loads at any TP the plan allows (T dividing G); the plan check is
``SPDPlan.validate_for`` via ``build_model``. Saves go to a temporary sibling directory that is
swapped in only when complete (``io.replace_dir``), so a killed save leaves the old checkpoint;
the manifest's file sizes turn a truncated file into a clear error instead of a deep stack trace.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import distributed
from .config import ModelConfig
from .convert.hf import ConversionError, FullStateDict, load_hf
from .defaults import DEFAULT_GROUPS, default_gguf_path
from .io import atomic_write_json, replace_dir
from .plan import PlanError, SPDPlan
from .tokenizer import Tokenizer, TokenizerError, hf_tokenizer_from_dir, load_tokenizer

CKPT_FORMAT = "megatron-spd-checkpoint/1"
META_FILE = "spd_checkpoint.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
MAX_DEFAULT_GROUPS = 8  # one node's worth of ranks


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message says what to do."""


@dataclass
class LoadedModel:
    model: Any              # megatron.core GPTModel at the current TP degree
    config: ModelConfig
    plan: SPDPlan
    tokenizer: Tokenizer
    dense_source: Optional[str] = None  # recorded origin of changed weights (see dense_origin)


# ----- sources ------------------------------------------------------------------------------

#: How checkpoints name the bundled SmolLM2 as their dense origin (any tool's source argument).
DEFAULT_SOURCE = "default"


def source_kind(source: str | Path | None) -> str:
    """``default`` | ``gguf`` | ``hf`` | ``mcore`` for a source path (clear error otherwise).
    None and ``"default"`` (unless a path of that name exists) are the bundled SmolLM2."""
    if source is None or (str(source) == DEFAULT_SOURCE and not Path(source).exists()):
        return "default"
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / META_FILE).is_file():
        return "mcore"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a Hugging Face model directory, a "
                              ".gguf file or a megatron-spd checkpoint directory")
    if path.is_dir() and (path / WEIGHTS_DIR).is_dir():
        raise CheckpointError(f"{path} has no {META_FILE}: it is an incomplete megatron-spd "
                              "checkpoint (interrupted save?); save it again")
    raise CheckpointError(f"{path} is neither a .gguf file, a Hugging Face model directory "
                          f"(config.json) nor a megatron-spd checkpoint ({META_FILE})")


def default_plan_for(cfg: ModelConfig) -> SPDPlan:
    """A dense plan whose G is the largest group count <= 8 the model's heads allow."""
    g = math.gcd(math.gcd(cfg.num_attention_heads, cfg.num_query_groups), cfg.ffn_hidden_size)
    groups = max(d for d in range(1, min(g, MAX_DEFAULT_GROUPS) + 1) if g % d == 0)
    return SPDPlan.dense(cfg.num_layers, groups)


def cache_dir() -> Path:
    """Where converted GGUF weights are cached ($MEGATRON_SPD_CACHE, else ~/.cache/megatron-spd)."""
    env = os.environ.get("MEGATRON_SPD_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron-spd"


def _gguf_cache_path(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / f"{path.stem}-{key[:16]}"


def _load_gguf_cached(path: Path, progress: bool) -> tuple[ModelConfig, FullStateDict, Tokenizer]:
    """Dequantising a GGUF file takes ~10 s; its full state dict is cached as safetensors keyed
    by the file's path, size and mtime (a changed file is converted again)."""
    from safetensors.torch import load_file, save_file

    from .convert.gguf import load_gguf, read_gguf
    from .tokenizer import gguf_tokenizer

    cached = _gguf_cache_path(path)
    if (cached / "done").is_file():
        try:
            meta = json.loads((cached / "config.json").read_text())
            cfg = ModelConfig.from_dict(meta["model_config"])
            tok = load_tokenizer(meta["tokenizer"], base_dir=cached)
            return cfg, load_file(str(cached / "model.safetensors")), tok
        except Exception:  # a damaged cache is rebuilt, never trusted
            shutil.rmtree(cached, ignore_errors=True)
    reader = read_gguf(path)
    with distributed.progress(total=len(reader.tensors), desc=f"dequantising {path.name}",
                              enabled=progress, unit="tensor", leave=False) as bar:
        cfg, full = load_gguf(reader, progress=bar.update)
    tok = gguf_tokenizer(reader)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(full, str(tmp / "model.safetensors"))
        ref = tok.save(tmp)
        atomic_write_json(tmp / "config.json", {"model_config": cfg.to_dict(), "tokenizer": ref,
                                                "source": str(path)})
        (tmp / "done").write_text("ok\n")
        os.replace(tmp, cached)  # fails harmlessly if another process finished first
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg, full, tok


def load_weights(source: str | Path | None = None, *, tokenizer: str | Path | None = None,
                 progress: bool = True) -> tuple[ModelConfig, FullStateDict, Tokenizer, SPDPlan]:
    """Config, full (TP=1, fp32) state dict, tokenizer and plan of ``source``: a Hugging Face
    directory, a .gguf file, a megatron-spd checkpoint, or None for SmolLM2-135M-Instruct (dense
    plan, G=3). HF and GGUF sources get a dense plan (``default_plan_for``). ``tokenizer``
    (anything ``load_tokenizer`` takes) replaces the source's own."""
    kind = source_kind(source)
    if kind == "mcore":
        cfg, full, tok, plan = _load_mcore_full(Path(source), tokenizer is None)
    elif kind == "hf":
        cfg, full = load_hf(source)
        tok = hf_tokenizer_from_dir(source) if tokenizer is None else None
        plan = default_plan_for(cfg)
    else:
        path = default_gguf_path() if kind == "default" else Path(source)
        cfg, full, tok = _load_gguf_cached(path, progress)
        plan = SPDPlan.dense(cfg.num_layers, DEFAULT_GROUPS) if kind == "default" \
            else default_plan_for(cfg)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    _check_vocab(cfg, tok, str(source or "default model"))
    return cfg, full, tok, plan


def _check_vocab(cfg: ModelConfig, tok: Tokenizer, source: str) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise TokenizerError(f"{source}: the tokenizer has {tok.vocab_size} tokens but the model "
                             f"only {cfg.vocab_size} embeddings; it belongs to another model")


# ----- megatron-spd checkpoints -----------------------------------------------------------------

def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON (format-checked) after a size check of every weight file."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is not a megatron-spd checkpoint: {META_FILE} is "
                              "missing (an interrupted save never leaves one); save it again "
                              "or convert with tools/convert_checkpoint.py") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt ({e}); the checkpoint cannot be trusted: "
                              "save or convert it again") from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {CKPT_FORMAT!r}")
    for rel, size in meta.get("files", {}).items():
        if not rel.startswith(WEIGHTS_DIR + "/"):
            continue  # tokenizer files: load_tokenizer reports them (and they can be overridden)
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{ckpt_dir}: file {rel} is missing; the checkpoint is "
                                  "incomplete: copy it again or re-save it")
        if f.stat().st_size != size:
            raise CheckpointError(f"{ckpt_dir}: file {rel} has {f.stat().st_size} bytes but "
                                  f"{size} were written; the checkpoint is truncated or corrupt:"
                                  " copy it again or re-save it")
    return meta


def _meta_parts(ckpt_dir: Path, meta: dict[str, Any], with_tokenizer: bool = True
                ) -> tuple[ModelConfig, SPDPlan, Optional[Tokenizer]]:
    cfg = ModelConfig.from_dict(meta["model_config"])
    plan = SPDPlan.from_dict(meta["plan"], source=str(ckpt_dir / META_FILE))
    tok = load_tokenizer(meta["tokenizer"], base_dir=ckpt_dir) if with_tokenizer else None
    return cfg, plan, tok


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file()}


def dense_origin(source: str | Path | None) -> str:
    """The dense model whose weights ``source`` derives from, as a source any tool opens.

    B2B, head grouping and fine-tuning change weights so that they serve the SPD plan: run
    densely they are no longer the original model (SmolLM2 after B2B of every block: perplexity
    101 instead of 22.5), so they make a bad dense teacher. Checkpoints written after such steps
    record the original under ``dense_source``; any other source holds dense weights itself."""
    if source_kind(source) == "mcore":
        recorded = read_meta(source).get("dense_source")
        if recorded:
            return recorded
    if source_kind(source) == "default":
        return DEFAULT_SOURCE
    return str(Path(source).absolute())


def save_checkpoint(model, out_dir: str | Path, *, config: ModelConfig, plan: SPDPlan,
                    tokenizer: Tokenizer, dense_source: Optional[str] = None) -> None:
    """Write ``model`` (any TP) as a megatron-spd checkpoint; every rank calls it. Atomic: the
    weights go to a temporary sibling directory that replaces ``out_dir`` only when complete.
    ``dense_source``: the original dense model when these weights were changed for SPD
    (``dense_origin``)."""
    from megatron.core import parallel_state

    from .distributed import barrier, is_rank0

    out_dir = Path(out_dir).absolute()
    tmp = out_dir.with_name(f".{out_dir.name}.saving")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a killed save
        (tmp / WEIGHTS_DIR).mkdir(parents=True)
    barrier()
    _write_weights(model.sharded_state_dict(), str(tmp / WEIGHTS_DIR))
    barrier()
    if is_rank0():
        tok_ref = tokenizer.save(tmp / TOKENIZER_DIR)
        tok_ref["path"] = f"{TOKENIZER_DIR}/{tok_ref['path']}"
        files = _file_sizes(tmp)
        meta = {
            "format": CKPT_FORMAT, "model_config": config.to_dict(), "plan": plan.to_dict(),
            "tokenizer": tok_ref, "saved_tp": parallel_state.get_tensor_model_parallel_world_size(),
            "num_parameters": config.num_parameters(), "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if dense_source:
            meta["dense_source"] = dense_source
        atomic_write_json(tmp / META_FILE, meta)
        replace_dir(tmp, out_dir)
    barrier()


def _write_weights(sharded_state_dict: dict, directory: str) -> None:
    """The one call that writes weights (tests replace it to simulate a save killed midway)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, directory)


def _dist_load(model, weights: Path, ckpt_dir: Path) -> None:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(weights))
        model.load_state_dict(state)
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"{ckpt_dir}: the weights could not be loaded into the model its "
                              f"{META_FILE} describes ({type(e).__name__}: {str(e)[:300]}); the "
                              "config does not match the weights or a weight file is corrupt: "
                              "re-save or re-convert the checkpoint") from e


def _load_mcore_full(ckpt_dir: Path, with_tokenizer: bool = True
                     ) -> tuple[ModelConfig, FullStateDict, Optional[Tokenizer], SPDPlan]:
    """Full state dict of a checkpoint without a process group: read the global tensors."""
    from .convert.mcore import mcore_plain_to_full

    meta = read_meta(ckpt_dir)
    cfg, plan, tok = _meta_parts(ckpt_dir, meta, with_tokenizer)
    try:
        full = mcore_plain_to_full(ckpt_dir / WEIGHTS_DIR, cfg)
    except ConversionError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from None
    return cfg, full, tok, plan


def open_model(source: str | Path | None = None, *, plan: SPDPlan | str | Path | None = None,
               sequence_parallel: bool = False,
               tokenizer: str | Path | None = None) -> LoadedModel:
    """Build the model at the current TP degree (``distributed.init(tp)`` first) with ``plan``
    (default: the source's own plan) and load its weights; megatron-spd checkpoints load through
    dist_checkpointing and reshard to any TP the plan allows. ``tokenizer`` replaces the
    source's own."""
    from .distributed import barrier, is_rank0
    from .model import load_full_state_dict
    from .spec import build_model

    if plan is not None and not isinstance(plan, SPDPlan):
        plan = SPDPlan.load(plan)
    kind = source_kind(source)
    if kind == "mcore":
        ckpt_dir = Path(source)
        meta = read_meta(ckpt_dir)
        cfg, ckpt_plan, tok = _meta_parts(ckpt_dir, meta, tokenizer is None)
        tok = tok or load_tokenizer(tokenizer)
        _check_vocab(cfg, tok, str(ckpt_dir))
        plan = plan or ckpt_plan
        try:
            model = build_model(cfg, plan, sequence_parallel=sequence_parallel)
        except PlanError as e:
            raise PlanError(f"cannot open checkpoint {ckpt_dir}: {e}") from None
        _dist_load(model, ckpt_dir / WEIGHTS_DIR, ckpt_dir)
        return LoadedModel(model, cfg, plan, tok, meta.get("dense_source"))
    if kind in ("default", "gguf") and not is_rank0():
        barrier()  # rank 0 fills the conversion cache first; the others then read it
    cfg, full, tok, src_plan = load_weights(source, tokenizer=tokenizer)
    if kind in ("default", "gguf") and is_rank0():
        barrier()
    plan = plan or src_plan
    model = build_model(cfg, plan, sequence_parallel=sequence_parallel)
    load_full_state_dict(model, full)
    return LoadedModel(model, cfg, plan, tok)
