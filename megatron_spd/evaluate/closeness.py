"""Closeness to the dense model: per-token KL divergence, top-1 agreement and perplexity ratio.

Zero-shot accuracy on a few hundred items per task moves in steps of a point with a paired
standard error of one to two points, too coarse to rank recovery methods that differ by a point.
The metric llama.cpp uses to compare a quantized model with its original (``perplexity
--kl-divergence``) resolves such differences on a few thousand tokens: on the same held-out text,
per scored position t, with P the dense model's next-token distribution and Q the other model's,

- ``kl``: mean over t of KL(P_t || Q_t) in nats;
- ``top1``: the fraction of positions where argmax Q_t is the dense argmax;
- ``ppl_ratio``: exp(mean over t of (NLL_Q(t) - NLL_P(t))) = PPL(Q) / PPL(P) on the same tokens,

each with its standard error over tokens (sample standard deviation / sqrt(n), as llama.cpp;
the ratio's by the delta method, ratio x s.e. of the mean log-ratio). Tokens of one window are
correlated, so ``*_se_windows`` adds the s.e. over window means, the more conservative of the two.

The dense side is computed once per text and stored (``Reference``, a safetensors file beside
the baseline's JSON), so a comparison costs one forward pass of the other model, the same pass
that measures its perplexity (``perplexity(on_window=...)``). Storing all V log-probabilities per
token (V = 49,152 for SmolLM2) would take 200 kB per token (llama.cpp stores them all, as 16-bit
numbers); the reference keeps, per token, the dense top-k log-probabilities, the log of the
remaining mass P_rest, and m tokens drawn from the dense distribution restricted to the rest
(seeded, with replacement) with their dense log-probabilities. KL splits exactly into the top-k
part and P_rest times the expectation of log(p_v / q_v) over that restricted distribution, so

    kl = sum_{v in K} p_v log(p_v / q_v) + P_rest * mean_j log(p_{v_j} / q_{v_j})

is an unbiased estimate of KL(P || Q) per token (exact when k = V); the sampling noise is
independent between tokens and is part of ``kl_se``. SmolLM2's next-token distributions have a
long tail (about 11 % of the mass outside the top 64 on Wikipedia), which the top-k alone would
miss: ``kl_lower_bound`` is the KL of the two distributions coarsened to the top-k plus one
"rest" bucket, sum_{v in K} p_v log(p_v / q_v) + P_rest log(P_rest / Q_rest), never above the
exact KL (log-sum inequality). research/closeness_check.py measures both against the exact KL:
at k = m = 64, for SmolLM2 with blocks 20-27 zero-shot SPD, exact 0.1060 +/- 0.0034, estimate
0.1061 +/- 0.0035, bound 0.0877 (17 % low); all 30 blocks: 3.543, 3.544 and 3.183 (10 % low).
``p_rest`` (the mean dense mass outside the top-k) is reported with both. Top-1 and the perplexity ratio are
exact for any k (the reference stores the dense log-probability of each actual next token).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

FORMAT = "megatron-spd dense reference v1"
#: Settings of the scored text that must match between a reference and a comparison.
TEXT_KEYS = ("source", "split", "text_field", "n_tokens", "ctx", "stride")


def reference_path(report_json: str | Path) -> Path:
    """Where the reference of the report ``X.json`` lives: ``X.reference.safetensors``."""
    p = Path(report_json)
    return p.with_name(p.stem + ".reference.safetensors")


@dataclass
class DenseRows:
    """What the reference keeps of the dense distribution at n positions (module docstring):
    top-k ids and log-probs [n, k], log of the rest [n] (-inf when k = V), m ids drawn from the
    rest and their log-probs [n, m] (m = 0 when k = V)."""

    top_ids: torch.Tensor
    top_logp: torch.Tensor
    rest_logp: torch.Tensor
    tail_ids: torch.Tensor
    tail_logp: torch.Tensor


def dense_rows(logits: torch.Tensor, k: int, m: int, generator: torch.Generator) -> DenseRows:
    """``DenseRows`` of next-token logits [n, V], computed in float64; the draws use
    ``generator``."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    k = min(k, logp.shape[-1])
    top_logp, top_ids = logp.topk(k, dim=-1)
    rest_only = logp.scatter(-1, top_ids, -math.inf)
    rest = rest_only.logsumexp(-1)
    if k == logp.shape[-1] or m == 0:
        empty = torch.zeros(logp.shape[0], 0)
        return DenseRows(top_ids, top_logp, rest, empty.long(), empty.double())
    weights = (rest_only - rest[:, None]).exp()  # the distribution restricted to the rest
    weights = torch.where(torch.isinf(rest)[:, None], torch.ones_like(weights), weights)
    tail_ids = torch.multinomial(weights.cpu(), m, replacement=True,
                                 generator=generator).to(logp.device)
    return DenseRows(top_ids, top_logp, rest, tail_ids, logp.gather(-1, tail_ids))


def token_kl(logits: torch.Tensor, d: DenseRows) -> tuple[torch.Tensor, torch.Tensor]:
    """(unbiased KL estimate, top-k lower bound) per position [n] (module docstring) of the model
    with ``logits`` [n, V] against the dense rows ``d``, in float64."""
    logq = torch.log_softmax(logits.double(), dim=-1)
    top_logp, rest_logp = d.top_logp.double(), d.rest_logp.double()
    head = (top_logp.exp() * (top_logp - logq.gather(-1, d.top_ids.long()))).sum(-1)
    q_rest = logq.scatter(-1, d.top_ids.long(), -math.inf).logsumexp(-1)
    empty = torch.isinf(rest_logp)  # k = V, or a dense distribution without tail
    p_rest = torch.where(empty, torch.zeros_like(rest_logp), rest_logp.exp())
    bound = torch.where(empty, torch.zeros_like(rest_logp), p_rest * (rest_logp - q_rest))
    if d.tail_ids.shape[-1] == 0:
        return head + bound, head + bound
    sampled = (d.tail_logp.double() - logq.gather(-1, d.tail_ids.long())).mean(-1)
    return head + p_rest * sampled, head + bound


ROWS = ("targets", "target_logp", "top_ids", "top_logp", "rest_logp", "tail_ids", "tail_logp")


@dataclass
class Reference:
    """The dense model's next-token distributions at each scored position of a text, window by
    window: targets (the actual next tokens), their dense log-probabilities, and the
    ``DenseRows`` fields; ``meta``: the text's settings (TEXT_KEYS), ``topk`` and
    ``tail_samples`` (m). The tail draws are seeded: one text gives one reference."""

    meta: dict[str, Any]
    targets: list[torch.Tensor] = field(default_factory=list)
    target_logp: list[torch.Tensor] = field(default_factory=list)
    top_ids: list[torch.Tensor] = field(default_factory=list)
    top_logp: list[torch.Tensor] = field(default_factory=list)
    rest_logp: list[torch.Tensor] = field(default_factory=list)
    tail_ids: list[torch.Tensor] = field(default_factory=list)
    tail_logp: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.meta.setdefault("tail_samples", self.k)
        self._generator = torch.Generator().manual_seed(0)

    @property
    def k(self) -> int:
        return int(self.meta["topk"])

    def rows(self, w: int) -> DenseRows:
        return DenseRows(self.top_ids[w], self.top_logp[w], self.rest_logp[w], self.tail_ids[w],
                         self.tail_logp[w])

    def record(self, targets: torch.Tensor, logits: torch.Tensor) -> None:
        """``perplexity``'s ``on_window`` hook for the dense model: keep one window's rows."""
        d = dense_rows(logits, self.k, int(self.meta["tail_samples"]), self._generator)
        logp = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None].long())[:, 0]
        self.targets.append(targets.cpu().long())
        self.target_logp.append(logp.cpu())  # float64: the ratio of identical models is 1
        self.top_ids.append(d.top_ids.int().cpu())
        self.top_logp.append(d.top_logp.float().cpu())
        self.rest_logp.append(d.rest_logp.float().cpu())
        self.tail_ids.append(d.tail_ids.int().cpu())
        self.tail_logp.append(d.tail_logp.float().cpu())

    def save(self, path: str | Path) -> None:
        """Write atomically as safetensors (tensors concatenated, window lengths kept)."""
        from safetensors.torch import save_file

        from ..files import atomic_write_with

        tensors = {"window_len": torch.tensor([t.numel() for t in self.targets], dtype=torch.int64)}
        for name in ROWS:
            tensors[name] = torch.cat(getattr(self, name)).contiguous()
        meta = {"format": FORMAT, "meta": json.dumps(self.meta, sort_keys=True)}
        atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != FORMAT:
                    raise InputError(f"{path} is not a megatron-spd dense reference (format "
                                     f"{header.get('format')!r}); make it with tools/evaluate.py "
                                     "--reference-topk K --json X.json")
                t = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{path} is not a readable safetensors dense reference ({e}); "
                             "rebuild it with tools/evaluate.py --reference-topk K") from None
        lens = t["window_len"].tolist()
        ref = cls(json.loads(header["meta"]))
        for name in ROWS:
            setattr(ref, name, list(torch.split(t[name], lens)))
        return ref

    def check_text(self, meta: dict[str, Any], what: str) -> None:
        """InputError naming each setting of the text in which ``meta`` differs from ours."""
        diff = [f"{k} {meta.get(k)!r} vs {self.meta.get(k)!r}" for k in TEXT_KEYS
                if meta.get(k) != self.meta.get(k)]
        if diff:
            raise InputError(f"{what} scores other text than its dense reference ("
                             + "; ".join(diff) + "); use the baseline's perplexity settings")


class Comparison:
    """``perplexity``'s ``on_window`` hook for the compared model: per position KL, top-1
    agreement and NLL difference against a ``Reference``, window by window in its order."""

    def __init__(self, reference: Reference) -> None:
        self.ref = reference
        self.kl: list[torch.Tensor] = []
        self.kl_bound: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []
        self.dnll: list[torch.Tensor] = []

    def __call__(self, targets: torch.Tensor, logits: torch.Tensor) -> None:
        w = len(self.kl)
        if w >= len(self.ref.targets) or not torch.equal(targets.cpu().long(),
                                                         self.ref.targets[w]):
            raise InputError(f"window {w} of the scored text differs from the dense reference's; "
                             "use the baseline's text, tokenizer and perplexity settings")
        r = self.ref
        kl, bound = token_kl(logits, r.rows(w))
        self.kl.append(kl.cpu())
        self.kl_bound.append(bound.cpu())
        self.agree.append((logits.argmax(-1).cpu() == r.top_ids[w][:, 0].long()).double())
        logq = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None].long())[:, 0]
        self.dnll.append(r.target_logp[w].double() - logq.cpu())

    def result(self) -> dict[str, Any]:
        """The summary (``summarize``); an error unless every reference window was compared."""
        if len(self.kl) != len(self.ref.targets):
            raise InputError(f"{len(self.kl)} windows scored but the dense reference has "
                             f"{len(self.ref.targets)}; use the baseline's perplexity settings")
        p_rest = torch.cat(self.ref.rest_logp).double().exp().mean().item()
        bound, bound_se, _ = _mean_se(self.kl_bound)
        return {**summarize(self.kl, self.agree, self.dnll), "kl_lower_bound": bound,
                "kl_lower_bound_se": bound_se, "topk": self.ref.k,
                "tail_samples": int(self.ref.meta["tail_samples"]), "p_rest": p_rest,
                "kl_is": "exact" if p_rest == 0 else "unbiased estimate (top-k + sampled tail)"}

    def per_token(self) -> dict[str, torch.Tensor]:
        """The per-token values behind ``result`` (``kl``, ``top1``, ``dnll``, float64) and each
        token's ``window`` index, for pairing two models on the same tokens (``paired_change``;
        research/recovery.py saves them with safetensors beside a comparison's JSON)."""
        return {"kl": torch.cat(self.kl).double(), "top1": torch.cat(self.agree).double(),
                "dnll": torch.cat(self.dnll).double(),
                "window": torch.cat([torch.full((len(k),), w) for w, k in enumerate(self.kl)])}


def paired_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Model b minus model a on the same tokens, from two ``Comparison.per_token`` results:
    ``kl``, ``top1`` and ``dnll`` (b's NLL minus a's: the log of their perplexity ratio), each
    with its s.e. over tokens and over window means. Each model's own s.e. includes the spread of
    the text both share; pairing removes it, so differences of a few thousandths of a nat show."""
    if a.keys() != b.keys() or not torch.equal(a["window"], b["window"]):
        raise InputError("the two comparisons scored different tokens; compare models scored "
                         "against the same dense reference")
    counts = torch.bincount(a["window"]).tolist()
    out: dict[str, Any] = {"tokens": a["window"].numel(), "windows": len(counts)}
    for name in ("kl", "top1", "dnll"):
        diff = list(torch.split(b[name] - a[name], counts))
        out[name], out[f"{name}_se"], out[f"{name}_se_windows"] = _mean_se(diff)
    return out


def _mean_se(per_window: list[torch.Tensor]) -> tuple[float, float, float]:
    """(mean over tokens, s.e. over tokens, s.e. over window means) of per-token values."""
    x = torch.cat(per_window).double()
    n = x.numel()
    se = x.std().item() / math.sqrt(n) if n > 1 else 0.0
    means = torch.stack([w.double().mean() for w in per_window])
    se_w = means.std().item() / math.sqrt(means.numel()) if means.numel() > 1 else 0.0
    return x.mean().item(), se, se_w


def summarize(kl: list[torch.Tensor], agree: list[torch.Tensor],
              dnll: list[torch.Tensor]) -> dict[str, Any]:
    """kl, top1, ppl_ratio (and ln_ppl_ratio) with ``_se`` over tokens and ``_se_windows`` over
    window means, from per-window per-token values (module docstring)."""
    out: dict[str, Any] = {"tokens": sum(t.numel() for t in kl), "windows": len(kl)}
    for name, values in (("kl", kl), ("top1", agree), ("ln_ppl_ratio", dnll)):
        out[name], out[f"{name}_se"], out[f"{name}_se_windows"] = _mean_se(values)
    ratio = math.exp(out["ln_ppl_ratio"])
    out.update(ppl_ratio=ratio, ppl_ratio_se=ratio * out["ln_ppl_ratio_se"],
               ppl_ratio_se_windows=ratio * out["ln_ppl_ratio_se_windows"])
    return out


def text_meta(cfg) -> dict[str, Any]:
    """The TEXT_KEYS of an ``EvalConfig``'s perplexity text."""
    return {"source": str(cfg.ppl_source) if cfg.ppl_source else None, "split": cfg.ppl_split,
            "text_field": cfg.text_field, "n_tokens": cfg.ppl_tokens,
            "ctx": cfg.ppl_ctx, "stride": cfg.ppl_stride or cfg.ppl_ctx}


def line(c: dict[str, Any]) -> str:
    """One line of a comparison for summaries and progress."""
    return (f"KL {c['kl']:.4f} +/- {c['kl_se']:.4f} nats, top-1 {100 * c['top1']:.2f} +/- "
            f"{100 * c['top1_se']:.2f} %, ppl ratio {c['ppl_ratio']:.4f} +/- "
            f"{c['ppl_ratio_se']:.4f} ({c['tokens']} tokens; top-{c['topk']} + "
            f"{c['tail_samples']} tail samples, dense mass outside the top-k "
            f"{100 * c['p_rest']:.2f} %, top-k lower bound on KL {c['kl_lower_bound']:.4f})")
