"""One tokenizer interface over the three places a LLaMA-family model keeps its vocabulary.

A Hugging Face directory has ``tokenizer.json`` (the ``tokenizers`` library) or a sentencepiece
``tokenizer.model``; a GGUF file embeds its vocabulary in metadata. Every tool (perplexity,
zero-shot scoring, generation) must tokenize exactly as the source model did, including whether a
BOS token is prepended, so ``add_bos`` records the source model's default and ``encode`` applies
it unless the caller overrides it. ``ref()`` is the JSON a checkpoint stores; ``save(dir)`` copies
the vocabulary files next to it so a checkpoint never depends on where its source lived.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from ..errors import SPDError
from ..files import read_json_object

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class TokenizerError(SPDError, FileNotFoundError):
    """No usable tokenizer where one was expected; the message says where to put one."""


class Tokenizer:
    """Common interface: ``encode``/``decode``, ids of BOS/EOS, the model's BOS default."""

    kind = "abstract"
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    add_bos: bool

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        ids = self._encode(text)
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos:
            if self.bos_id is None:
                raise ValueError("add_bos=True but this tokenizer defines no BOS token")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _meta(self) -> dict[str, Any]:
        return {"bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": self.add_bos,
                "vocab_size": self.vocab_size}

    def ref(self) -> dict[str, Any]:
        """JSON-able reference: the kind, where the files are, and the BOS/EOS conventions."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> dict[str, Any]:
        """Write the vocabulary file(s) into ``directory``; returns a ref with a relative path."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (tokenizer.json). Special tokens come from the source model's
    own conventions, never from the post-processor, so encode(add_bos=False) is plain text."""

    kind = "hf"

    def __init__(self, tok, *, bos_id: Optional[int], eos_id: Optional[int], add_bos: bool,
                 path: Optional[Path] = None, kind: str = "hf") -> None:
        self.tok, self.kind = tok, kind
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.path = path

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def ref(self) -> dict[str, Any]:
        if self.path is None:
            raise TokenizerError("this tokenizer was built in memory; save() it to a directory "
                                 "to get a reference")
        return {"kind": self.kind, "path": str(self.path), **self._meta()}

    def save(self, directory: str | Path) -> dict[str, Any]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        return {"kind": "hf", "path": "tokenizer.json", **self._meta()}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model`` (LLaMA-1/2, Mistral): BOS by default unless the HF
    ``tokenizer_config.json`` says otherwise."""

    kind = "sentencepiece"

    def __init__(self, path: Path, *, add_bos: Optional[bool] = None,
                 bos_id: Optional[int] = None, eos_id: Optional[int] = None) -> None:
        import sentencepiece

        self.path = Path(path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = bos_id if bos_id is not None else _none_if_negative(self.sp.bos_id())
        self.eos_id = eos_id if eos_id is not None else _none_if_negative(self.sp.eos_id())
        self.add_bos = (self.bos_id is not None) if add_bos is None else add_bos

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def ref(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), **self._meta()}

    def save(self, directory: str | Path) -> dict[str, Any]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, directory / "tokenizer.model")
        return {"kind": self.kind, "path": "tokenizer.model", **self._meta()}


def _none_if_negative(i: int) -> Optional[int]:
    return None if i is None or i < 0 else int(i)


# ----- Hugging Face directories ----------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json_object(path, "a JSON object (re-download or re-convert the model)",
                            TokenizerError)


def _token_content(tok: Any) -> Optional[str]:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _hf_special_ids(directory: Path, lookup) -> tuple[Optional[int], Optional[int], Optional[bool]]:
    """BOS/EOS ids and the add_bos default from tokenizer_config.json, then config.json."""
    tcfg = _read_json(directory / "tokenizer_config.json")
    mcfg = _read_json(directory / "config.json")
    ids = []
    for which in ("bos", "eos"):
        token_id = None
        content = _token_content(tcfg.get(f"{which}_token"))
        if content is not None:
            token_id = lookup(content)
        if token_id is None:
            cid = mcfg.get(f"{which}_token_id")
            token_id = cid[0] if isinstance(cid, list) and cid else cid
        ids.append(token_id)
    return ids[0], ids[1], tcfg.get("add_bos_token")


def hf_tokenizer_from_dir(directory: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory (tokenizer.json preferred)."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return hf_json_tokenizer(directory / "tokenizer.json")
    if (directory / "tokenizer.model").is_file():
        return sentencepiece_tokenizer(directory / "tokenizer.model")
    raise TokenizerError(
        f"no tokenizer in {directory}: expected tokenizer.json or tokenizer.model; copy the "
        "source model's tokenizer files into it (or pass --tokenizer PATH)")


def hf_json_tokenizer(path: str | Path) -> HFTokenizer:
    from tokenizers import Tokenizer as TkTokenizer

    path = Path(path)
    tok = TkTokenizer.from_file(str(path))
    bos_id, eos_id, add_bos = _hf_special_ids(path.parent, tok.token_to_id)
    if add_bos is None:  # no tokenizer_config.json: does the post-processor prepend BOS?
        with_special = tok.encode("a", add_special_tokens=True).ids
        add_bos = bool(with_special) and bos_id is not None and with_special[0] == bos_id
    return HFTokenizer(tok, bos_id=bos_id, eos_id=eos_id, add_bos=bool(add_bos), path=path)


def sentencepiece_tokenizer(path: str | Path) -> SentencePieceTokenizer:
    path = Path(path)
    tcfg = _read_json(path.parent / "tokenizer_config.json")
    return SentencePieceTokenizer(path, add_bos=tcfg.get("add_bos_token"))


# ----- GGUF-embedded vocabularies -------------------------------------------------------------

#: The split regexes of the families' own tokenizer.json files (Llama-3's and Qwen2's, the latter
#: also used by Qwen2.5 and Qwen3), keyed by the ``tokenizer.ggml.pre`` names llama.cpp gives them.
GGUF_SPLIT_REGEXES = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


# llama.cpp's ``tokenizer.ggml.pre`` names -> the pre-tokenizer the source tokenizer.json used.
def _gguf_pre_tokenizer(pre: str):
    """Like the families' tokenizer.json: a regex split, then byte-level mapping without its own
    regex. llama.cpp applies no Unicode normaliser for these (Qwen2's tokenizer.json has NFC;
    a GGUF file carries none, so we follow llama.cpp)."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("gpt-2", "gpt2", "default"):
        return byte_level
    if pre in GGUF_SPLIT_REGEXES:
        return pt.Sequence([pt.Split(Regex(GGUF_SPLIT_REGEXES[pre]), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise TokenizerError(
        f"GGUF tokenizer pre-tokenizer {pre!r} is not supported (supported: smollm, starcoder, "
        f"refact, gpt-2, default, {', '.join(GGUF_SPLIT_REGEXES)}); convert from the Hugging Face "
        "directory instead (--hf DIR), whose tokenizer.json carries the exact pre-tokenizer")


def gguf_tokenizer(reader_or_path) -> HFTokenizer:
    """Rebuild a GGUF file's byte-level BPE vocabulary with the ``tokenizers`` library."""
    import gguf
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as TkTokenizer

    reader = reader_or_path if isinstance(reader_or_path, gguf.GGUFReader) \
        else gguf.GGUFReader(str(reader_or_path))
    path = Path(reader.data.filename) if hasattr(reader.data, "filename") else None
    f = reader.fields

    def value(key: str, default: Any = None) -> Any:
        return f[key].contents() if key in f else default

    model = value("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{path}: this GGUF file has no embedded tokenizer; pass the "
                             "source model's tokenizer.json or tokenizer.model (--tokenizer PATH)")
    if model != "gpt2":
        raise TokenizerError(
            f"{path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, "
            "'gpt2'); convert from the Hugging Face directory (--hf DIR) instead")
    tokens = value("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in value("tokenizer.ggml.merges", [])]
    types = value("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = TkTokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _gguf_pre_tokenizer(value("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    # llama.cpp token types: 3 = control (special), 4 = user-defined (added, not special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == 4])
    bos = value("tokenizer.ggml.bos_token_id")
    eos = value("tokenizer.ggml.eos_token_id")
    add_bos = bool(value("tokenizer.ggml.add_bos_token", False))
    return HFTokenizer(tok, bos_id=None if bos is None else int(bos),
                       eos_id=None if eos is None else int(eos), add_bos=add_bos,
                       path=path, kind="gguf")


# ----- references ----------------------------------------------------------------------------

def load_tokenizer(ref_or_path: Any, base_dir: str | Path | None = None) -> Tokenizer:
    """A Tokenizer from a ref (``Tokenizer.ref()``/``save()``), a tokenizer file, a Hugging Face
    directory or a .gguf file. Relative ref paths are resolved against ``base_dir``."""
    if isinstance(ref_or_path, Tokenizer):
        return ref_or_path
    if isinstance(ref_or_path, dict):
        return _from_ref(ref_or_path, base_dir)
    if ref_or_path is None:
        raise TokenizerError("no tokenizer given; pass a tokenizer.json, tokenizer.model, a "
                             "Hugging Face model directory or a .gguf file")
    path = Path(ref_or_path)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if path.is_dir():
        return hf_tokenizer_from_dir(path)
    if not path.exists():
        raise TokenizerError(f"tokenizer {path} does not exist; pass an existing tokenizer.json, "
                             "tokenizer.model, Hugging Face directory or .gguf file")
    if path.suffix == ".gguf":
        return gguf_tokenizer(path)
    if path.suffix == ".model":
        return sentencepiece_tokenizer(path)
    if path.suffix == ".json":
        return hf_json_tokenizer(path)
    raise TokenizerError(f"{path}: unknown tokenizer file type; expected tokenizer.json, "
                         "tokenizer.model or a .gguf file")


def _from_ref(ref: dict[str, Any], base_dir: str | Path | None) -> Tokenizer:
    kind, rel = ref.get("kind"), ref.get("path")
    if kind not in ("hf", "sentencepiece", "gguf") or not rel:
        raise TokenizerError(f"bad tokenizer reference {ref!r}: needs 'kind' (hf | sentencepiece "
                             "| gguf) and 'path'")
    path = Path(rel)
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer file {path} is missing (the checkpoint's tokenizer reference points to "
            "it); copy the source model's tokenizer file there, or pass it explicitly "
            "(--tokenizer PATH, or tokenizer=PATH to open_model/load_weights)")
    tok = gguf_tokenizer(path) if kind == "gguf" else (
        sentencepiece_tokenizer(path) if kind == "sentencepiece" else hf_json_tokenizer(path))
    for key in ("bos_id", "eos_id", "add_bos"):  # the ref records the source model's conventions
        if key in ref:
            setattr(tok, key, ref[key])
    if "vocab_size" in ref and ref["vocab_size"] != tok.vocab_size:
        raise TokenizerError(f"tokenizer {path} has {tok.vocab_size} tokens but the reference "
                             f"says {ref['vocab_size']}; the file was replaced by another model's")
    return tok
