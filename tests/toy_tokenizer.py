"""A byte-level toy tokenizer with the megatron_spd Tokenizer interface, for tiny random models.

Ids 0..2 are specials (0 end-of-text, 1 BOS, 2 EOS), byte b is id b + 3, so vocab_size = 259.
"""
from __future__ import annotations

from typing import Optional


class ByteTokenizer:
    vocab_size = 259
    bos_id = 1
    eos_id = 2

    def __init__(self, add_bos: bool = False) -> None:
        self.add_bos = add_bos

    def encode(self, text: str, add_bos: Optional[bool] = None) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []) + ids

    def decode(self, ids) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
