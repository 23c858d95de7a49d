"""``open_model``: any source -> a megatron-core GPTModel at the current TP degree, plan applied.

Checkpoints load through dist_checkpointing and reshard to any TP the plan allows; other sources
(HF, GGUF, the bundled default) are read as full state dicts and sliced per rank.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from ..checkpoint.layout import StoredCheckpoint
from ..checkpoint.read import load_into, read_checkpoint, read_full_state_dict
from ..core.compensation import entries_for_plan, full_shapes
from ..core.config import ModelConfig
from ..core.plan import PlanError, SPDPlan
from ..core.sharding import load_full_state_dict
from ..core.spec import build_model
from ..data.tokenizer import Tokenizer
from ..parallel.distributed import barrier, is_rank0
from .sources import check_vocab, default_plan_for, load_weights, source_kind

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Any              # megatron.core GPTModel at the current TP degree
    config: ModelConfig
    plan: SPDPlan
    tokenizer: Tokenizer
    dense_source: Optional[str] = None  # recorded origin of changed weights (sources.dense_origin)


def open_model(source: str | Path | None = None, *, plan: SPDPlan | str | Path | None = None,
               sequence_parallel: bool = False, tokenizer: str | Path | None = None,
               verify: bool = True) -> LoadedModel:
    """Build the model at the current TP degree (``distributed.init(tp)`` first) with ``plan``
    (default: the source's own plan) and load its weights; every rank calls it. ``tokenizer``
    replaces the source's own; ``verify=False`` skips the checksum check of a checkpoint."""
    if plan is not None and not isinstance(plan, SPDPlan):
        plan = SPDPlan.load(plan)
    kind = source_kind(source)
    if kind == "mcore":
        ckpt = _read_on_rank0_first(source, verify)
        tok = ckpt.tokenizer(tokenizer)
        check_vocab(ckpt.config, tok, str(ckpt.root))
        _note_unrecovered(plan, ckpt.plan, str(ckpt.root))
        plan = plan or ckpt.plan or default_plan_for(ckpt.config)
        try:
            model = build_model(ckpt.config, plan, sequence_parallel=sequence_parallel)
        except PlanError as e:
            raise PlanError(f"cannot open checkpoint {ckpt.root}: {e}") from None
        if _compensation_matches(plan, ckpt.plan, ckpt.config, str(ckpt.root)):
            load_into(model, ckpt)
        else:  # the stored tensors do not match the model's: through the full state dict
            load_full_state_dict(model, entries_for_plan(read_full_state_dict(ckpt),
                                                         ckpt.config, plan))
        return LoadedModel(model, ckpt.config, plan, tok, ckpt.dense_source)
    if kind in ("default", "gguf") and not is_rank0():
        barrier()  # rank 0 fills the conversion cache first; the others then read it
    cfg, full, tok, src_plan = load_weights(source, tokenizer=tokenizer)
    if kind in ("default", "gguf") and is_rank0():
        barrier()
    _note_unrecovered(plan, src_plan, str(source or "the default model"))
    plan = plan or src_plan
    _compensation_matches(plan, src_plan, cfg, str(source or "the default model"))
    model = build_model(cfg, plan, sequence_parallel=sequence_parallel)
    load_full_state_dict(model, entries_for_plan(full, cfg, plan))
    return LoadedModel(model, cfg, plan, tok)


def _compensation_matches(plan: SPDPlan, weights_plan: Optional[SPDPlan], cfg: ModelConfig,
                          source: str) -> bool:
    """Whether the weights hold exactly the compensation ``plan`` gives; if not, says on rank 0
    what happens: compensation the weights lack starts at zero (plain SPD for that block), the
    weights' own compensation that the plan does not give is not used."""
    want = full_shapes(cfg, plan)
    have = {} if weights_plan is None else full_shapes(cfg, weights_plan)
    if want == have:
        return True
    new = sorted({int(k.split(".")[2]) for k in want if have.get(k) != want[k]})
    unused = sorted({int(k.split(".")[2]) for k in have if k not in want})
    if new:
        log.warning(f"[megatron-spd] blocks {new} have compensation in the plan that the weights "
                    f"from {source} do not hold: it starts at zero (plain SPD) until fitted "
                    "(tools/spd.py distill)")
    if unused:
        log.warning(f"[megatron-spd] the compensation the weights from {source} hold for blocks "
                    f"{unused} is not used: the plan gives those blocks none")
    return False


def unrecovered_note(plan: SPDPlan, weights_plan: Optional[SPDPlan], source: str
                     ) -> Optional[str]:
    """``b2b``/``hg`` say how a block's weights were recovered for SPD; a plan applied to weights
    not recovered that way (their own plan says otherwise) runs those blocks zero-shot. Every
    route (our tools, Megatron-LM's scripts) says so in these words; None when nothing to say."""
    own = weights_plan.strategies if weights_plan is not None \
        and weights_plan.num_layers == plan.num_layers else ["dense"] * plan.num_layers
    blocks = [i for i, s in enumerate(plan.strategies) if s in ("b2b", "hg") and own[i] != s]
    if not blocks:
        return None
    return (f"blocks {blocks} are b2b/hg in the plan but the weights from {source} were not "
            "recovered that way: they run as zero-shot SPD blocks until recovered "
            "(tools/spd.py distill, or fine-tuning)")


def _note_unrecovered(plan: Optional[SPDPlan], weights_plan: Optional[SPDPlan],
                      source: str) -> None:
    note = unrecovered_note(plan, weights_plan, source) if plan is not None else None
    if note:
        log.warning(f"[megatron-spd] {note}")


def _read_on_rank0_first(source, verify: bool) -> StoredCheckpoint:
    """Rank 0 checks the files (checksums are costly: once per job, not once per rank); every
    rank then reads the small metadata, and all raise the same error if rank 0 found one."""
    error = [None]
    if is_rank0():
        try:
            read_checkpoint(source, verify=verify)
        except Exception as e:  # re-raised on every rank below
            error = [e]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]
    return read_checkpoint(source, verify=False)
