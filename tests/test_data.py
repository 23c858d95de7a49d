"""megatron_spd.data.texts: bundled corpus, local files through `datasets`, splits, token blocks.

No model is needed; a byte-level toy tokenizer makes token counts predictable.
"""
from __future__ import annotations

import json

import pytest
import torch

from megatron_spd.data import texts as data
from toy_tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def corpus():
    return data.load_texts()


def test_default_corpus_is_deduplicated_wikipedia(corpus):
    assert len(corpus) > 2000
    assert len(set(corpus)) == len(corpus)
    assert all(t == t.strip() and t for t in corpus)


def test_splits_partition_the_documents_in_order(corpus):
    parts = {s: data.load_texts(split=s) for s in ("eval", "calib", "train")}
    assert parts["eval"] + parts["calib"] + parts["train"] == corpus
    assert corpus[:len(parts["eval"])] == parts["eval"]  # "first N tokens" is held-out text
    assert not set(parts["calib"]) & set(parts["eval"])
    assert not set(parts["train"]) & (set(parts["eval"]) | set(parts["calib"]))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.load_texts(split="test")


def test_local_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond\n\n\nthird\n")
    assert data.load_texts(txt) == ["first paragraph\nstill first", "second", "third"]

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"body": f"doc {i}", "n": i}) + "\n" for i in range(10)))
    assert data.load_texts(jsonl, text_field="body") == [f"doc {i}" for i in range(10)]
    assert data.load_texts(jsonl, text_field="body", split="eval") == ["doc 0", "doc 1"]
    with pytest.raises(ValueError, match="--text-field"):
        data.load_texts(jsonl)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y", "z"]}), tmp_path / "a.parquet")
    assert data.load_texts(tmp_path / "a.parquet") == ["x y", "z"]

    with pytest.raises(ValueError, match="does not exist"):
        data.load_texts(tmp_path / "missing.txt")
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="unsupported extension"):
        data.load_texts(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="is empty"):
        data.load_texts(tmp_path / "a.parquet", split="eval")  # 2 docs: 20 % rounds to none


def test_token_stream_joins_documents_without_bos():
    tok = ByteTokenizer(add_bos=True)  # the stream never inserts BOS, whatever the default
    s = data.token_stream(tok, ["ab", "c", "de"])
    assert s.dtype == torch.long
    assert tok.decode(s.tolist()) == "ab\n\nc\n\nde"
    assert data.token_stream(tok, ["ab", "c", "de"], 4).tolist() == s[:4].tolist()
    with pytest.raises(ValueError, match="only 9 tokens but 10"):
        data.token_stream(tok, ["ab", "c", "de"], 10)


def test_calibration_batches_are_deterministic_blocks_of_the_split(corpus):
    tok = ByteTokenizer()
    x = data.calibration_batches(tok, 3, 64)
    assert x.shape == (3, 64) and x.dtype == torch.long
    assert torch.equal(x, data.calibration_batches(tok, 3, 64))
    calib = data.token_stream(tok, data.load_texts(split="calib"), 3 * 64)
    assert torch.equal(x.reshape(-1), calib)
    ev = data.calibration_batches(tok, 3, 64, split="eval")
    assert torch.equal(ev.reshape(-1), data.token_stream(tok, corpus, 3 * 64))
    assert not torch.equal(ev, x)
    with pytest.raises(ValueError, match="do not fit in split 'eval'"):
        data.calibration_batches(tok, 10_000, 4096, split="eval")
    with pytest.raises(ValueError, match="n_samples >= 1"):
        data.calibration_batches(tok, 0, 64)
