"""The one logging set-up of every command: the package's modules log through
``logging.getLogger(__name__)`` (the ``megatron_spd`` tree) and never configure logging; the
command's ``entry`` (common.py) calls ``setup`` once.

- Lines are plain (``%(message)s``) and go to standard output, where the ad hoc prints that
  logging replaced wrote them, so a user sees the same lines as before.
- Global rank 0 only (every rank of a torchrun job runs the same code and would say the same);
  ``--log-all-ranks`` (every parser has it) lets every rank log, each line prefixed ``[rank N]``.
- Through ``tqdm.write``: a line written while a progress bar is on screen (the fine-tune bar, on
  standard error) clears the bar, prints, and redraws it, so bars and lines do not garble.

Only the ``megatron_spd`` logger gets the handler, at INFO: other libraries' loggers (megatron-core
logs at INFO) stay as they are.
"""
from __future__ import annotations

import logging
import os
import sys

from tqdm import tqdm

PACKAGE = "megatron_spd"


def global_rank() -> int:
    """torch.distributed's rank while a process group exists, else torchrun's ``RANK`` (0 for a
    plain process): the ranks log before ``init`` and after ``shutdown`` too. torch is not
    imported to ask (a command's parser runs before it is loaded)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


class RankFilter(logging.Filter):
    """Global rank 0's records only, or (``all_ranks``) everyone's, marked with the rank."""

    def __init__(self, all_ranks: bool = False) -> None:
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        record.rank_prefix = f"[rank {rank}] " if self.all_ranks else ""
        return self.all_ranks or rank == 0


class TqdmHandler(logging.Handler):
    """Writes each line with ``tqdm.write`` to the standard output of the moment (looked up per
    line: a test's captured stdout, a redirected one), around any progress bar on screen."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def setup(all_ranks: bool = False) -> logging.Logger:
    """Give the ``megatron_spd`` logger its one handler (again: replaced, not added, so a process
    that runs several commands, e.g. tests, logs each line once)."""
    logger = logging.getLogger(PACKAGE)
    for h in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
        logger.removeHandler(h)
    handler = TqdmHandler()
    handler.addFilter(RankFilter(all_ranks))
    handler.setFormatter(logging.Formatter("%(rank_prefix)s%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger
