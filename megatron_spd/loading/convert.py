"""One conversion as the command-line tool runs it: any source -> megatron-spd checkpoint (a
Megatron-LM checkpoint with the plan inline) at the current TP degree, or -> Hugging Face
directory. Kept out of the tool so tests and other scripts call the same code; the tool prints
the summary (``format_summary``).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..checkpoint.save import CHECKPOINT_OUTPUT, check_output_dir, save_checkpoint
from ..convert.hf import ConversionError, save_hf
from ..core.config import ModelConfig
from ..core.plan import SPDPlan
from ..files import (
    OutputKind,
    check_output,
    check_space,
    is_no_space,
    no_space,
    replace_dir,
    saving_dir,
)
from ..parallel import distributed
from .open_model import open_model
from .run_config import RunConfig
from .sources import load_weights

log = logging.getLogger(__name__)

#: Files a Hugging Face model directory written by ``to_hf`` may hold (``save_hf`` and the
#: tokenizer's own): a directory with anything else is someone's, and never replaced.
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json")


def is_hf_output(path: str | Path) -> bool:
    """A Hugging Face model directory of the kind ``to_hf`` writes: config.json, safetensors
    weights and tokenizer files, nothing else."""
    path = Path(path)
    entries = list(path.iterdir()) if path.is_dir() else []
    return ((path / "config.json").is_file() and any(p.suffix == ".safetensors" for p in entries)
            and all(p.is_file() and (p.name in HF_FILES or p.suffix == ".safetensors")
                    for p in entries))


#: What ``--to hf --out`` writes: replacing such a directory needs --overwrite.
HF_OUTPUT = OutputKind("Hugging Face model directory", directory=True, ours=is_hf_output)


def output_kind(to: str) -> OutputKind:
    """What a conversion ``--to`` mcore / hf writes at ``--out``."""
    return HF_OUTPUT if to == "hf" else CHECKPOINT_OUTPUT


def features(cfg: ModelConfig) -> list[str]:
    """The architecture features beyond plain LLaMA, as a user reads them."""
    out = []
    if cfg.rope_scaling:
        out.append(f"llama3 RoPE scaling x{cfg.rope_scaling_factor:g}")
    if cfg.add_qkv_bias and not cfg.add_bias_linear:
        out.append("q/k/v bias")
    if cfg.add_bias_linear:
        out.append("biases")
    if cfg.qk_layernorm:
        out.append("QK-norm")
    if cfg.sliding_window is not None:
        out.append(f"sliding window {cfg.sliding_window}: context capped to it (full attention "
                   "is exact up to the window; longer inputs are refused)")
    return out


def summary(cfg: ModelConfig, plan: SPDPlan, **extra: Any) -> dict[str, Any]:
    """What a user checks after a conversion: size, shape, context, features, G, SPD blocks."""
    return {"params": cfg.num_parameters(), "layers": cfg.num_layers,
            "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_query_groups, "head_dim": cfg.head_dim,
            "ffn": cfg.ffn_hidden_size, "vocab": cfg.vocab_size,
            "tied_embeddings": cfg.tie_word_embeddings, "context": cfg.max_seq_length,
            "rope_theta": cfg.rope_theta, "norm_eps": cfg.norm_eps, "features": features(cfg),
            "G": plan.groups, "spd_blocks": plan.spd_blocks, **extra}


def format_summary(s: dict[str, Any]) -> str:
    spd = s["spd_blocks"]
    return (f"params {s['params']:,} | layers {s['layers']} | hidden {s['hidden']} | "
            f"heads {s['heads']} (KV {s['kv_heads']}, dim {s['head_dim']}) | ffn {s['ffn']} | "
            f"vocab {s['vocab']} | context {s['context']} | G {s['G']} | "
            f"SPD blocks {len(spd)}/{s['layers']} | "
            + "".join(f"{f} | " for f in s["features"])
            + " | ".join(f"{k} {v}" for k, v in s.items()
                         if k in ("tp", "to", "out", "serves", "seconds")))


def check_finite_weights(named: Iterable[tuple[str, Any]], source: Optional[str], *,
                         across_ranks: bool = True) -> None:
    """Raise ConversionError naming the first weight holding NaN or inf, so damaged weights are
    refused at conversion instead of becoming a checkpoint that reports ``perplexity nan``.
    ``across_ranks``: every rank calls it with its shards and all raise together; False for
    full weights that one rank may check alone (the HF export)."""
    import torch.distributed as dist

    bad = next((name for name, t in named if not bool(torch.isfinite(t.detach()).all())), None)
    if across_ranks and dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
        bad = next((b for b in found if b), None)
    if bad:
        raise ConversionError(f"{source or 'the default model'}: weight {bad} holds NaN or inf; "
                              "the weights are damaged: re-download or re-export them")


def to_mcore(source: Optional[str], out: str | Path, *, plan: SPDPlan | str | Path | None = None,
             tokenizer: Optional[str] = None, overwrite: bool = False,
             verify: bool = True) -> dict[str, Any]:
    """Convert at the current TP (every rank calls it) into a Megatron-LM-layout checkpoint
    with the plan inline; returns the summary. ``out`` is checked before anything is read."""
    check_output_dir(out, overwrite)
    t0 = time.perf_counter()
    lm = open_model(source, plan=plan, tokenizer=tokenizer, verify=verify)
    t_load = time.perf_counter() - t0
    check_finite_weights(lm.model.named_parameters(), source)
    save_checkpoint(lm.model, out, config=lm.config, plan=lm.plan, tokenizer=lm.tokenizer,
                    dense_source=lm.dense_source, overwrite=overwrite)
    return summary(lm.config, lm.plan, to="mcore", tp=distributed.tp_size(), out=str(out),
                   load_seconds=round(t_load, 2),
                   seconds=round(time.perf_counter() - t0, 2))


def to_hf(source: Optional[str], out: str | Path, *, tokenizer: Optional[str] = None,
          dtype: str = "float32", verify: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write a Hugging Face directory (config.json, model.safetensors, tokenizer) atomically.
    ``out`` may be absent, empty, or (with ``overwrite``) a directory ``to_hf`` wrote before."""
    check_output(out, HF_OUTPUT, overwrite=overwrite)
    t0 = time.perf_counter()
    cfg, full, tok, plan = load_weights(source, tokenizer=tokenizer, verify=verify)
    check_finite_weights(full.items(), source, across_ranks=False)
    out = Path(out).absolute()
    need = sum(t.numel() for t in full.values()) * getattr(torch, dtype).itemsize
    check_space(out, need)
    try:
        with saving_dir(out) as tmp:
            save_hf(tmp, cfg, full, tok, dtype=getattr(torch, dtype), plan=plan)
            replace_dir(tmp, out, ours=is_hf_output)
    except OSError as e:
        if is_no_space(e):
            raise no_space(out, need) from None
        raise
    return summary(cfg, plan, to="hf", tp=1, out=str(out), serves=hf_runs_as(plan),
                   seconds=round(time.perf_counter() - t0, 2))


def hf_runs_as(plan: SPDPlan) -> str:
    """What runs a Hugging Face export of ``plan`` (convert/spd_hf.py), as the summary says it."""
    if not plan.spd_blocks:
        return "dense model: transformers and vLLM run it as is"
    return (f"SPD model (G={plan.groups}): vLLM with megatron-spd installed serves it at TP in "
            f"{[t for t in range(1, plan.groups + 1) if plan.groups % t == 0]} "
            "(docs/serving.md); transformers refuses it (model_type spd_*)")


def convert(run: RunConfig, out: str | Path, *, to: str = "mcore", dtype: str = "float32"
            ) -> Optional[dict[str, Any]]:
    """The whole of ``tools/convert_checkpoint.py``: ``to_mcore`` of ``run.source`` on every rank
    at TP ``run.tp`` with ``run.plan``, or ``to_hf`` on rank 0 (Hugging Face output is TP-free,
    the other ranks idle); rank 0 writes the summary to ``run.json_out`` and returns it (None
    elsewhere). ``out`` is checked first: absent, empty, or one of ours of that kind with
    ``run.overwrite``."""
    if to == "hf":
        if run.plan or (run.tp or 1) > 1:
            log.warning("note: --plan/--tp do not apply to --to hf (Hugging Face format is "
                        "TP-free)")
        result = to_hf(run.source, out, tokenizer=run.tokenizer, dtype=dtype, verify=run.verify,
                       overwrite=run.overwrite) if distributed.is_rank0() else None
    else:
        with run.running():
            result = to_mcore(run.source, out, plan=run.plan, tokenizer=run.tokenizer,
                              verify=run.verify, overwrite=run.overwrite)
    if result is None or not distributed.is_rank0():
        return None
    return run.write_report(result)
