"""The tensorised KV-cache path (core/cached_attention.py, inference/graph.py) against megatron's
own static path, which the engine used before it: same logits and greedy tokens, dense and SPD,
TP=1 and TP=2, with left padding, chunked extend and rewind; and the properties a CUDA graph replay
needs, checked on CPU: a decode step's operations and shapes do not depend on the cache length,
and nothing is read back to the host.

Tolerance: tiny random fp32 models, logits atol 1e-5 (measured ~1e-7: fused attention vs
megatron's unfused softmax); greedy tokens identical.
"""
from __future__ import annotations

import pytest
import torch

from megatron_spd import ModelConfig, SPDPlan
from megatron_spd.testing import run_ranks

TINY = ModelConfig(num_layers=4, hidden_size=48, num_attention_heads=4, num_query_groups=2,
                   ffn_hidden_size=96, vocab_size=128, max_seq_length=32)
OPT = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=4, num_query_groups=4,
                  ffn_hidden_size=96, vocab_size=128, max_seq_length=32, normalization="LayerNorm",
                  activation="gelu", add_bias_linear=True,
                  position_embedding_type="learned_absolute")
CASES = {"dense": (TINY, None), "spd": (TINY, SPDPlan.from_spd_blocks(4, 2, [1, 3])),
         "opt_spd": (OPT, SPDPlan(2, ["zs", "zs"]))}
PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16], [42]]
ATOL = 1e-5
# ops that read a device value back to the host (a sync, and not capturable in a CUDA graph)
HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select")


def _session(model, tensor_path: bool) -> dict:
    """A padded batch: prefill, 4 greedy decode steps, a 2-token extend, rewind, extend again."""
    from megatron_spd.inference import decode_step, extend, new_cache, prefill, rewind

    width = max(len(p) for p in PROMPTS)
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    cache = new_cache(len(PROMPTS), width + 8, tensor_path=tensor_path)
    logits = [prefill(model, cache, tokens, [len(p) for p in PROMPTS])]
    greedy = []
    for _ in range(4):
        greedy.append(logits[-1].argmax(-1))
        logits.append(decode_step(model, cache, greedy[-1]))
    chunk = torch.tensor([[1, 2], [3, 4], [5, 6]])
    first = extend(model, cache, chunk)
    rewind(cache, cache.length - 2)
    again = extend(model, cache, chunk)
    return {"logits": torch.stack(logits, 1), "tokens": torch.stack(greedy, 1),
            "extend": first, "extend_again": again, "path": cache.context.tensor_path}


def _trace_decode_step(model) -> list[list[tuple]]:
    """(op, input shapes) of two decode steps at different cache lengths."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_spd.inference import decode_step, new_cache, prefill

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
            self.ops.append((func.name(), shapes))
            return func(*args, **(kwargs or {}))

    cache = new_cache(2, 16)
    prefill(model, cache, torch.tensor([[1, 2, 3], [4, 5, 6]]), [3, 2])
    decode_step(model, cache, torch.tensor([7, 8]))  # first call builds the step (not traced)
    traces = []
    for tok in (9, 10):
        with Trace() as t:
            decode_step(model, cache, torch.tensor([tok, tok]))
        traces.append(t.ops)
    return traces


def _compare_paths(trace: bool) -> dict:
    from megatron_spd.core.spec import build_model

    out = {}
    for name, (cfg, plan) in CASES.items():
        model = build_model(cfg, plan).eval()
        out[name] = {"tensor": _session(model, True), "megatron": _session(model, False)}
        if trace and name == "spd":
            out["trace"] = _trace_decode_step(model)
    return out


@pytest.fixture(scope="module")
def results():
    return {1: run_ranks(_compare_paths, 1, True), 2: run_ranks(_compare_paths, 2, False,
                                                                   threads=1)}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_tensorised_path_equals_megatrons(results, world, name):
    for rank in results[world]:
        fast, ref = rank[name]["tensor"], rank[name]["megatron"]
        assert fast["path"] and not ref["path"]
        for key in ("logits", "extend", "extend_again"):
            err = (fast[key] - ref[key]).abs().max().item()
            print(f"TP={world} {name} {key}: max |tensorised - megatron| {err:.1e}")
            assert err < ATOL, (world, name, key, err)
        assert torch.equal(fast["tokens"], ref["tokens"]), (fast["tokens"], ref["tokens"])
    r0 = results[world][0][name]["tensor"]
    for rank in results[world][1:]:  # every TP rank decodes the same tokens
        assert torch.equal(rank[name]["tensor"]["tokens"], r0["tokens"])


def test_decode_step_is_shape_static_without_host_reads(results):
    first, second = results[1][0]["trace"]
    assert first == second, "a decode step's ops or shapes depend on the cache length"
    reads = sorted({op for op, _ in first if op in HOST_READS})
    assert not reads, f"the decode step reads device values back to the host: {reads}"
    assert any(op == "aten::index_copy_" for op, _ in first)  # K/V written in place
    assert any("scaled_dot_product" in op for op, _ in first)  # fused attention
