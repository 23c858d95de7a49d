"""Tiny random models of the families people use (Llama-3.x, Qwen2/2.5, Qwen3, Mistral), written
as Hugging Face directories exactly as transformers saves them, with a small tokenizer of the
family's kind, and tiny GGUF files written the way llama.cpp's converter writes them.

Test helpers only (nothing here is imported by the package). Every 1-D parameter (norms, q/k
norms, q/k/v biases, which transformers initialises to 1 or 0) is perturbed so that it matters,
and the matrices use initializer_range 0.08 so that SPD visibly changes the function.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("llama3", "qwen2", "qwen3", "mistral")
VOCAB = 300          # model embeddings; the tokenizers use fewer ids
WINDOW = 16          # Mistral's sliding window, and the sequence length the tests use
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12345 steps, isn't it?",
    "Pack my box with five dozen liquor jugs!\nHow vexingly quick daft zebras jump.",
    "Sphinx of black quartz, judge my vow: we'll see 2026 models they've trained.",
    "  Tabs\tand   spaces; numbers 3.14159 and 42 -- plus émigré café naïve.",
]
TEXTS = CORPUS + ["A brand new sentence with words 987654 and they'd say: 'hello there'."]


def hf_config(family: str, **shape):
    """The family's transformers config class with a tiny shape (G=2 divides heads, KV, ffn);
    ``shape`` overrides fields (vLLM's CPU attention needs head_dim >= 32: tests/test_vllm.py)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-6, initializer_range=0.08)
    common.update(shape)
    if family == "llama3":  # Llama 3.2 style: tied embeddings, llama3 RoPE scaling
        return LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=True,
                           rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192},
                           bos_token_id=0, eos_token_id=1)
    if family == "qwen2":   # q/k/v biases, no output/MLP bias
        return Qwen2Config(**common, rope_theta=1e6, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=2)
    if family == "qwen3":   # QK-norm and head_dim 24 != 64 / 4
        return Qwen3Config(**{"head_dim": 24, **common}, rope_theta=1e6, tie_word_embeddings=True,
                           bos_token_id=0, eos_token_id=2)
    if family == "mistral":  # sliding window, sentencepiece tokenizer
        return MistralConfig(**common, sliding_window=WINDOW, rope_theta=10000.0,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


def hf_model(family: str, seed: int = 0, **shape):
    """A random transformers model of ``family`` (fp32, eager attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(family, **shape)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _byte_level_bpe(family: str):
    """A BPE tokenizer.json like the family's own: Llama-3 (BOS added by a template
    post-processor) or Qwen2 (NFC, no BOS), each with its split regex, trained on CORPUS."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    from megatron_spd.data.tokenizer import GGUF_SPLIT_REGEXES

    llama = family == "llama3"
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if llama else \
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    if not llama:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GGUF_SPLIT_REGEXES["llama-bpe" if llama else "qwen2"]),
                             behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=VOCAB - 10, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if llama:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tcfg = {"bos_token": None, "eos_token": "<|im_end|>"}
    return tok, tcfg


def _sentencepiece(directory: Path) -> None:
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "tokenizer"),
                                   vocab_size=120, model_type="bpe", bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))


def write_hf_dir(family: str, directory: Path, seed: int = 0, **shape):
    """The model as ``save_pretrained`` writes it, plus the family's tokenizer; returns it."""
    model = hf_model(family, seed, **shape)
    model.save_pretrained(directory)
    if family == "mistral":
        _sentencepiece(directory)
    else:
        tok, tcfg = _byte_level_bpe(family)
        tok.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return model


# ----- GGUF files as llama.cpp's convert_hf_to_gguf.py writes them -------------------------------

GGUF_ARCH = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_PRE = {"llama3": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for its interleaved RoPE (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]) \
        .swapaxes(1, 2).reshape(w.shape)


def hf_llama3_divisors(model) -> np.ndarray:
    """What llama.cpp stores as ``rope_freqs``: plain RoPE frequencies divided by the scaled ones,
    taken from transformers' own llama3 RoPE (an implementation independent of ours)."""
    rotary = model.model.rotary_emb
    cfg = model.config
    dim = cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return (plain / rotary.inv_freq.float()).numpy().astype(np.float32)


def write_gguf(family: str, hf_dir: Path, path: Path, *, rope_freqs=None) -> None:
    """F32 GGUF of an HF directory with llama.cpp's metadata keys, tensor names, q/k permutation
    (llama arch only), ``rope_freqs`` (Llama-3 scaling) and embedded byte-level BPE vocabulary."""
    import gguf
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    arch = GGUF_ARCH[family]
    hp = json.loads((hf_dir / "config.json").read_text())
    sd = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch)
    n_layers = hp["num_hidden_layers"]
    w.add_block_count(n_layers)
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    rope = hp.get("rope_parameters") or {}
    w.add_rope_freq_base(rope.get("rope_theta", hp.get("rope_theta")))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "llama":
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"]
                                   // hp["num_attention_heads"])
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tj["added_tokens"] if a["special"]}
    types = [3 if t in special else 1 for t in tokens]
    pad = range(len(tokens), hp["vocab_size"])  # llama.cpp pads the list to the model's vocab
    tokens += [f"[PAD{i}]" for i in pad]
    types += [4] * len(pad)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE[family])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(hp["bos_token_id"])
    w.add_eos_token_id(hp["eos_token_id"])
    w.add_add_bos_token(family == "llama3")
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layers)
    for name, t in sd.items():
        a = t.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            a = llama_cpp_permute(a, hp["num_attention_heads"])
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            a = llama_cpp_permute(a, hp["num_key_value_heads"])
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
