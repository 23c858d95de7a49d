"""``RunConfig``: what every command's entry function shares, in one value the command line
builds once (cli/common.py ``run_config``) instead of eight loose keywords threaded through each:
the model it opens (``source``, ``plan``, ``tokenizer``, ``verify``), the process groups it runs
in (``tp``, ``timeout_s``) and its report (``json_out``, and ``overwrite`` for its ``--out``).
"""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..core.plan import SPDPlan
from ..files import write_report
from ..parallel import distributed
from .open_model import LoadedModel, open_model
from .sources import load_weights


@dataclass(frozen=True)
class RunConfig:
    """One run of a command. ``source``: a checkpoint (ours or Megatron-LM's torch_dist), a
    Hugging Face directory or a .gguf file; None = the bundled SmolLM2-135M-Instruct. ``plan``:
    overrides the source's own. ``tokenizer``/``verify``: how the source is read
    (``open_model``). ``tp``: None = the world size. ``json_out``: the report, written
    atomically on global rank 0. ``overwrite``: an existing output of ours may be replaced."""

    source: str | Path | None = None
    plan: SPDPlan | str | Path | None = None
    tokenizer: str | Path | None = None
    verify: bool = True
    tp: Optional[int] = None
    timeout_s: float = distributed.DEFAULT_TIMEOUT_S
    json_out: str | Path | None = None
    overwrite: bool = False

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def running(self, **kw: Any) -> AbstractContextManager[None]:
        """The process groups at ``tp`` with ``timeout_s`` for the block (``distributed.running``;
        ``kw``: e.g. ``seed``)."""
        return distributed.running(self.tp, timeout_s=self.timeout_s, **kw)

    def open_model(self, **kw: Any) -> LoadedModel:
        """``open_model`` of the source with the plan, tokenizer and verify setting
        (``kw``: e.g. ``sequence_parallel``, or ``plan`` to override)."""
        kw.setdefault("plan", self.plan)
        return open_model(self.source, tokenizer=self.tokenizer, verify=self.verify, **kw)

    def load_weights(self, **kw: Any):
        """``load_weights`` of the source (config, full state dict, tokenizer, its own plan)."""
        return load_weights(self.source, tokenizer=self.tokenizer, verify=self.verify, **kw)

    def write_report(self, report: dict) -> dict:
        """``report`` to ``json_out`` (if set) on global rank 0; returns it."""
        if self.json_out and distributed.is_rank0():
            write_report(self.json_out, report)
        return report
