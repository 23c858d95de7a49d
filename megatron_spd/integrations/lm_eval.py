"""lm-evaluation-harness model backend ``megatron-spd``: any lm-eval task on an SPD model.

Registration: lm-eval 0.4.13 has no entry-point group for models (its registry accepts lazy
``"module:Class"`` placeholders, but only ``lm_eval.models.MODEL_MAPPING`` fills it), so this
module registers the backend with ``lm_eval.api.registry.register_model`` when it is imported.
``megatron_spd.cli.lm_eval_spd`` (``tools/lm_eval_spd.py``, console script
``megatron-spd-lm-eval``) imports it and then runs lm-eval's own command line unchanged::

    python tools/lm_eval_spd.py --model megatron-spd --model_args ckpt=CK,plan=PLAN.json \\
        --tasks spd_paper --include_path megatron_spd/integrations/lm_eval_tasks
    torchrun --nproc-per-node 3 tools/lm_eval_spd.py --model megatron-spd \\
        --model_args ckpt=CK,plan=PLAN.json ...

From Python: ``import megatron_spd.integrations.lm_eval`` then
``lm_eval.simple_evaluate(model="megatron-spd", model_args=...)``.

Model arguments (``--model_args``): ``ckpt`` (any source ``open_model`` reads; default: the
bundled SmolLM2-135M-Instruct), ``plan`` (SPD plan JSON; default: the source's own), ``tp``
(default: the torchrun world size), ``tokenizer``, ``verify``, ``batch_tokens`` (padded tokens per
scoring forward), ``max_length`` (default: the model's context), ``add_bos`` (default False, as
lm-eval's HF backend). lm-eval's ``--batch_size`` is the generation batch.

Scoring reuses the project's own inference path, no second forward: ``loglikelihood`` is
lm-eval's ``TemplateLM`` request encoding (its ``_encode_pair``, its empty-context prefix token)
into ``evaluate.loglik.loglikelihoods`` (shared-context KV reuse for the choices of one item,
length-sorted batches otherwise); ``loglikelihood_rolling`` is lm-eval's own rolling windows
(``get_rolling_token_windows``) scored the same way; ``generate_until`` is
``inference.generate_ids`` (KV cache, batched, greedy or sampled), cut at lm-eval's stop strings.

Tensor parallel: every rank builds the same requests and runs them (the ranks hold one model
between them); following lm-eval's convention for TP launchers, every rank reports ``rank == 0``
and ``world_size == 1``, and lm-eval aggregates and writes on ``LOCAL_RANK`` 0 only. Data
parallel (world size > TP) is refused: lm-eval would shard the documents over every rank.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..errors import SPDError


class MissingExtraError(SPDError, ImportError):
    """An optional dependency of an integration is not installed."""


try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
except ImportError:
    raise MissingExtraError("lm-eval is not installed; install the extra: "
                            "pip install -e '.[lm-eval]'") from None

from tqdm import tqdm

from ..parallel import distributed
from ..evaluate.loglik import DEFAULT_BATCH_TOKENS, loglikelihoods
from ..inference import GenerationConfig, generate_ids

NAME = "megatron-spd"


@register_model(NAME)
class SPDLM(TemplateLM):
    """An SPD (or dense) megatron-core model as an lm-eval ``LM``; see the module docstring."""

    def __init__(self, ckpt: Optional[str] = None, plan: Optional[str] = None,
                 tp: Optional[int] = None, tokenizer: Optional[str] = None, verify: bool = True,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, max_length: Optional[int] = None,
                 add_bos: bool = False, batch_size: Any = None, loaded: Any = None,
                 **harness_args: Any) -> None:
        """``loaded``: an already open ``loading.open_model.LoadedModel`` (from Python, e.g.
        ``simple_evaluate(model=SPDLM(loaded=lm))``) instead of opening ``ckpt``.
        ``harness_args``: what lm-eval passes every backend (device, max_batch_size, ...); the
        device follows ``distributed.init`` (the local rank's GPU when there is one)."""
        super().__init__()
        from ..loading.open_model import open_model

        distributed.init(tp)
        if distributed.dp_rank_size()[1] > 1:
            raise SPDError(f"{NAME}: TP={distributed.tp_size()} is smaller than the world size; "
                           "launch torchrun with --nproc-per-node equal to tp (data parallel "
                           "over lm-eval documents is not supported)")
        if not distributed.is_rank0():
            logging.getLogger("lm_eval").setLevel(logging.WARNING)
        self.lm = loaded or open_model(ckpt, plan=plan, tokenizer=tokenizer, verify=verify)
        self.model = self.lm.model
        self.model.eval()
        self.tokenizer = self.lm.tokenizer
        self.ckpt, self.add_bos = ckpt, bool(add_bos)
        self.batch_tokens = int(batch_tokens)
        self.max_length = int(max_length or self.model.max_sequence_length)
        if not 2 <= self.max_length <= int(self.model.max_sequence_length):
            raise SPDError(f"{NAME}: max_length={max_length} must be in [2, the model's context "
                           f"{self.model.max_sequence_length}]")
        auto = batch_size in (None, "auto") or str(batch_size).startswith("auto")
        self.batch_size = GenerationConfig.max_batch_size if auto else int(batch_size)

    # ----- what TemplateLM asks of a backend ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context becomes: BOS, else EOS (lm-eval's HF backend rule)."""
        bos = self.tokenizer.bos_id
        return self.eot_token_id if bos is None else bos

    @property
    def tokenizer_name(self) -> str:
        return f"{NAME}:{self.ckpt or 'default'}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   **kwargs: Any) -> list[int]:
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=add)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results ``config``."""
        return {"ckpt": self.ckpt or "default (SmolLM2-135M-Instruct)",
                "plan": self.lm.plan.to_dict(), "spd_ratio": self.lm.plan.spd_ratio,
                "tp": distributed.tp_size()}

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        show = not disable_tqdm and distributed.is_rank0()
        out = loglikelihoods(self.model, [(ctx, cont) for _, ctx, cont in requests],
                             max_length=self.max_length, batch_tokens=self.batch_tokens,
                             desc="megatron-spd loglikelihood" if show else None)
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm
                                     or not distributed.is_rank0())

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each string scored whole in lm-eval's disjoint rolling windows of ``max_length``
        (the first token predicted from ``prefix_token_id``); all windows of all strings go
        through one ``loglikelihoods`` call, so they batch together."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append((None,) + lm_utils.make_disjoint_window(w))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _holds_stop(self, ids, stops: list[str]) -> bool:
        """Whether the text of the generated ``ids`` holds a stop string (decoded whole: a stop
        string may span tokens, and a token's text can depend on its neighbours)."""
        text = self.tokenizer.decode(list(ids))
        return any(stop in text for stop in stops)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation arguments run as one ``generate_ids`` job (batches
        of ``batch_size``); a row stops decoding once its text holds a stop string (lm-eval's
        ``until`` plus the EOS text) and is cut there. Contexts are left-truncated to leave room
        for ``max_gen_toks``."""
        eos_text = self.tokenizer.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="megatron-spd generate_until",
                   disable=disable_tqdm or not distributed.is_rank0())
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1])
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            new = kwargs["max_gen_toks"]
            room = self.max_length - new
            if room < 1:
                raise SPDError(f"{NAME}: max_gen_toks={new} leaves no room for a prompt in "
                               f"max_length={self.max_length}")
            config = GenerationConfig(
                max_new_tokens=new, temperature=float(kwargs.get("temperature", 0.0)),
                top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                seed=int(kwargs.get("seed", GenerationConfig.seed)),
                max_batch_size=self.batch_size)
            prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id]
                       for i in indices]
            stops = [s for s in until if s]
            results = generate_ids(self.model, prompts, config, eos_id=self.eot_token_id,
                                   stop=lambda _, ids: self._holds_stop(ids, stops))
            for i, res in zip(indices, results):
                text = self.tokenizer.decode(res.tokens)
                for stop in stops:
                    text = text.split(stop)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(indices))
        bar.close()
        return out  # type: ignore[return-value]
