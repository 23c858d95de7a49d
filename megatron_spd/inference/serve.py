"""Serving glue for tools/generate.py: prompt files, data-parallel sharding, a timing summary.

With torchrun's world larger than TP (e.g. 2 nodes x 3 ranks at TP=3), each data-parallel
replica generates its share of the prompts (round robin) and global rank 0 collects the results,
so adding nodes adds throughput instead of repeating work. Streaming happens on global rank 0,
i.e. for replica 0's prompts; the others' outputs appear in the final listing.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist
from megatron.core import parallel_state

from .engine import GenerationConfig, GenerationError, GenerationResult, StreamCallback, generate


def read_prompts(prompts: Sequence[str] = (), prompts_file: Optional[str | Path] = None) -> list[str]:
    """Prompts from the command line plus a file: one prompt per line (``\\n`` escapes a newline
    inside a prompt; blank lines are skipped), or ``.jsonl`` with a ``"prompt"`` field per line."""
    out = list(prompts)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise GenerationError(f"prompts file {path} does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    out.append(json.loads(line)["prompt"])
                except (ValueError, KeyError, TypeError):
                    raise GenerationError(f"{path}:{n}: expected a JSON object with a \"prompt\" "
                                          "field") from None
            else:
                out.append(line.replace("\\n", "\n"))
    if not out:
        raise GenerationError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


def _dp() -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return (parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())


def generate_sharded(model, tokenizer, prompts: Sequence[str], config: GenerationConfig,
                     stream: Optional[StreamCallback] = None) -> Optional[list[GenerationResult]]:
    """``generate`` with the prompts split over data-parallel replicas; every rank calls it.
    Global rank 0 returns all results in prompt order, the other ranks return None."""
    dp_rank, dp_size = _dp()
    mine = list(range(dp_rank, len(prompts), dp_size))
    results = generate(model, tokenizer, [prompts[i] for i in mine], config, stream=stream,
                       indices=mine) if mine else []
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if dp_size == 1:
        return results if rank0 else None
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, results))
    if not rank0:
        return None
    merged: dict[int, GenerationResult] = {}
    for idx, res in gathered:
        merged.update(zip(idx, res))
    return [merged[i] for i in range(len(prompts))]


def summary(results: Sequence[GenerationResult]) -> dict:
    """Medians of time to first token and time per output token, and token counts."""
    ttft = [r.ttft_s for r in results if r.tokens]
    tpot = [r.tpot_s for r in results if r.tpot_s is not None]
    return {"prompts": len(results),
            "prompt_tokens": sum(len(r.prompt_tokens) for r in results),
            "output_tokens": sum(len(r.tokens) for r in results),
            "ttft_s_median": statistics.median(ttft) if ttft else None,
            "tpot_s_median": statistics.median(tpot) if tpot else None}
