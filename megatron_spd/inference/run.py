"""What ``tools/generate.py`` runs: prompts from the command line and files, generation spread
over data-parallel replicas, the listing and timing summary, the JSON.

With torchrun's world larger than TP (e.g. 2 nodes x 3 ranks at TP=3), each data-parallel
replica generates its share of the prompts (round robin) and global rank 0 collects the results,
so adding nodes adds throughput instead of repeating work. Streaming happens on global rank 0,
i.e. for replica 0's prompts; the others' outputs appear in the final listing.

The streamed text, the listing and the summary are the command's result: cli/generate.py prints
them; notes about the run go to ``logging``.
"""
from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from ..loading.run_config import RunConfig
from ..parallel import distributed
from .generation import GenerationConfig, GenerationResult, generate
from .steps import GenerationError
from .streaming import StreamCallback

logger = logging.getLogger(__name__)


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


def generate_sharded(model, tokenizer, prompts: Sequence[str], config: GenerationConfig,
                     stream: Optional[StreamCallback] = None) -> Optional[list[GenerationResult]]:
    """``generate`` with the prompts split over data-parallel replicas; every rank calls it.
    Global rank 0 returns all results in prompt order, the other ranks return None."""
    dp_rank, dp_size = distributed.dp_rank_size()
    mine = list(range(dp_rank, len(prompts), dp_size))
    results = generate(model, tokenizer, [prompts[i] for i in mine], config, stream=stream,
                       indices=mine) if mine else []
    rank0 = distributed.is_rank0()
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


def generate_source(run: RunConfig, prompts: Sequence[str],
                    config: GenerationConfig = GenerationConfig(), *,
                    stream: Optional[StreamCallback] = None) -> Optional[list[GenerationResult]]:
    """Open ``run``'s source at its TP with its plan, generate after every prompt (``stream``
    receives the first prompt's text as it is produced, on global rank 0) and write the results
    with their timings to ``run.json_out``. Returns the results on global rank 0, None elsewhere;
    printing them is the command's job (cli/generate.py)."""
    with run.running():
        lm = run.open_model()
        if distributed.is_rank0():
            logger.info("model: %s, TP=%d, SPD blocks %d/%d (G=%d)",
                        run.source or "SmolLM2-135M-Instruct (default)", distributed.tp_size(),
                        len(lm.plan.spd_blocks), lm.config.num_layers, lm.plan.groups)
        results = generate_sharded(lm.model, lm.tokenizer, prompts, config, stream=stream)
        if results is None:
            return None
        run.write_report({"tp": distributed.tp_size(),
                          "ckpt": None if run.source is None else str(run.source),
                          "plan": lm.plan.strategies, "config": asdict(config),
                          "summary": summary(results),
                          "results": [r.to_dict() for r in results]})
        return results
