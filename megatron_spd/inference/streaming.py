"""Streaming generated text on rank 0: a prompt's tokens, as they come, turned into new text."""
from __future__ import annotations

from typing import Callable

StreamCallback = Callable[[int, str], None]  # (prompt index, new text), rank 0 only


class TextStream:
    """Turns a prompt's growing token list into new text pieces, holding back an incomplete
    multi-byte character (the tokenizer decodes it as U+FFFD until its last byte arrives)."""

    def __init__(self, tokenizer, callback: StreamCallback) -> None:
        self.tokenizer, self.callback = tokenizer, callback
        self.ids: dict[int, list[int]] = {}
        self.sent: dict[int, int] = {}

    def __call__(self, index: int, token: int) -> None:
        ids = self.ids.setdefault(index, [])
        ids.append(token)
        text = self.tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            return
        done = self.sent.get(index, 0)
        if len(text) > done:
            self.callback(index, text[done:])
            self.sent[index] = len(text)
