"""The one Tokenizer interface over sentencepiece, HF tokenizer.json and GGUF vocabularies:
BOS/EOS as the source model defines them, refs that survive a save, clear errors when missing."""
from __future__ import annotations

import json

import pytest

from megatron_spd.data.tokenizer import (SentencePieceTokenizer, TokenizerError, hf_tokenizer_from_dir,
                                    load_tokenizer)

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs."


def _train_sentencepiece(path):
    import sentencepiece as spm

    corpus = path / "corpus.txt"
    corpus.write_text("\n".join([TEXT, TEXT.lower(), "How vexingly quick daft zebras jump!"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(path / "tokenizer"),
                                   vocab_size=60, model_type="bpe", bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    return path / "tokenizer.model"


def test_sentencepiece_bos_default_override_and_ref(tmp_path):
    model = _train_sentencepiece(tmp_path)
    tok = load_tokenizer(model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 60)
    ids = tok.encode(TEXT)
    assert ids[0] == 1 and tok.encode(TEXT, add_bos=False) == ids[1:]
    assert tok.decode(ids[1:]) == TEXT
    # the HF directory's tokenizer_config.json decides the default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert hf_tokenizer_from_dir(tmp_path).add_bos is False
    # save + ref: the copy behaves like the original, conventions included
    ref = tok.save(tmp_path / "ckpt")
    assert ref["path"] == "tokenizer.model" and ref["kind"] == "sentencepiece"
    back = load_tokenizer(json.loads(json.dumps(ref)), base_dir=tmp_path / "ckpt")
    assert back.encode(TEXT) == ids and back.add_bos is True


def test_hf_json_bos_from_post_processor_and_errors(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    tok = load_tokenizer(tmp_path)  # no tokenizer_config.json: the post-processor decides
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    assert tok.encode("hello world") == [1, 3, 4] and tok.encode("hello", add_bos=False) == [3]
    assert tok.decode([3, 4]) == "hello world"
    ref = tok.save(tmp_path / "copy")
    assert load_tokenizer(ref, base_dir=tmp_path / "copy").encode("world hello") == [1, 4, 3]

    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="expected tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="is missing"):
        load_tokenizer({**ref, "path": "gone.json"}, base_dir=tmp_path / "copy")
    with pytest.raises(TokenizerError, match="another model"):
        load_tokenizer({**ref, "vocab_size": 7}, base_dir=tmp_path / "copy")


@pytest.mark.real_model
def test_gguf_vocabulary_matches_transformers_converter():
    """SmolLM2's embedded BPE, rebuilt here, tokenizes like HF transformers' own GGUF converter."""
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    from megatron_spd.data.texts import load_texts
    from megatron_spd.data.defaults import default_gguf_path

    path = default_gguf_path()
    tok = load_tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    arch, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
    ref, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    texts = load_texts(split="eval")[:40] + [
        "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n", "  tabs\tand   spaces, émigré ∑ 🙂"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids, text[:60]
        assert tok.decode(ids) == text
