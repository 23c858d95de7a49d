"""What ``tools/benchmark.py`` runs behind its argparse: set threads, start the ranks' process
groups, get the weights, run the latency sweep or the projection, write JSON and PNG and print
the summary; or write docs/latency.md from those JSON files (``markdown.py``).

CPU hygiene: T ranks on C cores get ``max(1, C // local ranks)`` intra-op threads each, so ranks
do not fight over cores (torchrun's own default, OMP_NUM_THREADS=1, wastes cores when T < C).
With more ranks than cores (T=3 on 2 cores) that is 1 thread per rank and the machine is
oversubscribed: ranks time-share cores, and the report says so (``host.threads_per_rank``,
``host.cores``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ..files import atomic_write_json
from ..parallel import distributed
from . import analytic, markdown, plots
from .latency import PRESETS, LinkSetting, WeightSource, Workload, preset_source, run_latency


def threads_per_rank(cores: Optional[int] = None, local_ranks: Optional[int] = None) -> int:
    """Intra-op threads for one rank: the cores this process may use, split over the ranks that
    share this node (torchrun's LOCAL_WORLD_SIZE), at least one."""
    cores = cores or len(os.sched_getaffinity(0))
    local_ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, cores // local_ranks)


def measure(model: str, wl: Workload, links: LinkSetting, *, tp: Optional[int] = None,
            groups: Optional[int] = None, threads: Optional[int] = None,
            json_out: Optional[str] = None, timeout_s: float = distributed.DEFAULT_TIMEOUT_S
            ) -> Optional[dict]:
    """The latency sweep on this process's ranks; the report on rank 0 (None elsewhere), which
    also prints its summary and writes ``json_out`` with the PNG beside it.

    ``model``: a preset name (random weights, ``PRESETS``), ``default`` (SmolLM2-135M) or a
    checkpoint / HF directory / .gguf that ``sources.load_weights`` reads (ranks read in
    turn, so one full copy of the weights is in memory at a time).
    """
    torch.set_num_threads(threads or threads_per_rank())
    with distributed.running(tp, timeout_s=timeout_s):
        if model in PRESETS:
            source, name = preset_source(model, groups or distributed.tp_size()), model
        else:
            source = _checkpoint_source(None if model == "default" else model, groups)
            name = "SmolLM2-135M-Instruct" if model == "default" else model
        report = run_latency(source, wl, links, name=name)
        if report is not None:
            if json_out:
                atomic_write_json(json_out, report)
                plots.plot_measured(report, png_path(json_out))
            print(markdown.summary(report))
        distributed.barrier()
        return report


def _checkpoint_source(path: Optional[str], groups: Optional[int]) -> WeightSource:
    """Weights of a checkpoint, HF directory or .gguf (None: SmolLM2-135M) and its plan's G."""
    def source():
        from ..loading.sources import load_weights

        cfg, full, _, plan = load_weights(path, progress=False)
        return cfg, groups or plan.groups, full
    return source


def project(p: analytic.Projection = analytic.Projection(), *,
            json_out: Optional[str] = None) -> dict:
    """The analytic projection for LLaMA-2 shapes (no ranks needed); prints its table and
    writes ``json_out`` with the PNG beside it."""
    out = {"format": "megatron-spd-projection/1",
           "device": p.device_model().to_dict(), "regime": p.regime_info(),
           "links": {ln: analytic.link_profile(ln).to_dict() for ln in p.links},
           "workload": {"prompt": p.prompt, "new_tokens": p.new_tokens,
                        "batches": list(p.batches)},
           "rows": analytic.projection(p)}
    if json_out:
        atomic_write_json(json_out, out)
        plots.plot_projection(out, png_path(json_out))
    print(markdown.projection_summary(out))
    return out


def write_doc(measured: list[str], projection: str, out: str = "docs/latency.md", *,
              command: Optional[str] = None) -> None:
    """docs/latency.md from measured and projection JSON files (``markdown.write_markdown``)."""
    markdown.write_markdown(measured, projection, out, command=command)
    print(f"wrote {out}")


def png_path(json_out: str) -> str:
    """The PNG next to a JSON output (same stem)."""
    return str(Path(json_out).with_suffix(".png"))
