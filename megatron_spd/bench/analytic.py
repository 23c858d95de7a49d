"""Analytic latency model: what SPD buys on hardware this project cannot run (design.md 6).

A TP step is modelled as compute plus communication with no overlap (megatron's TP all-reduces
sit on the critical path of every block):

- compute, per rank and per transformer block, is a roofline plus a fixed overhead:
  ``max(FLOPs / flop_rate, bytes / mem_rate) + block_overhead`` (kernel launches and the gaps
  between them: what dominates a small model's decode step on a GPU; its size depends on the
  regime, ``REGIMES``: eager, or replayed from a CUDA graph), with FLOPs = 2 x tokens
  x (the rank's 1/T of the block's weights) + attention's 4 x tokens x context x hidden / T,
  and bytes = the rank's weights plus the KV cache it reads. The LM head (only the last token's logits are materialised) is added once.
- communication per step is, for each TP collective, ``alpha + wire_bytes / beta`` of a
  ``comm.LinkProfile`` (ring model): the embedding's all-reduce, two all-reduces per dense block
  and one per SPD block, and the all-gather of the vocab-parallel logits.

Device rates are *effective* rates, stated in ``DEVICES`` (peak x an assumed efficiency), so a
prediction is only as good as those numbers; ``fit_rate`` replaces them by a rate fitted to a
measured dense run, which is how the model is validated against the CPU + link simulator. The
per-block overhead is assumed per regime unless a GPU check report (research/gpu_check.py)
gives the measured one (``measured_block_overhead``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

from ..core.config import ModelConfig
from ..options import floats, ints, option, words
from ..parallel.collectives import LinkProfile, link_profile


@dataclass(frozen=True)
class Device:
    """Effective per-device rates: ``flops`` (FLOP/s), ``mem_Bps`` (bytes/s), and the fixed
    time of one transformer block's kernels (``block_overhead_s``)."""

    name: str
    flops: float
    mem_Bps: float
    bytes_per_param: int = 2  # bf16 weights, activations and KV cache
    block_overhead_s: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "TFLOPs": self.flops / 1e12, "mem_GBps": self.mem_Bps / 1e9,
                "bytes_per_param": self.bytes_per_param,
                "block_overhead_us": self.block_overhead_s * 1e6}


# Peak dense bf16 x 0.5 (typical matmul efficiency in inference), HBM peak x 0.8; the per-block
# overhead comes from the regime (``device``).
DEVICES = {
    "a100": Device("A100-80GB (312 TFLOP/s bf16 x 0.5, 2.04 TB/s x 0.8)", 156e12, 1.63e12, 2),
    "h100": Device("H100-SXM (989 TFLOP/s bf16 x 0.5, 3.35 TB/s x 0.8)", 495e12, 2.68e12, 2),
}

# Assumed per-block overhead (seconds) of a step in each regime, used unless a GPU check report
# gives the measured one:
# - eager: ~10 kernels per block at ~2 us each (launch + gap) -- a fused eager path; this
#   package's own eager paths launch more kernels per block (gpu_check.py measures them);
# - graphed: 0 -- a CUDA graph replays the whole step with one launch and the kernels' own time
#   is what the roofline counts, so this regime is a lower bound on the step.
REGIMES = {"eager": 20e-6, "graphed": 0.0}
# which of gpu_check.py's decode paths measures each regime
GPU_CHECK_PATHS = {"eager": "tensorised_eager", "graphed": "tensorised_graphed"}


def device(name: str, regime: str = "eager", block_overhead_s: Optional[float] = None) -> Device:
    """``DEVICES[name]`` in ``regime``: with its assumed per-block overhead, or the given one."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; known: {sorted(REGIMES)}")
    overhead = REGIMES[regime] if block_overhead_s is None else block_overhead_s
    return replace(DEVICES[name], block_overhead_s=overhead)


def measured_block_overhead(report: dict, regime: str) -> float:
    """Seconds per block above the memory bound in ``regime``, from a gpu_check.py report (its
    decode at batch 1). Raises ValueError when the report has no such GPU measurement."""
    if report.get("format") != "megatron-spd-gpu-check/1":
        raise ValueError("not an research/gpu_check.py report (format "
                         f"{report.get('format')!r})")
    if report.get("mode") != "full":
        raise ValueError("a --smoke gpu_check report: its timings are not a GPU's; run "
                         "research/gpu_check.py on a GPU without --smoke")
    decode = report.get("checks", {}).get("decode", {})
    try:
        row = decode["batches"]["1"]["paths"][GPU_CHECK_PATHS[regime]]
    except KeyError:
        raise ValueError(f"the gpu_check report has no decode measurement at batch 1 "
                         f"({decode.get('error', 'missing')})") from None
    if "block_overhead_us" not in row:
        raise ValueError(f"the gpu_check report did not measure the {regime} regime: "
                         f"{row.get('skipped') or row.get('error')}")
    if regime == "graphed" and not row.get("graphed"):
        raise ValueError("the gpu_check run could not capture its decode graph "
                         f"({row.get('graph_error')}); its 'graphed' timing is eager")
    return row["block_overhead_us"] * 1e-6

# Public LLaMA-2 shapes (Touvron et al. 2023; HF config.json of meta-llama/Llama-2-*-hf).
LLAMA2 = {
    "llama2-7b": ModelConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                             num_query_groups=32, ffn_hidden_size=11008, vocab_size=32000,
                             max_seq_length=4096),
    "llama2-13b": ModelConfig(num_layers=40, hidden_size=5120, num_attention_heads=40,
                              num_query_groups=40, ffn_hidden_size=13824, vocab_size=32000,
                              max_seq_length=4096),
    "llama2-70b": ModelConfig(num_layers=80, hidden_size=8192, num_attention_heads=64,
                              num_query_groups=8, ffn_hidden_size=28672, vocab_size=32000,
                              max_seq_length=4096),
}


def block_cost(cfg: ModelConfig, tp: int, batch: int, tokens: int, context: float,
               bytes_per_param: int) -> tuple[float, float]:
    """(FLOPs, bytes) one rank spends on one block for ``tokens`` new tokens per sequence that
    attend to ``context`` positions on average."""
    flops = 2 * batch * tokens * cfg.block_matmul_parameters() / tp \
        + 4 * batch * tokens * context * cfg.hidden_size / tp
    kv_heads_local = max(cfg.num_query_groups / tp, 1)  # fewer KV groups than ranks: replicated
    kv_bytes = 2 * batch * context * kv_heads_local * cfg.head_dim * bytes_per_param
    return flops, cfg.block_matmul_parameters() / tp * bytes_per_param + kv_bytes


def head_cost(cfg: ModelConfig, tp: int, batch: int, bytes_per_param: int) -> tuple[float, float]:
    """(FLOPs, bytes) of the vocab-parallel LM head on the last token of each sequence."""
    return 2 * batch * cfg.vocab_size * cfg.hidden_size / tp, \
        cfg.vocab_size * cfg.hidden_size / tp * bytes_per_param


def step_collectives(cfg: ModelConfig, tp: int, n_spd: int, batch: int, tokens: int,
                     bytes_per_act: int) -> list[tuple[str, int]]:
    """(kind, payload bytes) of every TP collective one forward step issues."""
    if tp == 1:
        return []
    act = batch * tokens * cfg.hidden_size * bytes_per_act
    n_ar = 1 + 2 * (cfg.num_layers - n_spd) + n_spd  # embedding + blocks
    return [("all_reduce", act)] * n_ar + [("all_gather", batch * cfg.vocab_size * 4)]


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    comm_s: float
    n_collectives: int

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


def step_time(cfg: ModelConfig, tp: int, n_spd: int, link: LinkProfile, device: Device,
              batch: int, tokens: int, context: float) -> StepTime:
    """Predicted time of one forward step (prefill: tokens = prompt, context ~ prompt/2;
    decode: tokens = 1, context = cache length)."""
    bpp = device.bytes_per_param
    flops, nbytes = block_cost(cfg, tp, batch, tokens, context, bpp)
    hflops, hbytes = head_cost(cfg, tp, batch, bpp)
    compute = cfg.num_layers * (max(flops / device.flops, nbytes / device.mem_Bps)
                                + device.block_overhead_s) \
        + max(hflops / device.flops, hbytes / device.mem_Bps)
    colls = step_collectives(cfg, tp, n_spd, batch, tokens, bpp)
    comm = sum(link.collective_time(kind, nb, tp) for kind, nb in colls)
    return StepTime(compute, comm, len(colls))


def generation_time(cfg: ModelConfig, tp: int, n_spd: int, link: LinkProfile, device: Device,
                    batch: int, prompt: int, new_tokens: int) -> dict:
    """Prefill (time to first token), mean decode step, and end-to-end time of one request."""
    pre = step_time(cfg, tp, n_spd, link, device, batch, prompt, (prompt + 1) / 2)
    dec = [step_time(cfg, tp, n_spd, link, device, batch, 1, prompt + i)
           for i in range(1, new_tokens)]
    dec_s = sum(d.total_s for d in dec)
    return {"prefill_s": pre.total_s, "prefill_comm_s": pre.comm_s,
            "decode_s": dec_s / max(len(dec), 1),
            "decode_comm_s": sum(d.comm_s for d in dec) / max(len(dec), 1),
            "end_to_end_s": pre.total_s + dec_s}


@dataclass(frozen=True)
class Projection:
    """What the analytic projection covers (``tools/benchmark.py project``): every model x TP
    x link x batch, each at every SPD ratio, for one request of ``prompt`` + ``new_tokens``."""

    models: tuple[str, ...] = option(tuple(LLAMA2), "model shapes (comma-separated; analytic."
                                     "LLAMA2)", type=words)
    tps: tuple[int, ...] = option((4, 8), "TP degrees (comma-separated)", type=ints, flag="--tp")
    links: tuple[str, ...] = option(("nvlink", "internode", "pcie"), "link profiles "
                                    "(comma-separated; comm.PROFILES or ALPHA_US:GBPS)",
                                    type=words)
    device: str = option("a100", "device whose effective rates are assumed",
                         choices=tuple(DEVICES))
    batches: tuple[int, ...] = option((1, 16), "batch sizes (comma-separated)", type=ints,
                                      flag="--batch")
    prompt: int = option(1024, "prompt tokens of the request")
    new_tokens: int = option(128, "tokens generated for the request")
    ratios: tuple[float, ...] = option((0.0, 0.25, 0.5, 0.7, 0.75, 1.0), "SPD ratios "
                                       "(comma-separated)", type=floats)
    regime: str = option("eager", "per-block overhead regime: eager, or graphed (each step "
                         "replayed from a CUDA graph)", choices=tuple(REGIMES))
    gpu_check: Optional[str] = option(None, "research/gpu_check.py report: take the regime's "
                                      "per-block overhead from its measured decode (batch 1) "
                                      "instead of the assumed one", type=str)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(LLAMA2))
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; known: {sorted(LLAMA2)}")
        for ln in self.links:
            link_profile(ln)  # a bad profile name is an error here
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; known: {sorted(DEVICES)}")
        self.regime_info()  # a missing or unusable report is an error here

    def _overhead(self) -> tuple[float, str]:
        """The regime's per-block overhead (seconds) and where that number comes from."""
        if self.gpu_check is None:
            return REGIMES[self.regime], "assumed (bench.analytic.REGIMES)"
        path = Path(self.gpu_check)
        if not path.is_file():
            raise ValueError(f"--gpu-check {path} does not exist; run research/gpu_check.py")
        report = json.loads(path.read_text())
        return (measured_block_overhead(report, self.regime),
                f"measured: {path} ({report['host']['device']}, decode at batch 1, "
                f"{GPU_CHECK_PATHS[self.regime]})")

    def regime_info(self) -> dict:
        """The regime, its per-block overhead and where that number comes from."""
        overhead, source = self._overhead()
        return {"name": self.regime, "block_overhead_us": overhead * 1e6, "source": source}

    def device_model(self) -> Device:
        """The device with this projection's per-block overhead."""
        return device(self.device, self.regime, self._overhead()[0])


def speedup_curve(cfg: ModelConfig, tp: int, link: LinkProfile, device: Device, *,
                  ratios: Iterable[float] = Projection.ratios, batch: int = 1,
                  prompt: int = Projection.prompt,
                  new_tokens: int = Projection.new_tokens) -> list[dict]:
    """Per SPD ratio: predicted times and their reduction relative to the dense model."""
    base = generation_time(cfg, tp, 0, link, device, batch, prompt, new_tokens)
    rows = []
    for r in ratios:
        n_spd = round(r * cfg.num_layers)
        t = generation_time(cfg, tp, n_spd, link, device, batch, prompt, new_tokens)
        rows.append({"spd_ratio": r, "n_spd": n_spd, **t,
                     **{f"{k[:-2]}_reduction": 1 - t[k] / base[k]
                        for k in ("prefill_s", "decode_s", "end_to_end_s")}})
    return rows


def projection(p: Projection = Projection()) -> list[dict]:
    """The speedup curves for every (batch, model, TP, link) combination, as flat JSON-able
    rows."""
    dev = p.device_model()
    out = []
    for batch in p.batches:
        for name in p.models:
            for tp in p.tps:
                for ln in p.links:
                    link = link_profile(ln)
                    for row in speedup_curve(LLAMA2[name], tp, link, dev, ratios=p.ratios,
                                             batch=batch, prompt=p.prompt,
                                             new_tokens=p.new_tokens):
                        out.append({"batch": batch, "model": name, "tp": tp, "link": link.name,
                                    **row})
    return out


def fit_rate(measured_dense_s: float, cfg: ModelConfig, tp: int, link: LinkProfile, batch: int,
             tokens: int, context: float, bytes_per_param: int = 4,
             collective_floor_s: float = 0.0) -> Device:
    """The single effective rate (compute-only roofline) that makes the model reproduce one
    measured dense step; used to predict the SPD curve on the same machine.

    ``collective_floor_s`` is the machine's own per-collective latency (e.g. gloo), which the
    link simulator cannot go below.
    """
    probe = Device("probe", 1.0, float("inf"), bytes_per_param)
    flops = step_time(cfg, tp, 0, link, probe, batch, tokens, context).compute_s  # = FLOPs
    comm = predicted_comm(cfg, tp, 0, link, batch, tokens, bytes_per_param, collective_floor_s)
    spare = measured_dense_s - comm
    if spare <= 0:
        raise ValueError(f"measured dense step ({measured_dense_s:.4g} s) is not longer than its "
                         f"predicted communication ({comm:.4g} s); the link profile is too slow "
                         "for this measurement to say anything about compute")
    return replace(probe, name=f"fitted ({flops / spare / 1e9:.3g} GFLOP/s)", flops=flops / spare)


def predicted_comm(cfg: ModelConfig, tp: int, n_spd: int, link: LinkProfile, batch: int,
                   tokens: int, bytes_per_act: int, collective_floor_s: float = 0.0) -> float:
    """Seconds of TP communication in one step: each collective costs the link time, or the
    machine's own floor if that is longer (the simulator only ever adds time)."""
    return sum(max(link.collective_time(kind, nb, tp), collective_floor_s)
               for kind, nb in step_collectives(cfg, tp, n_spd, batch, tokens, bytes_per_act))


def predict_measured(cfg: ModelConfig, tp: int, n_spd: int, link: LinkProfile, fitted: Device,
                     batch: int, tokens: int, context: float,
                     collective_floor_s: float = 0.0) -> float:
    """Predicted step time on the machine ``fitted`` describes (see ``fit_rate``)."""
    compute = step_time(cfg, tp, n_spd, link, fitted, batch, tokens, context).compute_s
    return compute + predicted_comm(cfg, tp, n_spd, link, batch, tokens, fitted.bytes_per_param,
                                    collective_floor_s)
