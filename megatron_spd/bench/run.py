"""What ``tools/benchmark.py`` runs behind its argparse: set threads, start the ranks' process
groups, get the weights, run the latency sweep or the projection, write JSON and PNG (the
command prints their ``markdown`` summaries); or write docs/latency.md from those JSON files
(``markdown.py``).

CPU hygiene: T ranks on C cores get ``max(1, C // local ranks)`` intra-op threads each, so ranks
do not fight over cores (torchrun's own default, OMP_NUM_THREADS=1, wastes cores when T < C).
With more ranks than cores (T=3 on 2 cores) that is 1 thread per rank and the machine is
oversubscribed: ranks time-share cores, and the report says so (``host.threads_per_rank``,
``host.cores``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch

from ..files import write_report
from ..loading.run_config import RunConfig
from ..parallel import distributed
from . import analytic, markdown, plots
from .latency import PRESETS, LinkSetting, WeightSource, Workload, preset_source, run_latency


def threads_per_rank(cores: Optional[int] = None, local_ranks: Optional[int] = None) -> int:
    """Intra-op threads for one rank: the cores this process may use, split over the ranks that
    share this node (torchrun's LOCAL_WORLD_SIZE), at least one."""
    cores = cores or len(os.sched_getaffinity(0))
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, cores // local_ranks)


log = logging.getLogger(__name__)


def measure(run: RunConfig, wl: Workload, links: LinkSetting, *, groups: Optional[int] = None,
            threads: Optional[int] = None) -> Optional[dict]:
    """The latency sweep on this process's ranks (``run.tp``, ``run.timeout_s``); the report on
    rank 0 (None elsewhere), which also writes ``run.json_out`` with the PNG beside it.

    ``run.source``: a preset name (random weights, ``PRESETS``), None or ``default``
    (SmolLM2-135M) or a checkpoint / HF directory / .gguf that ``sources.load_weights`` reads
    (ranks read in turn, so one full copy of the weights is in memory at a time).
    """
    torch.set_num_threads(threads or threads_per_rank())
    model = str(run.source or "default")
    with run.running():
        if model in PRESETS:
            source, name = preset_source(model, groups or distributed.tp_size()), model
        else:
            default = model == "default"
            source = _checkpoint_source(run.replace(source=None) if default else run, groups)
            name = "SmolLM2-135M-Instruct" if default else model
        report = run_latency(source, wl, links, name=name)
        if report is not None and run.json_out:
            write_report(run.json_out, report)
            plots.plot_measured(report, png_path(run.json_out))
        distributed.barrier()
        return report


def _checkpoint_source(run: RunConfig, groups: Optional[int]) -> WeightSource:
    """Weights of a checkpoint, HF directory or .gguf (None: SmolLM2-135M) and its plan's G."""
    def source():
        cfg, full, _, plan = run.load_weights(progress=False)
        return cfg, groups or plan.groups, full
    return source


def project(p: analytic.Projection = analytic.Projection(), *,
            json_out: Optional[str] = None) -> dict:
    """The analytic projection for LLaMA-2 shapes (no ranks needed); writes ``json_out`` with
    the PNG beside it (the command prints ``markdown.projection_summary``)."""
    out = {"format": "megatron-spd-projection/1",
           "device": p.device_model().to_dict(), "regime": p.regime_info(),
           "links": {ln: analytic.link_profile(ln).to_dict() for ln in p.links},
           "workload": {"prompt": p.prompt, "new_tokens": p.new_tokens,
                        "batches": list(p.batches)},
           "rows": analytic.projection(p)}
    if json_out:
        write_report(json_out, out)
        plots.plot_projection(out, png_path(json_out))
    return out


def write_doc(measured: list[str], projection: str, out: str = "docs/latency.md", *,
              command: Optional[str] = None) -> None:
    """docs/latency.md from measured and projection JSON files (``markdown.write_markdown``)."""
    markdown.write_markdown(measured, projection, out, command=command)
    log.info(f"wrote {out}")


def png_path(json_out: str) -> str:
    """The PNG next to a JSON output (same stem)."""
    return str(Path(json_out).with_suffix(".png"))
