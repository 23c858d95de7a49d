"""Training checkpoints that resume exactly: model, optimizer, schedule, step, RNG.

Layout of a save directory (Megatron's habit: numbered checkpoints plus a pointer written last):

    latest.json            {"step": k, "checkpoint": "step_000k"}   (atomic; the only pointer)
    step_000k/             a megatron-spd checkpoint (checkpoint.save_checkpoint): it serves
                           with tools/generate.py and tools/evaluate.py as it is
    step_000k/trainer/     state.json (step, metrics so far, run settings) and one
                           optim_tp{r}.pt per TP rank (torch.optim or megatron optimizer
                           state_dict, schedule, RNG), written by DP rank 0 (DP replicas are equal)

A step directory becomes visible to ``latest`` only after every file of it is written, so a run
killed mid-save resumes from the previous checkpoint. Optimizer state is TP-sharded like the
parameters, so a resume must use the same TP degree (the error says so). These files would
allow another DP degree, but the loop refuses one: the global batch defines the data order.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import parallel_state

from ..checkpoint.save import save_checkpoint
from ..convert.safe_load import load_torch
from ..errors import SPDError
from ..files import atomic_write_json, atomic_write_with, read_json_object
from ..parallel.distributed import barrier, is_rank0

LATEST = "latest.json"
TRAINER_DIR = "trainer"


class ResumeError(SPDError, RuntimeError):
    """A training checkpoint that cannot be resumed as asked; the message says what to do."""


def step_dir(save_dir: str | Path, step: int) -> Path:
    return Path(save_dir) / f"step_{step:07d}"


def latest(save_dir: str | Path | None) -> Optional[tuple[int, Path]]:
    """(step, checkpoint dir) of the newest complete training checkpoint, or None."""
    if save_dir is None or not (Path(save_dir) / LATEST).is_file():
        return None
    info = read_json_object(Path(save_dir) / LATEST, "a training-checkpoint pointer "
                            '{"step": k, "checkpoint": "step_000000k"}', ResumeError)
    if not isinstance(info.get("step"), int) or not isinstance(info.get("checkpoint"), str):
        raise ResumeError(f"{save_dir}/{LATEST} is not a training-checkpoint pointer; is "
                          f"{save_dir} the --save directory of a fine-tuning run?")
    path = Path(save_dir) / info["checkpoint"]
    if not (path / TRAINER_DIR / "state.json").is_file():
        raise ResumeError(f"{save_dir}/{LATEST} points to {path}, which has no trainer state; "
                          "the save directory was edited by hand: fix latest.json or start over "
                          "with a new --save directory")
    return int(info["step"]), path


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(save_dir: str | Path, step: int, *, loaded, trainer, state: dict[str, Any],
         keep: int = 2) -> Path:
    """Write the training checkpoint after ``step`` optimizer steps (every rank calls it) and
    move ``latest`` to it; keeps the newest ``keep`` checkpoints (0 = all)."""
    out = step_dir(save_dir, step)
    save_checkpoint(trainer.model, out, config=loaded.config, plan=loaded.plan,
                    tokenizer=loaded.tokenizer, dense_source=loaded.dense_source,
                    overwrite=True)  # a step re-saved after a kill: this run's own directory
    tdir = out / TRAINER_DIR
    if is_rank0():
        tdir.mkdir(exist_ok=True)
    barrier()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_data_parallel_rank() == 0:
        blob = {"trainer": trainer.optimizer.state_dict(), "rng": _rng_state(),
                "tp": parallel_state.get_tensor_model_parallel_world_size()}
        atomic_write_with(tdir / f"optim_tp{tp_rank}.pt", lambda tmp: torch.save(blob, tmp))
    barrier()
    if is_rank0():
        atomic_write_json(tdir / "state.json", {**state, "step": step})
        atomic_write_json(Path(save_dir) / LATEST, {"step": step, "checkpoint": out.name})
        prune(save_dir, keep, out)
    barrier()
    return out


def prune(save_dir: str | Path, keep: int, newest: Path) -> None:
    """Delete all but the newest ``keep`` training checkpoints of ``save_dir`` (0 = keep all):
    only directories this module wrote (``step_NNNNNNN`` holding trainer state); ``newest`` (the
    one ``latest`` now points to) always stays."""
    if keep <= 0:
        return
    done = sorted(p for p in Path(save_dir).glob("step_" + "[0-9]" * 7)  # ours only
                  if (p / TRAINER_DIR).is_dir() and p != newest)
    for old in done[:max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load(ckpt: Path, trainer) -> dict[str, Any]:
    """Restore optimizer, schedule and RNG from ``ckpt`` (the model is opened from ``ckpt``
    itself); returns the saved state.json."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    path = ckpt / TRAINER_DIR / f"optim_tp{parallel_state.get_tensor_model_parallel_rank()}.pt"
    if not path.is_file():
        saved = sorted(p.name for p in (ckpt / TRAINER_DIR).glob("optim_tp*.pt"))
        raise ResumeError(f"{ckpt} was saved at TP={len(saved)}, this run has TP={tp}; the "
                          f"optimizer state is TP-sharded: resume with --tp {len(saved)}")
    blob = load_torch(path)
    if blob["tp"] != tp:
        raise ResumeError(f"{ckpt} was saved at TP={blob['tp']}, this run has TP={tp}; resume "
                          f"with --tp {blob['tp']}")
    trainer.optimizer.load_state_dict(blob["trainer"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(blob["rng"]["cuda"])
    return json.loads((ckpt / TRAINER_DIR / "state.json").read_text())
