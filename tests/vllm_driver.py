"""Runs vLLM for tests/test_vllm.py, in the vLLM virtualenv (.ci/vllm-venv), one process per TP.

    python tests/vllm_driver.py JOB.json OUT.json

JOB: {"tp": T, "models": [{"dir", "prompts": [[token ids]], "max_tokens", "logprobs",
"count": bool, "faults": [names]}]}. Every model gets one engine (started once, models in turn);
per model OUT holds greedy tokens, the raw logits vLLM reports for the top ``logprobs`` tokens of
every step, all-reduces per model forward (counted on every rank), and the same outputs with each
named fault patched into the running engine's SPD blocks (the negative controls):
- ``bias_rank0``: the projections add their bias themselves, which vLLM's RowParallelLinear does
  on TP rank 0 only when it does not reduce (the naive port of an SPD block);
- ``residual_in_allreduce``: X summed inside the all-reduce (counted once per rank).
Both are patched through ``LLM.collective_rpc`` into the worker processes, never into the plugin.
"""
from __future__ import annotations

import json
import os
import sys
import time


def _spd_layers(worker):
    from megatron_spd.integrations.vllm.models import SPDDecoderLayer

    model = worker.model_runner.get_model()
    return [m for m in model.modules() if isinstance(m, SPDDecoderLayer)]


def _set_fault(worker, name):
    """Patch fault ``name`` (None: undo) into every SPD block of this worker's model."""
    import torch
    from vllm.distributed import tensor_model_parallel_all_reduce

    for layer in _spd_layers(worker):
        layer.__dict__.pop("reduce", None)
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.skip_bias_add = name != "bias_rank0"
        if name == "residual_in_allreduce":
            def reduce(partial, x, b_o, b_fc2, _tp=layer.tp_size):
                out = tensor_model_parallel_all_reduce(partial + x) if _tp > 1 else partial + x
                for b in (b_o, b_fc2):
                    out = out if b is None else out + b
                return out, torch.zeros_like(x)
            layer.reduce = reduce
    return len(_spd_layers(worker))


def _start_count(worker):
    """Count TP all-reduces and model forwards on this rank from now on."""
    from vllm.distributed import get_tp_group

    group, model = get_tp_group(), worker.model_runner.get_model()
    counts = worker.spd_counts = {"all_reduce": 0, "forward": 0}
    inner = group._all_reduce_out_place

    def counted(tensor):
        counts["all_reduce"] += 1
        return inner(tensor)

    group._all_reduce_out_place = counted
    model.register_forward_pre_hook(lambda *_: counts.__setitem__("forward",
                                                                   counts["forward"] + 1))
    return True


def _read_count(worker):
    return dict(worker.spd_counts)


def _generate(llm, spec):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True,
                            logprobs=spec["logprobs"])
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params,
                        use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "logits": [[{str(t): lp.logprob for t, lp in step.items()}
                        for step in o.outputs[0].logprobs] for o in outs]}


def run(job):
    from vllm import LLM

    tp = job["tp"]
    results = []
    for spec in job["models"]:
        t0 = time.perf_counter()
        llm = LLM(model=spec["dir"], tensor_parallel_size=tp, dtype="float32", enforce_eager=True,
                  max_model_len=spec.get("max_model_len", 128), max_num_seqs=8,
                  max_num_batched_tokens=256, seed=0, logprobs_mode="raw_logits",
                  max_logprobs=spec["logprobs"])
        res = {"dir": spec["dir"], "startup_s": round(time.perf_counter() - t0, 1)}
        if spec.get("count"):
            llm.collective_rpc(_start_count)
        res.update(_generate(llm, spec))
        if spec.get("count"):
            res["counts"] = llm.collective_rpc(_read_count)
        res["faults"] = {}
        for fault in spec.get("faults", []):
            llm.collective_rpc(_set_fault, args=(fault,))
            res["faults"][fault] = _generate(llm, spec)
            llm.collective_rpc(_set_fault, args=(None,))
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        del llm
        import gc
        gc.collect()
    return results


def main():
    job = json.loads(open(sys.argv[1]).read())
    tp = job["tp"]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "auto" if tp == 1 else \
        "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp))
    out = run(job)
    tmp = sys.argv[2] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, sys.argv[2])


if __name__ == "__main__":
    main()
