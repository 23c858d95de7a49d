"""Serving an SPD model with megatron-core's own dynamic inference engine (megatron-core 0.19).

megatron-core 0.19 serves through ``DynamicInferenceEngine`` (paged KV cache, continuous
batching) and its OpenAI-style HTTP server ``dynamic_text_gen_server`` (``/v1/completions``,
``/v1/chat/completions``), the pair Megatron-LM's ``tools/run_dynamic_text_generation_server.py``
runs. Its entry points take any ``GPTModel``: ``GPTInferenceWrapper`` calls
``model(tokens, positions, mask, inference_context=..., runtime_gather_output=True)``, so a model
from ``open_model`` runs there with its SPD blocks as they are (one all-reduce per SPD block).

- ``build_engine(loaded)``: megatron's ``DynamicInferenceContext`` + ``GPTInferenceWrapper`` +
  ``TextGenerationController`` + ``DynamicInferenceEngine`` around a ``LoadedModel`` (every TP
  rank calls it). Nothing of the engine is re-implemented here.
- ``DynamicEngine.generate``: token ids in, generated ids out, through ``engine.add_request`` and
  ``engine.step_modern`` (all ranks, same prompts).
- ``DynamicEngine.serve``: megatron's inference coordinator and HTTP server on 127.0.0.1 (rank 0
  hosts them; every rank runs the engine loop), then megatron's own pause/stop protocol.
- ``ServerTokenizer``: our tokenizer under the names megatron's controller and server call
  (``tokenize``/``detokenize``/``eod``/``bos``/``apply_chat_template``).

On a CPU-only machine ``compat.apply_dynamic_inference`` (called here) installs the shims the
engine needs; on a GPU nothing is changed. CUDA graphs stay off: SPD layers refuse
``cuda_graph_impl`` other than "none" (core/block.py). Needs megatron-core >= 0.18 (tested on
0.18.2 and 0.19.2; ``mcore_versions.dynamic_inference``); the server also needs quart,
hypercorn, pyzmq and msgpack (``pip install 'megatron-spd[megatron-server]'``).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import multiprocessing
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from ..data.tokenizer import Tokenizer
from ..files import read_json_object
from ..loading.open_model import LoadedModel
from ..parallel import compat, mcore_versions

SERVER_PACKAGES = ("quart", "hypercorn", "zmq", "msgpack")


class ServerTokenizer:
    """Our ``Tokenizer`` as megatron-core's inference code calls a tokenizer.

    ``tokenize`` is plain text without BOS (megatron adds BOS itself when a request asks,
    text_generation_controller.py:435-445). ``apply_chat_template`` renders a Jinja chat template
    the way Hugging Face transformers does (a sandboxed Jinja environment, ``messages`` and
    ``add_generation_prompt``), then tokenizes: megatron's chat endpoint calls it under that name
    (chat_completions.py:486-506), and our tokenizers are ``tokenizers``/sentencepiece ones
    without transformers' tokenizer class. Module level and picklable: megatron starts its
    coordinator and server processes with ``spawn`` and hands them the tokenizer."""

    def __init__(self, tokenizer: Tokenizer, chat_template: Optional[str] = None) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @property
    def eod(self) -> Optional[int]:
        return self.tokenizer.eos_id

    @property
    def eos_id(self) -> Optional[int]:
        return self.tokenizer.eos_id

    @property
    def bos(self) -> Optional[int]:
        return self.tokenizer.bos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=False)

    def detokenize(self, ids: Sequence[int], **_: Any) -> str:
        return self.tokenizer.decode(list(ids))

    def apply_chat_template(self, messages: list[dict], tokenize: bool = True,
                            add_generation_prompt: bool = False, tools: Any = None,
                            **kwargs: Any) -> list[int] | str:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template= to "
                             "build_engine (or put it in tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            bos_token="", eos_token="", **kwargs)
        return self.tokenize(text) if tokenize else text


def chat_template_of(tokenizer: Tokenizer) -> Optional[str]:
    """The ``chat_template`` of the Hugging Face ``tokenizer_config.json`` next to the
    tokenizer's file, if there is one."""
    path = getattr(tokenizer, "path", None)
    config = Path(path).parent / "tokenizer_config.json" if path is not None else None
    if config is None or not config.is_file():
        return None
    template = read_json_object(config, "a JSON object", ValueError).get("chat_template")
    return template if isinstance(template, str) else None


class DynamicEngine:
    """megatron-core's ``DynamicInferenceEngine`` around an SPD model (``build_engine``).

    While it exists megatron's ``InferenceMode`` is active (dynamic_engine.py:338), under which
    a plain ``GPTModel`` forward must pass ``runtime_gather_output``; ``close()`` (or leaving a
    ``with`` block) clears it."""

    def __init__(self, engine: Any, tokenizer: ServerTokenizer, api: Any) -> None:
        self.engine, self.tokenizer, self._api = engine, tokenizer, api
        self._ids = itertools.count()
        self.steps = 0  # engine steps run by generate(), for per-step accounting

    def __enter__(self) -> "DynamicEngine":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self._api.InferenceMode.unset_active()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 stop_on_eos: bool = False) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (token ids), ``max_new_tokens`` each (fewer if
        ``stop_on_eos`` and the model ends one), in prompt order. Every TP rank calls it with
        the same prompts."""
        params = self._api.SamplingParams(
            num_tokens_to_generate=max_new_tokens, top_k=1,
            termination_id=self.tokenizer.eod if stop_on_eos else -1)
        ids = []
        for prompt in prompts:
            ids.append(next(self._ids))
            self.engine.add_request(ids[-1], [int(t) for t in prompt], params)
        done = {}
        with torch.inference_mode():
            while self.engine.has_unfinished_requests():
                result = self.engine.step_modern()
                self.steps += 1
                for record in result["finished_request_records"]:
                    request = record.merge()
                    done[request.request_id] = [int(t) for t in request.generated_tokens]
        return [done[i] for i in ids]

    def serve(self, port: int, *, host: str = "127.0.0.1", coordinator_port: Optional[int] = None,
              client: Optional[Callable[[str], Any]] = None, replicas: int = 1) -> Any:
        """megatron's inference coordinator and OpenAI-style HTTP server at
        ``http://host:port`` (rank 0), the engine loop on every rank. Without ``client`` it
        serves until interrupted, as Megatron-LM's run_dynamic_text_generation_server.py does;
        with one, rank 0 calls ``client(base_url)`` in a thread once serving, then every rank
        pauses and stops its engine through the coordinator (megatron's protocol) and rank 0
        stops the coordinator and server; returns what ``client`` returned (None elsewhere)."""
        missing = [p for p in SERVER_PACKAGES if not compat.importable(p)]
        if missing:
            raise ImportError(f"megatron's dynamic text generation server needs {missing}: "
                              "pip install 'megatron-spd[megatron-server]'")
        with torch.inference_mode():
            return asyncio.run(self._serve(port, host, coordinator_port, client, replicas))

    async def _serve(self, port, host, coordinator_port, client, replicas) -> Any:
        from megatron.core.inference.inference_client import InferenceClient
        from megatron.core.inference.text_generation_server.dynamic_text_gen_server import (
            start_text_gen_server, stop_text_gen_server)

        engine, state = self.engine, self._api.EngineState
        rank0 = dist.get_rank() == 0
        address = await engine.start_listening_to_data_parallel_coordinator(
            inference_coordinator_port=coordinator_port, launch_inference_coordinator=True,
            hostname=host)
        try:
            if rank0:
                with _forked_server_workers():
                    start_text_gen_server(coordinator_addr=address, tokenizer=self.tokenizer,
                                          rank=0, server_port=port, parsers=[],
                                          num_replicas=replicas, hostname=host)
            if client is None:
                await engine.engine_loop_task
                return None
            answer = control = None
            if rank0:  # the stop protocol runs even if the client fails: the other ranks wait
                control = InferenceClient(address)
                control.start()
                try:
                    url = f"http://{host}:{port}"
                    answer = await asyncio.to_thread(_when_healthy, client, url)
                finally:
                    control.pause_engines()
            await engine.wait_until(state.PAUSED)
            if rank0:
                control.stop_engines()
            await engine.wait_until(state.STOPPED)
            if rank0:
                control.shutdown_coordinator()
                control.stop()
            return answer
        finally:
            if rank0:
                stop_text_gen_server()
                coordinator = getattr(engine, "inference_coordinator_process", None)
                if coordinator is not None:
                    coordinator.join(timeout=_STARTUP_S)
                    if coordinator.is_alive():
                        coordinator.terminate()
            self.close()


@contextlib.contextmanager
def _forked_server_workers() -> Iterator[None]:
    """megatron's server binds its socket once and hands it to its worker processes as a file
    descriptor (text_generation_server.py:168-198, ``mp.Process`` with ``fd://``), which only a
    forked child inherits. In a process whose default start method is spawn (e.g. one started by
    torch.multiprocessing's spawn, as torchrun does not) the workers would find no socket; so
    that module's ``mp`` is the fork context for the call."""
    from megatron.core.inference.text_generation_server.dynamic_text_gen_server import (
        text_generation_server as server)

    default = server.mp
    server.mp = multiprocessing.get_context("fork")
    try:
        yield
    finally:
        server.mp = default


_STARTUP_S = 120  # the server processes import quart and megatron-core: seconds on a busy CPU


def _when_healthy(client: Callable[[str], Any], url: str) -> Any:
    """``client(url)`` once megatron's server answers ``GET /v1/health`` with 200 (its
    processes start in the background, start_text_gen_server returns at once)."""
    deadline = time.monotonic() + _STARTUP_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v1/health", timeout=5) as answer:
                if answer.status == 200:
                    return client(url)
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"megatron's text generation server at {url} did not answer "
                               f"/v1/health within {_STARTUP_S} s")
        time.sleep(0.2)


def build_engine(loaded: LoadedModel, *, max_sequence_length: Optional[int] = None,
                 max_requests: int = 4, max_tokens: Optional[int] = None,
                 block_size_tokens: int = 16, chat_template: Optional[str] = None
                 ) -> DynamicEngine:
    """megatron-core's dynamic engine around a model from ``open_model`` (every TP rank calls
    it, after ``distributed.init``). The paged KV cache holds ``max_requests`` sequences of
    ``max_sequence_length`` tokens (default: the model's context); a step processes at most
    ``max_tokens`` tokens (default: one full sequence; rounded up to megatron's multiple of 64). ``chat_template`` (Jinja) serves
    ``/v1/chat/completions``; default: the one in the tokenizer's tokenizer_config.json."""
    api = mcore_versions.dynamic_inference()
    compat.apply_dynamic_inference()
    model = loaded.model.eval()
    tcfg = model.config
    seq = max_sequence_length or loaded.config.max_seq_length
    # the KV blocks for max_requests full sequences (+1: the context reserves a dummy block)
    blocks = max_requests * math.ceil(seq / block_size_tokens) + 1
    heads = tcfg.num_query_groups or tcfg.num_attention_heads
    head_dim = tcfg.kv_channels or tcfg.hidden_size // tcfg.num_attention_heads
    block_bytes = (2 * tcfg.num_layers * block_size_tokens * heads * head_dim
                   * torch.empty((), dtype=tcfg.params_dtype).element_size())
    icfg = api.InferenceConfig(
        max_sequence_length=seq, buffer_size_gb=blocks * block_bytes / 1024 ** 3,
        block_size_tokens=block_size_tokens, max_requests=max_requests,
        # a step's token count is padded to a multiple of 64 (dynamic_context.py:251, :2268), so
        # a smaller budget would cut the padded batch (last_token_logits asserts, :2823)
        max_tokens=api.DynamicInferenceContext.round_up_tokens(max_tokens or seq),
        unified_memory_level=0, num_cuda_graphs=None,
        use_flashinfer_fused_rope=False)
    context = api.DynamicInferenceContext(model_config=tcfg, inference_config=icfg)
    wrapper = api.GPTInferenceWrapper(model, context)
    tokenizer = ServerTokenizer(loaded.tokenizer, chat_template or chat_template_of(loaded.tokenizer))
    controller = api.TextGenerationController(wrapper, tokenizer)
    return DynamicEngine(api.DynamicInferenceEngine(controller, context), tokenizer, api)
