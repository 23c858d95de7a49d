"""What several test modules share: the fp32 exactness tolerances, the tiny LLaMA-style model of
the exactness tests, and a word-level tokenizer with a learnable corpus for the tools' tests.

Tolerances (fp32). Gradients of a weighted-logit loss reach ~20, so gradient tolerances scale
with each tensor's largest entry m = max(1, max|g|):
- the same function by the same code at another TP degree (only the reduction order differs):
  logits atol = rtol = 1e-5 (LOGIT_TOL); gradients atol 1e-6 * m, rtol 1e-4 (GRAD_TOL)
  (measured: logits ~1e-7, gradients ~3e-7 * m);
- the same function by different formulas (megatron against tests/reference.py, SPD with G=1
  against the dense layer, megatron against transformers): logits atol 2e-5, rtol 1e-5
  (CROSS_PATH_LOGIT_TOL); gradients atol 4e-6 * m, rtol 1e-4 (CROSS_PATH_GRAD_TOL).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from megatron_spd.core.config import ModelConfig

LOGIT_TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = 1e-6
CROSS_PATH_LOGIT_TOL = dict(atol=2e-5, rtol=1e-5)
CROSS_PATH_GRAD_TOL = 4e-6
GRAD_RTOL = 1e-4

# GQA (8 query heads, 4 KV heads) and three blocks: room for G=2 and G=4 plans with dense blocks
LLAMA = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                    ffn_hidden_size=128, vocab_size=96, max_seq_length=32)

WORDS = 100  # the word tokenizer's words w0..w99; id 0 is <eos>


def assert_grads_close(actual: dict, expected: dict, tol: float, what: str) -> None:
    """Every gradient in ``expected`` (same keys in ``actual``) within ``tol * m``, rtol 1e-4."""
    assert actual.keys() == expected.keys(), what
    for k, want in expected.items():
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(actual[k], want, atol=tol * scale, rtol=GRAD_RTOL,
                                   msg=lambda m, k=k: f"{what} grad {k}: {m}")


def word_tokenizer():
    """Whitespace-split words w0..w99 (ids 1..100), <eos> = 0 for anything else; no BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_spd.data.tokenizer import HFTokenizer

    vocab = {"<eos>": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return HFTokenizer(tok, bos_id=None, eos_id=0, add_bos=False)


def write_bigram_corpus(path: Path, docs: int = 120, words: int = 40) -> Path:
    """Blank-line separated documents from a random bigram chain over the tokenizer's words
    (each word has three successors): learnable, and the same text for the same arguments."""
    rng = random.Random(0)
    nxt = {i: [rng.randrange(WORDS) for _ in range(3)] for i in range(WORDS)}
    out = []
    for _ in range(docs):
        w, doc = rng.randrange(WORDS), []
        for _ in range(words):
            doc.append(f"w{w}")
            w = rng.choice(nxt[w])
        out.append(" ".join(doc))
    path.write_text("\n\n".join(out) + "\n")
    return path
