"""GPU check: is megatron-spd exact, and is its decode step near the memory bound, on this GPU?

    python research/gpu_check.py --out docs/gpu/gpu_check.json     # one CUDA GPU, a few minutes
    python research/gpu_check.py --smoke --out /tmp/gpu_check.json  # tiny shapes; runs on CPU

One process (plus two spawned ranks) on one device; every section is recorded in the JSON, a
failing one with its error, without stopping the others:

- exactness_t1: fp32, T=1, dense and SPD (LLaMA G=2/G=4 with dense blocks mixed in, OPT G=2),
  logits and gradients of a weighted-logit loss against tests/reference.py (the plain-torch
  model written from the formulas), tolerances of tests/test_foundation.py;
- two_ranks_gloo: the same cases at TP=2, two ranks on this one device over gloo, against T=1;
- recompute: gradients with full and selective activation recompute equal those without;
- bf16_train_step: three AdamW steps on a 100% SPD plan in bf16: finite, loss goes down;
- kv_cache: KV-cache logits against full recompute (megatron's path, the tensorised path eager,
  and graphed) and identical greedy tokens on all three;
- decode: ms/token of one LLaMA-2-70B TP=8 rank shard (80 blocks, hidden 8192, 8 query heads,
  1 KV head of 128, ffn 3584, vocab 4000; bf16; prompt 1024) at batch 1 and 16, on megatron's
  eager path, the tensorised path eager, and graphed (CUDA graph), against the weight-read
  bound (weight bytes / the device bandwidth measured here by a large copy); the per-block
  overhead above that bound, which bench/analytic.py reads (``--gpu-check``).

``--smoke`` shrinks every shape (the decode "shard" too) so the script runs in about a minute
on a CPU; there the graphed path is skipped with its reason. The numbers are only meaningful
from a GPU run without --smoke (docs/gpu/README.md). Each section imports the package modules
it needs itself, so that one whose import fails is recorded with its error like any other.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from megatron_spd import ModelConfig, SPDPlan

ROOT = Path(__file__).resolve().parents[1]


def _load_reference():
    """tests/reference.py, the independent plain-torch model, loaded from its file (it is the
    tests' oracle, not part of the package)."""
    spec = importlib.util.spec_from_file_location("reference", ROOT / "tests" / "reference.py")
    module = sys.modules["reference"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()

FORMAT = "megatron-spd-gpu-check/1"
# tests/test_foundation.py's models, plans and tolerances (fp32)
LLAMA = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                    ffn_hidden_size=128, vocab_size=96, max_seq_length=32)
OPT = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                  ffn_hidden_size=96, vocab_size=96, max_seq_length=32, normalization="LayerNorm",
                  activation="gelu", add_bias_linear=True, tie_word_embeddings=True)
CASES = {"dense": (LLAMA, None), "g2": (LLAMA, SPDPlan(2, ["zs", "dense", "zs"])),
         "g4": (LLAMA, SPDPlan(4, ["dense", "zs", "zs"])),
         "opt_g2": (OPT, SPDPlan(2, ["zs", "zs"]))}
TOL_REFERENCE = {"logits_atol": 2e-5, "logits_rtol": 1e-5, "grad_atol_per_max": 4e-6,
                 "grad_rtol": 1e-4}
TOL_TP = {"logits_atol": 1e-5, "logits_rtol": 1e-5, "grad_atol_per_max": 1e-6, "grad_rtol": 1e-4}
KV_REL_TOL = 1e-5  # |cached - recomputed| / max|logits|, fp32
RECOMPUTE = {"full": dict(recompute_granularity="full", recompute_method="uniform",
                          recompute_num_layers=1),
             "selective": dict(recompute_granularity="selective",
                               recompute_modules=["core_attn", "layernorm", "mlp"])}


@dataclass(frozen=True)
class Shapes:
    """What the decode and training sections run (the exactness sections always use the tiny
    test models)."""

    shard: ModelConfig
    shard_head_dim: int
    prompt: int
    new_tokens: int
    repeats: int
    batches: tuple[int, ...]
    train: ModelConfig
    train_batch: int
    train_seq: int
    copy_bytes: int


FULL = Shapes(
    # one TP=8 rank of LLaMA-2-70B: 64/8 query heads, 8/8 KV heads, 28672/8 ffn, 32000/8 vocab
    shard=ModelConfig(num_layers=80, hidden_size=8192, num_attention_heads=8, num_query_groups=1,
                      ffn_hidden_size=3584, vocab_size=4000, max_seq_length=4096),
    shard_head_dim=128, prompt=1024, new_tokens=32, repeats=3, batches=(1, 16),
    train=ModelConfig(num_layers=4, hidden_size=512, num_attention_heads=8, num_query_groups=4,
                      ffn_hidden_size=1408, vocab_size=8192, max_seq_length=512),
    train_batch=4, train_seq=256, copy_bytes=2 << 30)
SMOKE = Shapes(
    shard=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=1,
                      ffn_hidden_size=96, vocab_size=128, max_seq_length=64),
    shard_head_dim=8, prompt=16, new_tokens=3, repeats=2, batches=(1, 2),
    train=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=128, vocab_size=96, max_seq_length=32),
    train_batch=2, train_seq=16, copy_bytes=32 << 20)


def _tokens_and_weights(cfg: ModelConfig):
    tokens = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, 8, cfg.vocab_size, generator=torch.Generator().manual_seed(7))
    return tokens, weights


def _compare(got, want, tol: dict) -> dict:
    """Max errors of (logits, grads) against (logits, grads) and whether they are within tol."""
    logit_err = (got[0] - want[0]).abs().max().item()
    ok = bool(torch.allclose(got[0], want[0], atol=tol["logits_atol"], rtol=tol["logits_rtol"]))
    grad_err = 0.0
    ok = ok and got[1].keys() == want[1].keys()
    for k in want[1]:
        g, w = got[1].get(k), want[1][k]
        if g is None:
            continue
        scale = max(1.0, w.abs().max().item())
        grad_err = max(grad_err, (g - w).abs().max().item() / scale)
        ok = ok and bool(torch.allclose(g, w, atol=tol["grad_atol_per_max"] * scale,
                                        rtol=tol["grad_rtol"]))
    return {"ok": ok, "logits_max_abs_err": logit_err, "grad_max_err_per_max": grad_err}


def _megatron_case(name: str):

    from megatron_spd.testing import logits_and_grads

    cfg, plan = CASES[name]
    tokens, weights = _tokens_and_weights(cfg)
    return logits_and_grads(cfg, plan, reference.random_full_state_dict(cfg, 3), tokens, weights)


def check_exactness_t1(state: dict) -> dict:

    out = {"tolerance": TOL_REFERENCE, "cases": {}}
    for name, (cfg, plan) in CASES.items():
        state[name] = _megatron_case(name)
        sd = {k: v.clone().requires_grad_()
              for k, v in reference.random_full_state_dict(cfg, 3).items()}
        tokens, weights = _tokens_and_weights(cfg)
        ref = reference.reference_logits(cfg, sd, tokens, plan)
        (ref * weights).sum().backward()
        ref_grads = {k: v.grad for k, v in sd.items()}
        out["cases"][name] = _compare(state[name], (ref.detach(), ref_grads), TOL_REFERENCE)
    out["ok"] = all(c["ok"] for c in out["cases"].values())
    return out


def _two_rank_cases() -> dict:
    return {name: _megatron_case(name) for name in CASES}


def check_two_ranks(state: dict) -> dict:
    from megatron_spd.testing import run_ranks

    missing = [n for n in CASES if n not in state]
    if missing:
        return {"skipped": f"needs the T=1 results of exactness_t1, missing {missing}"}
    ranks = run_ranks(_two_rank_cases, 2, _backend="gloo", threads=max(1, os.cpu_count() // 2))
    out = {"tolerance": TOL_TP, "backend": "gloo", "ranks_on_one_device": True, "cases": {}}
    for name in CASES:
        per_rank = [_compare(r[name], state[name], TOL_TP) for r in ranks]
        out["cases"][name] = {"ok": all(p["ok"] for p in per_rank),
                              **{k: max(p[k] for p in per_rank)
                                 for k in ("logits_max_abs_err", "grad_max_err_per_max")}}
    out["ok"] = all(c["ok"] for c in out["cases"].values())
    return out


def check_recompute(state: dict) -> dict:

    from megatron_spd.testing import logits_and_grads

    cfg, plan = LLAMA, SPDPlan(2, ["zs", "zs", "zs"])  # selective layernorm: SPD blocks only
    tokens, weights = _tokens_and_weights(cfg)
    sd = reference.random_full_state_dict(cfg, 3)
    base = logits_and_grads(cfg, plan, sd, tokens, weights)
    out = {"tolerance": TOL_TP, "cases": {}}
    for name, overrides in RECOMPUTE.items():
        out["cases"][name] = _compare(logits_and_grads(cfg, plan, sd, tokens, weights, **overrides),
                                      base, TOL_TP)
    out["ok"] = all(c["ok"] for c in out["cases"].values())
    return out


def check_bf16_train_step(shapes: Shapes) -> dict:
    from megatron_spd.parallel import compat
    from megatron_spd.core.grads import reduce_tp_partial_grads
    from megatron_spd.core.sharding import forward_logits
    from megatron_spd.core.spec import build_model

    cfg = shapes.train
    plan = SPDPlan.from_spd_blocks(cfg.num_layers, 2, range(cfg.num_layers))  # 100% SPD
    model = build_model(cfg, plan, params_dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, cfg.vocab_size, (shapes.train_batch, shapes.train_seq + 1),
                           generator=torch.Generator().manual_seed(1)).to(compat.device())
    losses = []
    for _ in range(3):
        logits = forward_logits(model, tokens[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        reduce_tp_partial_grads(model)
        finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    return {"ok": finite and all(map(torch.isfinite, torch.tensor(losses)))
            and losses[-1] < losses[0], "losses": losses, "grads_finite": finite,
            "dtype": "bfloat16", "plan": "100% SPD, G=2 emulated at T=1"}


def _decode_session(model, prompt: torch.Tensor, feed: list[int], **cache_options):
    """Cached logits of the prompt then each fed token, the greedy tokens, and whether a CUDA
    graph was replayed."""
    from megatron_spd.inference import decode_step, new_cache, prefill

    cache = new_cache(prompt.shape[0], prompt.shape[1] + len(feed) + 1, **cache_options)
    logits = [prefill(model, cache, prompt)]
    for tok in feed:
        logits.append(decode_step(model, cache, torch.full((prompt.shape[0],), tok)))
    graphed = cache.context.tensor_path and cache.decode_step_for(model).graph is not None
    return torch.stack(logits, 1).float().cpu(), graphed


KV_PATHS = {"megatron": dict(tensor_path=False), "tensorised_eager": dict(cuda_graph=False),
            "tensorised_graphed": dict()}


def check_kv_cache(state: dict) -> dict:
    from megatron_spd.core.sharding import forward_logits
    from megatron_spd.core.spec import build_model

    out = {"relative_tolerance": KV_REL_TOL, "cases": {}}
    prompt, feed = [10, 11, 12, 13, 14, 15, 16], [9, 8, 7, 6, 5]
    for name in ("dense", "g2"):
        cfg, plan = CASES[name]
        model = build_model(cfg, plan).eval()
        seq = torch.tensor([prompt + feed])
        with torch.no_grad():
            full = forward_logits(model, seq).float().cpu()
        want = torch.stack([full[:, len(prompt) - 1 + i] for i in range(len(feed) + 1)], 1)
        rows = {}
        for path, options in KV_PATHS.items():
            got, graphed = _decode_session(model, torch.tensor([prompt]), feed, **options)
            err = (got - want).abs().max().item() / want.abs().max().item()
            rows[path] = {"max_rel_err": err, "ok": err < KV_REL_TOL, "graphed": graphed,
                          "greedy": got.argmax(-1).tolist()}
        same = len({str(r["greedy"]) for r in rows.values()}) == 1
        out["cases"][name] = {"paths": rows, "same_greedy_tokens": same,
                              "ok": same and all(r["ok"] for r in rows.values())}
    out["graphed"] = all(c["paths"]["tensorised_graphed"]["graphed"] for c in out["cases"].values())
    if not out["graphed"]:
        out["graph_note"] = ("no CUDA device: the 'graphed' path ran eagerly"
                             if not torch.cuda.is_available() else "capture failed; see decode")
    out["ok"] = all(c["ok"] for c in out["cases"].values())
    return out


def measure_bandwidth(nbytes: int) -> dict:
    """Device memory bandwidth from a large copy: (read + write bytes) / time, median of 5."""
    from megatron_spd.parallel import clock, compat

    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=compat.device())
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = clock.now()
        dst.copy_(src)
        times.append(clock.now() - t0)
    return {"bytes_copied": nbytes, "GBps": 2 * nbytes / statistics.median(times) / 1e9,
            "device": str(compat.device())}


def _time_decode(model, prompt: torch.Tensor, shapes: Shapes, **cache_options) -> dict:
    """Median ms/token over ``repeats`` timed visits (prefill untimed, then ``new_tokens``
    greedy decode steps), after one untimed visit (which also captures the graph)."""
    from megatron_spd.parallel import clock
    from megatron_spd.inference import decode_step, new_cache, prefill

    b = prompt.shape[0]
    cache = new_cache(b, shapes.prompt + shapes.new_tokens + 1, **cache_options)
    per_token, tokens = [], None
    for visit in range(shapes.repeats + 1):
        cache.reset()
        nxt = prefill(model, cache, prompt).argmax(-1)
        seq = []
        t0 = clock.now()
        for _ in range(shapes.new_tokens):
            nxt = decode_step(model, cache, nxt).argmax(-1)
            seq.append(nxt)
        elapsed = clock.now() - t0
        if visit:
            per_token.append(elapsed / shapes.new_tokens)
        tokens = torch.stack(seq, 1).cpu()
    graphed = cache.context.tensor_path and cache.decode_step_for(model).graph is not None
    return {"ms_per_token": 1e3 * statistics.median(per_token),
            "ms_per_token_each": [1e3 * t for t in per_token], "graphed": graphed,
            "graph_error": cache.graph_error, "tokens": tokens.tolist()}


def measure_decode(shapes: Shapes, state: dict) -> dict:
    from megatron_spd.parallel import compat
    from megatron_spd.core.spec import build_model

    cfg = shapes.shard
    model = build_model(cfg, None, params_dtype=torch.bfloat16,
                        kv_channels=shapes.shard_head_dim).eval()
    # the local spec's torch norms keep fp32 weights (an unfused norm on bf16 input); cast all
    # of it to bf16 as megatron's Float16Module does for a bf16 model
    model.bfloat16()
    params = dict(model.named_parameters())
    weight_bytes = sum(p.numel() * p.element_size() for n, p in params.items()
                       if "word_embeddings" not in n)  # decode reads one embedding row
    bw = measure_bandwidth(shapes.copy_bytes)
    state["bandwidth"] = bw
    out = {"shard": {**cfg.to_dict(), "head_dim": shapes.shard_head_dim,
                     "parameters": sum(p.numel() for p in params.values()),
                     "weight_bytes_read_per_step": weight_bytes,
                     "dtype": "bfloat16 (every parameter, norms included)"},
           "prompt": shapes.prompt, "new_tokens": shapes.new_tokens, "repeats": shapes.repeats,
           "bandwidth": bw, "weight_read_bound_ms": 1e3 * weight_bytes / (bw["GBps"] * 1e9),
           "batches": {}}
    for b in shapes.batches:
        prompt = torch.randint(0, cfg.vocab_size, (b, shapes.prompt),
                               generator=torch.Generator().manual_seed(b)).to(compat.device())
        kv_bytes = (2 * b * cfg.num_layers * cfg.num_query_groups * shapes.shard_head_dim
                    * (shapes.prompt + shapes.new_tokens + 1) * 2)  # the whole bf16 cache
        rows = {}
        for path, options in KV_PATHS.items():
            if path == "tensorised_graphed" and not torch.cuda.is_available():
                rows[path] = {"skipped": "no CUDA device (the step would run eagerly)"}
                continue
            rows[path] = _time_decode(model, prompt, shapes, **options)
            if compat.on_gpu():
                torch.cuda.empty_cache()
        bound_ms = 1e3 * (weight_bytes + kv_bytes) / (bw["GBps"] * 1e9)
        for r in rows.values():
            if "ms_per_token" in r:
                r["over_weight_read_bound"] = r["ms_per_token"] / out["weight_read_bound_ms"]
                excess_ms = max(0.0, r["ms_per_token"] - bound_ms)
                r["block_overhead_us"] = 1e3 * excess_ms / cfg.num_layers
        eager, graphed = rows["tensorised_eager"], rows["tensorised_graphed"]
        ref = rows["megatron"]["tokens"]
        out["batches"][str(b)] = {
            "kv_cache_bytes": kv_bytes, "read_bound_ms": bound_ms, "paths": rows,
            "graphed_tokens_equal_eager": (graphed["tokens"] == eager["tokens"]
                                           if "tokens" in graphed else None),
            "tensorised_tokens_agree_with_megatron": _agreement(eager["tokens"], ref)}
    return out


def _agreement(a: list, b: list) -> float:
    """Fraction of greedy positions (rows x steps) where two runs chose the same token."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


def _section(report: dict, name: str, fn, *args) -> None:
    """Run one section; record its result, its seconds, or its error."""
    print(f"[gpu_check] {name} ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - a failed section is a result too
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    report["checks"][name] = result
    status = ("skipped: " + result["skipped"]) if "skipped" in result else \
        ("error: " + result["error"]) if "error" in result else f"ok={result.get('ok')}"
    print(f"[gpu_check] {name}: {status} ({result['seconds']} s)", flush=True)


def _host() -> dict:
    import megatron.core

    from megatron_spd.parallel import compat
    from megatron_spd.core.config import device_flags

    gpu = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
            "cuda": torch.version.cuda if gpu else None, "torch": torch.__version__,
            "megatron_core": megatron.core.__version__, "python": platform.python_version(),
            "transformer_engine": compat.importable("transformer_engine"),
            "apex": compat.importable("apex"),
            "flash_attn": compat.importable("flash_attn"), "triton": compat.importable("triton"),
            "device_flags": device_flags(LLAMA, on_gpu=gpu)}


def summary_lines(report: dict) -> list[str]:
    """The headline numbers of a report, one per line."""
    lines = [f"{name}: " + ("skipped" if "skipped" in c else "ERROR" if "error" in c
                            else "ok" if c.get("ok") else "FAILED")
             for name, c in report["checks"].items() if name != "decode"]
    dec = report["checks"].get("decode", {})
    if "batches" in dec:
        lines.append(f"decode shard: weight-read bound {dec['weight_read_bound_ms']:.2f} ms "
                     f"at {dec['bandwidth']['GBps']:.0f} GB/s")
        for b, row in dec["batches"].items():
            parts = [f"{p} {r['ms_per_token']:.2f} ms/token ({r['over_weight_read_bound']:.1f}x)"
                     for p, r in row["paths"].items() if "ms_per_token" in r]
            lines.append(f"  batch {b}: " + ", ".join(parts))
    elif "error" in dec:
        lines.append(f"decode: ERROR {dec['error']}")
    return lines


def run(shapes: Shapes, smoke: bool) -> dict:
    from megatron_spd.parallel import distributed

    started = time.perf_counter()
    distributed.init()
    report = {"format": FORMAT, "mode": "smoke" if smoke else "full",
              "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "host": _host(), "shapes": asdict(shapes), "checks": {}}
    state: dict = {}
    _section(report, "exactness_t1", check_exactness_t1, state)
    _section(report, "two_ranks_gloo", check_two_ranks, state)
    _section(report, "recompute", check_recompute, state)
    _section(report, "bf16_train_step", check_bf16_train_step, shapes)
    _section(report, "kv_cache", check_kv_cache, state)
    _section(report, "decode", measure_decode, shapes, state)
    report["seconds"] = round(time.perf_counter() - started, 1)
    distributed.shutdown()
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON report to write (atomically)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes: a CPU run proves the script")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps per timed visit")
    args = p.parse_args(argv)
    from megatron_spd.files import atomic_write_json

    shapes = SMOKE if args.smoke else FULL
    if args.new_tokens:
        shapes = replace(shapes, new_tokens=args.new_tokens)
    if not args.smoke and not torch.cuda.is_available():
        print("warning: no CUDA device; the full shapes need a GPU (use --smoke on CPU)",
              file=sys.stderr)
    report = run(shapes, args.smoke)
    atomic_write_json(args.out, report)
    print("\n".join(summary_lines(report)))
    print(f"[gpu_check] wrote {args.out} ({report['seconds']} s)")
    failed = [n for n, c in report["checks"].items() if c.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
