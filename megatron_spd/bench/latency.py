"""Latency benchmark: time to first token and time per output token against the SPD ratio.

Run on every rank of a TP group (``torchrun --nproc-per-node T tools/benchmark.py measure`` or
``testing.run_ranks``). One run builds, with the same weights, the model for every SPD ratio plus
a *stock* megatron-core model (``get_gpt_layer_local_spec`` for all layers, no megatron_spd
class), then times them interleaved: each repeat visits every model once, in an order rotated
per repeat so that drift of a shared machine spreads over all of them. Per visit it times one
prefill (``inference.prefill``) and ``new_tokens`` decode steps (``inference.decode_step``), and
counts the TP collectives of each phase and the seconds spent inside them (``comm``). All the
models point at one copy of the weights (``share_weights``), so a sweep costs one model's memory.

Regime: every step runs eagerly (``new_cache(..., cuda_graph=False)``), also on a GPU: the
collective counts and times and the link simulator live in Python hooks around each collective,
which a CUDA graph replay would skip. The graphed regime is measured by research/gpu_check.py.
On a GPU every clock read waits for the device first (``clock.now``).

What the measurements mean (per-plan statistics, the bound on what SPD can save, the analytic
model's validation) is computed from these records in ``analysis.py``.
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from ..core.config import FullStateDict, ModelConfig
from ..core.plan import SPDPlan
from ..core.sharding import load_full_state_dict, model_params
from ..core.spec import build_model
from ..errors import ContextError
from ..inference import decode_step, new_cache, prefill
from ..options import floats, option
from ..parallel import clock, compat, distributed
from ..parallel.collectives import CollectiveCounter, LinkProfile, link_profile, simulate_link
from . import analysis, analytic

FORMAT = "megatron-spd-latency/1"
CALIBRATION_VISITS = 2  # dense visits without the simulator that set the auto link scale

# Random-weight shapes (LLaMA architecture) for T = 2 and 4; heads and KV groups divide 4.
PRESETS = {
    "tiny": ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                        ffn_hidden_size=128, vocab_size=256, max_seq_length=256),
    "llama-s": ModelConfig(num_layers=8, hidden_size=512, num_attention_heads=8,
                           num_query_groups=8, ffn_hidden_size=1408, vocab_size=8192,
                           max_seq_length=1024),
    "llama-m": ModelConfig(num_layers=16, hidden_size=1024, num_attention_heads=16,
                           num_query_groups=8, ffn_hidden_size=2816, vocab_size=16000,
                           max_seq_length=1024),
}


@dataclass
class Workload:
    """What one visit of a model times: a prefill of ``prompt`` tokens for ``batch`` rows, then
    ``new_tokens`` decode steps; ``repeats`` visits per model after ``warmup`` untimed ones."""

    batch: int = option(1, "sequences per step")
    prompt: int = option(64, "prompt tokens (prefill length)")
    new_tokens: int = option(16, "decode steps timed per visit")
    repeats: int = option(5, "timed visits per model")
    warmup: int = option(1, "untimed visits per model first")
    ratios: tuple[float, ...] = option((0.0, 0.25, 0.5, 0.75, 1.0), "SPD ratios to time "
                                       "(comma-separated; must include 0)", type=floats)
    stock: bool = option(True, "time the stock megatron-core model as well")
    seed: int = option(0, "seed of the random weights and prompt tokens")

    def __post_init__(self) -> None:
        self.ratios = tuple(float(r) for r in self.ratios)
        if min(self.batch, self.prompt, self.new_tokens, self.repeats) < 1 or self.warmup < 0:
            raise ValueError("batch, prompt, new_tokens and repeats must be >= 1 and warmup >= 0; "
                             f"got {asdict(self)}")
        if not self.ratios or any(not 0 <= r <= 1 for r in self.ratios):
            raise ValueError(f"SPD ratios must lie in [0, 1], got {self.ratios}")
        if 0.0 not in self.ratios:
            raise ValueError("the SPD ratios must include 0 (the dense baseline every other ratio "
                             "is compared with)")


@dataclass
class LinkSetting:
    """The simulated link: a profile (None: the machine's own collectives) dilated by a factor per
    phase; ``auto`` scale = this machine's compute time / the analytic model's compute time on
    ``device`` for the same step, so communication keeps the share it would have there."""

    profile: Optional[str] = option(None, "simulated link: nvlink | internode | pcie | "
                                          "ALPHA_US:GBPS (default: none, the machine's own "
                                          "collectives)", type=str, flag="--link")
    scale: str = option("1", "slow the link by this factor, or 'auto' (module doc)",
                        flag="--link-scale")
    device: str = option("a100", "the device the auto scale refers to",
                         choices=tuple(analytic.DEVICES))
    factors: dict = field(default_factory=dict)  # phase -> factor, filled by calibration
    calibration: dict = field(default_factory=dict)  # phase -> the two compute times behind it

    def __post_init__(self) -> None:
        if self.profile is not None:
            link_profile(self.profile)  # a bad name fails here, before any model is built
        if self.scale != "auto":
            try:
                ok = float(self.scale) > 0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"link scale must be 'auto' or a number > 0, got {self.scale!r}")
        if self.device not in analytic.DEVICES:
            raise ValueError(f"unknown device {self.device!r}; known: {sorted(analytic.DEVICES)}")

    def link(self, phase: str) -> Optional[LinkProfile]:
        if self.profile is None:
            return None
        return link_profile(self.profile).scaled(self.factors.get(phase, 1.0))


def spd_plan(num_layers: int, groups: int, ratio: float) -> SPDPlan:
    """``round(ratio x L)`` SPD blocks, the last ones (where a sensitivity sweep starts).
    Which blocks does not matter for speed: every SPD block saves one all-reduce."""
    n = round(ratio * num_layers)
    return SPDPlan.from_spd_blocks(num_layers, groups, range(num_layers - n, num_layers), "zs")


def build_stock_model(cfg: ModelConfig, params_dtype: torch.dtype = torch.float32) -> GPTModel:
    """megatron-core's own local GPT model, nothing of megatron_spd in its modules: the baseline
    the dense plan must not be slower than."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tcfg = cfg.transformer_config(tp, params_dtype=params_dtype)
    model = GPTModel(config=tcfg,
                     transformer_layer_spec=get_gpt_layer_local_spec(
                         normalization=cfg.normalization, qk_layernorm=cfg.qk_layernorm),
                     vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_seq_length,
                     share_embeddings_and_output_weights=cfg.tie_word_embeddings,
                     position_embedding_type=cfg.position_embedding_type,
                     rotary_base=cfg.rope_theta, rotary_percent=1.0,
                     rope_scaling=cfg.rope_scaling, rope_scaling_factor=cfg.rope_scaling_factor)
    return model.to(compat.device())


def _maybe_link(link: Optional[LinkProfile]):
    return simulate_link(link) if link is not None else contextlib.nullcontext()


def _visit(model, cache, tokens: torch.Tensor, wl: Workload, links: LinkSetting) -> dict:
    """One timed prefill and ``new_tokens`` decode steps; this rank's times and collectives."""
    cache.reset()
    dist.barrier()
    with _maybe_link(links.link("prefill")), CollectiveCounter() as cpre:
        t0 = clock.now()
        logits = prefill(model, cache, tokens)
        t_pre = clock.now() - t0
    nxt = logits.argmax(-1)
    dist.barrier()
    with _maybe_link(links.link("decode")), CollectiveCounter() as cdec:
        t0 = clock.now()
        for _ in range(wl.new_tokens):
            nxt = decode_step(model, cache, nxt).argmax(-1)
        t_dec = (clock.now() - t0) / wl.new_tokens
    return {"prefill_s": t_pre, "decode_s": t_dec,
            "prefill_coll": _per_step(cpre, 1), "decode_coll": _per_step(cdec, wl.new_tokens)}


def _per_step(c: CollectiveCounter, steps: int) -> dict:
    return {k: {"calls": c.calls[k] / steps, "bytes": c.bytes[k] / steps,
                "seconds": c.seconds[k] / steps} for k in c.calls}


def _calibrate(model, cache, tokens, wl: Workload, cfg: ModelConfig, links: LinkSetting) -> None:
    """Fill ``links.factors`` for ``scale=auto`` (same numbers on every rank)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if links.profile is None or links.scale != "auto":
        f = 1.0 if links.scale == "auto" else float(links.scale)
        links.factors = {"prefill": f, "decode": f}
        return
    per_visit = []
    for _ in range(CALIBRATION_VISITS):
        v = _visit(model, cache, tokens, wl, LinkSetting())
        t = torch.tensor([v[f"{ph}_s"] - sum(x["seconds"] for x in v[f"{ph}_coll"].values())
                          for ph in ("prefill", "decode")], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # compute time of the slowest rank
        per_visit.append(t)
    local = torch.stack(per_visit).min(0).values  # the least disturbed visit
    dev = analytic.device(links.device)  # the eager regime: this benchmark decodes eagerly
    link = link_profile(links.profile)
    ctx = {"prefill": (wl.prompt, (wl.prompt + 1) / 2),
           "decode": (1, wl.prompt + (wl.new_tokens + 1) / 2)}
    for i, ph in enumerate(("prefill", "decode")):
        tokens_, context = ctx[ph]
        gpu = analytic.step_time(cfg, tp, 0, link, dev, wl.batch, tokens_, context).compute_s
        links.factors[ph] = float(local[i]) / gpu
        links.calibration[ph] = {"cpu_compute_s": float(local[i]), "device_compute_s": gpu}


# () -> (config, SPD groups G, full state dict or None for random weights); called on each rank
WeightSource = Callable[[], tuple[ModelConfig, int, Optional[FullStateDict]]]


def preset_source(name: str, groups: int) -> WeightSource:
    """Random weights (seeded in ``run_latency``) for a ``PRESETS`` shape."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return lambda: (PRESETS[name], groups, None)


def _dense_model_in_turn(source: WeightSource, seed: int):
    """Ranks take turns reading the weights into the dense model and dropping the full state
    dict, so only one full copy exists at a time on a node (SmolLM2: 0.5 GB per copy)."""
    for r in range(dist.get_world_size()):
        if dist.get_rank() == r:
            cfg, groups, full = source()
            torch.manual_seed(seed)  # random weights: the same master weights on every rank
            dense = build_model(cfg, spd_plan(cfg.num_layers, groups, 0.0))
            if full is not None:
                load_full_state_dict(dense, full)
            del full
        dist.barrier()
    return cfg, groups, dense


def share_weights(model, reference) -> None:
    """Point every parameter and buffer of ``model`` at ``reference``'s storage: all plans run
    the same weights, so the sweep holds one copy of them (inference only, nothing is updated)."""
    ref = model_params(reference)
    for name, p in model_params(model).items():
        if name not in ref or ref[name].shape != p.shape:
            raise ValueError(f"{name}: models of one sweep must have identical weight layouts")
        p.data = ref[name].data


def run_latency(source: WeightSource, wl: Workload, links: LinkSetting, *, name: str = "model",
                progress: bool = True) -> Optional[dict]:
    """Measure every plan of ``wl.ratios`` (and the stock model); the report on global rank 0,
    None elsewhere. ``source`` gives the config, G and weights on each rank."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cfg, groups, dense = _dense_model_in_turn(source, wl.seed)
    if wl.prompt + wl.new_tokens > cfg.max_seq_length:
        raise ContextError(f"prompt {wl.prompt} + new tokens {wl.new_tokens} exceed the model's "
                           f"context of {cfg.max_seq_length}; use a shorter --prompt/--new-tokens")
    names, models = [], []
    for r in (*wl.ratios, "stock") if wl.stock else wl.ratios:
        plan = None if r == "stock" else spd_plan(cfg.num_layers, groups, r)
        m = dense if r == 0 else build_stock_model(cfg) if plan is None else build_model(cfg, plan)
        if m is not dense:
            share_weights(m, dense)  # one model's own random init is freed at a time
        m.eval()
        names.append("stock" if plan is None else f"spd{round(100 * r)}")
        models.append((plan, m))
    g = torch.Generator().manual_seed(wl.seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (wl.batch, wl.prompt), generator=g)
    cache = new_cache(wl.batch, wl.prompt + wl.new_tokens + 1, cuda_graph=False)  # eager regime
    for _, m in models:
        for _ in range(wl.warmup):
            _visit(m, cache, tokens, wl, LinkSetting())
    _calibrate(dense, cache, tokens, wl, cfg, links)

    records: list[list[dict]] = [[] for _ in models]
    bar = distributed.progress(total=wl.repeats * len(models), desc="latency", enabled=progress)
    for rep in range(wl.repeats):
        for k in range(len(models)):
            i = (k + rep) % len(models)  # rotate the visiting order every repeat
            records[i].append(_visit(models[i][1], cache, tokens, wl, links))
            bar.update()
    bar.close()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if not distributed.is_rank0():
        return None
    tp_ranks = gathered[:tp]  # data-parallel replicas (if any) measured the same thing
    plans = [analysis.summarise(names[i], models[i][0], [rk[i] for rk in tp_ranks])
             for i in range(len(models))]
    report = {"format": FORMAT, "host": host_info(tp), "tp": tp, "groups": groups,
              "model": {"name": name, "parameters": cfg.num_parameters(), **cfg.to_dict()},
              "workload": asdict(wl), "link": _link_info(links), "plans": plans}
    analysis.add_bounds(report)
    report["analytic_validation"] = analysis.validate_analytic(report, cfg, links)
    return report


def host_info(tp: int) -> dict:
    """Where the numbers come from: CPU model, cores, threads per rank, library versions."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import megatron.core

    return {"device": torch.cuda.get_device_name() if compat.on_gpu() else "cpu", "cpu": cpu,
            "regime": "eager",
            "cores": len(os.sched_getaffinity(0)), "ranks": dist.get_world_size(), "tp": tp,
            "threads_per_rank": torch.get_num_threads(), "backend": compat.backend(),
            "torch": torch.__version__, "megatron_core": megatron.core.__version__,
            "load_avg_1min": os.getloadavg()[0],
            "rank0_max_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _link_info(links: LinkSetting) -> dict:
    if links.profile is None:
        return {"profile": None, "note": "no simulator: the machine's own collectives"}
    return {"profile": link_profile(links.profile).to_dict(), "scale": links.scale,
            "device": links.device, "factors": links.factors, "calibration": links.calibration,
            "simulated": {ph: links.link(ph).to_dict() for ph in ("prefill", "decode")}}
