"""Format-1 megatron-spd checkpoints (read only): ``spd_checkpoint.json`` with the model config
and the plan, beside the torch_dist weights in ``weights/``. Format 2 (layout.py) moved the shape
and the plan into Megatron-LM's args; these are still read so older outputs keep loading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.config import ModelConfig
from ..core.plan import SPDPlan
from .layout import META_FILE, CheckpointError, StoredCheckpoint
from .manifest import check_manifest

LEGACY_WEIGHTS_DIR = "weights"


def read_legacy(root: Path, meta: dict[str, Any], verify: bool) -> StoredCheckpoint:
    """The format-1 checkpoint at ``root`` whose metadata object is ``meta``."""
    missing = [k for k in ("model_config", "plan", "tokenizer") if k not in meta]
    if missing:
        raise CheckpointError(f"{root / META_FILE} is corrupt: key(s) {missing} missing; save "
                              "or convert the checkpoint again")
    check_manifest(root, meta, verify)
    weights = root / LEGACY_WEIGHTS_DIR
    try:
        cfg = ModelConfig.from_dict(meta["model_config"])
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{root / META_FILE}: model_config is malformed ({e}); save or "
                              "convert the checkpoint again") from None
    plan = SPDPlan.from_dict(meta["plan"], source=str(root / META_FILE))
    return StoredCheckpoint(root, weights, cfg, plan, meta["tokenizer"], meta.get("dense_source"),
                            meta.get("saved_tp"), "legacy", meta)
