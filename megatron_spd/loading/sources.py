"""Where a model comes from: a Hugging Face directory, a GGUF file, a checkpoint (ours or
Megatron-LM's), or the bundled SmolLM2; its full weights, tokenizer and plan without a model.

GGUF files are dequantised once and cached as safetensors under ``cache_dir()`` (~10 s saved
per open of SmolLM2, 517 MB on disk). Each new entry prunes the entries whose GGUF file has since
changed or gone (a removed virtualenv's SmolLM2, say), so the cache holds one entry per file that
still exists. ``dense_origin`` names the dense model recovered weights came from.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

from ..checkpoint.layout import CheckpointError, is_checkpoint
from ..checkpoint.read import read_checkpoint, read_full_state_dict
from ..convert.hf import hf_plan, load_hf
from ..core.config import FullStateDict, ModelConfig
from ..core.plan import SPDPlan
from ..data.defaults import DEFAULT_GROUPS, default_gguf_path
from ..data.tokenizer import Tokenizer, TokenizerError, hf_tokenizer_from_dir, load_tokenizer
from ..files import atomic_write_json
from ..parallel import distributed

#: How checkpoints name the bundled SmolLM2 as their dense origin (any tool's source argument).
DEFAULT_SOURCE = "default"
MAX_DEFAULT_GROUPS = 8  # one node's worth of ranks


def source_kind(source: str | Path | None) -> str:
    """``default`` | ``gguf`` | ``hf`` | ``mcore`` for a source path (clear error otherwise).
    None and ``"default"`` (unless a path of that name exists) are the bundled SmolLM2;
    ``mcore`` is any checkpoint ``checkpoint.read_checkpoint`` reads."""
    if source is None or (str(source) == DEFAULT_SOURCE and not Path(source).exists()):
        return "default"
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if is_checkpoint(path):
        return "mcore"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a Hugging Face model directory, a "
                              ".gguf file or a checkpoint directory (megatron-spd or Megatron-LM)")
    raise CheckpointError(f"{path} is neither a .gguf file, a Hugging Face model directory "
                          "(config.json) nor a checkpoint (latest_checkpointed_iteration.txt, "
                          "an iter_*/release torch_dist directory, or spd_checkpoint.json); an "
                          "interrupted save leaves none of these: save it again")


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


def _prune_stale_entries() -> None:
    """Remove finished cache entries (a ``done`` marker and a ``config.json`` naming the GGUF file
    they came from, as ``_load_gguf_cached`` writes them) whose file has changed or is gone: no
    lookup can reach them again. Anything else in the directory is left alone."""
    for entry in cache_dir().iterdir():
        if not (re.fullmatch(r".+-[0-9a-f]{16}", entry.name) and (entry / "done").is_file()):
            continue
        try:
            source = Path(json.loads((entry / "config.json").read_text())["source"])
            if source.is_file() and _gguf_cache_path(source) == entry:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _load_gguf_cached(path: Path, progress: bool) -> tuple[ModelConfig, FullStateDict, Tokenizer]:
    """Dequantising a GGUF file takes ~10 s; its full state dict is cached as safetensors keyed
    by the file's path, size and mtime (a changed file is converted again)."""
    from safetensors.torch import load_file, save_file

    from ..convert.gguf import load_gguf, read_gguf
    from ..data.tokenizer import gguf_tokenizer

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
                                                "source": str(path.resolve())})
        (tmp / "done").write_text("ok\n")
        os.replace(tmp, cached)  # fails harmlessly if another process finished first
        _prune_stale_entries()
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cfg, full, tok


def load_weights(source: str | Path | None = None, *, tokenizer: str | Path | None = None,
                 progress: bool = True, verify: bool = True
                 ) -> tuple[ModelConfig, FullStateDict, Tokenizer, SPDPlan]:
    """Config, full (TP=1, fp32) state dict, tokenizer and plan of ``source``: a Hugging Face
    directory, a .gguf file, a checkpoint (ours or Megatron-LM's torch_dist), or None for
    SmolLM2-135M-Instruct (dense plan, G=3). Sources without a plan (a Hugging Face directory
    has one only when it is an SPD export, convert/spd_hf.py) get a dense one
    (``default_plan_for``). ``tokenizer`` (anything ``load_tokenizer`` takes) replaces the
    source's own; ``verify=False`` skips the checksum check of a checkpoint's files."""
    kind = source_kind(source)
    if kind == "mcore":
        ckpt = read_checkpoint(source, verify=verify)
        cfg, full = ckpt.config, read_full_state_dict(ckpt)
        tok, plan = ckpt.tokenizer(tokenizer), ckpt.plan or default_plan_for(ckpt.config)
    elif kind == "hf":
        cfg, full = load_hf(source)
        tok = hf_tokenizer_from_dir(source) if tokenizer is None else load_tokenizer(tokenizer)
        plan = hf_plan(source) or default_plan_for(cfg)  # SPD exports carry theirs
    else:
        path = default_gguf_path() if kind == "default" else Path(source)
        cfg, full, tok = _load_gguf_cached(path, progress)
        tok = tok if tokenizer is None else load_tokenizer(tokenizer)
        plan = SPDPlan.dense(cfg.num_layers, DEFAULT_GROUPS) if kind == "default" \
            else default_plan_for(cfg)
    check_vocab(cfg, tok, str(source or "default model"))
    return cfg, full, tok, plan


def check_vocab(cfg: ModelConfig, tok: Tokenizer, source: str) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise TokenizerError(f"{source}: the tokenizer has {tok.vocab_size} tokens but the model "
                             f"only {cfg.vocab_size} embeddings; it belongs to another model")


def dense_origin(source: str | Path | None) -> str:
    """The dense model whose weights ``source`` derives from, as a source any tool opens.

    B2B, head grouping and fine-tuning change weights so that they serve the SPD plan: run
    densely they are no longer the original model (SmolLM2 after B2B of every block: perplexity
    101 instead of 22.5), so they make a bad dense teacher. Checkpoints written after such steps
    record the original under ``dense_source``; any other source holds dense weights itself."""
    kind = source_kind(source)
    if kind == "mcore":
        recorded = read_checkpoint(source, verify=False).dense_source
        if recorded:
            return recorded
    if kind == "default":
        return DEFAULT_SOURCE
    return str(Path(source).absolute())
