"""research/gpu_check.py --smoke on CPU: the script runs every section and writes its JSON (the
GPU-only graphed decode is skipped with its reason). Its numbers mean nothing on CPU; what this
guards is that the GPU run cannot fail on a crash in the script itself. It runs in this process
(its two-rank section on the pooled ranks of megatron_spd.testing): a fresh interpreter would
only add the import of torch and megatron-core."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_writes_its_report(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "research"))
    import gpu_check

    out = tmp_path / "gpu_check.json"
    code = gpu_check.main(["--smoke", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]
    report = json.loads(out.read_text())
    assert report["format"] == "megatron-spd-gpu-check/1" and report["mode"] == "smoke"
    checks = report["checks"]
    for name in ("exactness_t1", "two_ranks_gloo", "recompute", "bf16_train_step", "kv_cache"):
        assert checks[name]["ok"] is True, (name, checks[name])
    assert set(checks["exactness_t1"]["cases"]) == {"dense", "g2", "g4", "opt_g2"}
    decode = checks["decode"]
    assert decode["weight_read_bound_ms"] > 0 and decode["bandwidth"]["GBps"] > 0
    for row in decode["batches"].values():
        paths = row["paths"]
        assert paths["megatron"]["ms_per_token"] > 0
        assert paths["tensorised_eager"]["block_overhead_us"] >= 0
        assert "no CUDA device" in paths["tensorised_graphed"]["skipped"]
    assert "decode shard: weight-read bound" in stdout
