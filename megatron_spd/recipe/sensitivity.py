"""Per-block SPD sensitivity (design.md 1, step 1; paper Algorithm 1).

Backward cumulative sweep: make blocks i..L-1 SPD for i = L-1 down to 0 and record the
calibration perplexity ``PPL_i``; block i's sensitivity is ``s_i = PPL_i - PPL_{i+1}`` (with
``PPL_L`` the dense baseline). The blocks before i are dense and unchanged, so the dense hidden
states at every block input are computed once and each step runs only blocks i..L-1 (in SPD
form) and the head: L(L+1)/2 block forwards instead of L full forwards of L blocks each.

Two variants for comparison, which ignore how SPD errors compound (the cumulative sweep measures
that): *independent* makes only block i SPD, ``s_i = PPL(only i SPD) - PPL_dense`` (same cost);
*local* is the cheap one: ``s_i`` = relative MSE of block i's SPD output against its dense output
on the dense inputs, ``||y_spd - y||^2 / ||y - x||^2`` (one block forward per block and no head,
about L/2 times cheaper; a ranking, not in perplexity units; ``ppl`` is then the baseline). Both run with two models built from the same weights: the dense one and one with
every block in SPD form (the T=1 emulation of G groups, or real TP at T=G ranks).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..core.config import FullStateDict, ModelConfig
from ..core.plan import SPDPlan
from ..core.sharding import load_full_state_dict
from ..core.spec import build_model
from ..errors import InputError
from ..files import read_json_object, save_figure, unmark_report, write_report
from ..parallel import distributed
from . import activations

MODES = ("cumulative", "independent", "local")


@dataclass
class Sensitivity:
    """Result of a sweep; JSON-serialisable through ``to_dict``."""

    mode: str
    groups: int
    baseline_ppl: float
    ppl: list[float]            # ppl[i]: cumulative: blocks i..L-1 SPD; independent: only i SPD
    sensitivity: list[float]    # s_i
    n_samples: int
    seq_len: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.sensitivity)

    def order(self) -> list[int]:
        """Blocks from least to most sensitive (ties: later block first, as the sweep adds them)."""
        return sorted(range(self.num_layers), key=lambda i: (self.sensitivity[i], -i))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Sensitivity":
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_report(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Sensitivity":
        """A sweep saved by ``save`` (``tools/spd.py sensitivity --json``); InputError naming
        the problem for anything else."""
        if not Path(path).is_file():
            raise InputError(f"sensitivity file {path} does not exist; run "
                             "`tools/spd.py sensitivity --json PATH` first")
        d = unmark_report(read_json_object(path, "a sensitivity sweep (tools/spd.py "
                                                 "sensitivity --json)"))
        fields = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        if d and set(d) <= set(MODES):
            raise InputError(f"{path} holds one sweep per mode ({sorted(d)}, from --mode all); "
                             "run the sensitivity subcommand with one --mode for a plan")
        missing, unknown = sorted(required - set(d)), sorted(set(d) - fields)
        numbers = isinstance(d.get("sensitivity"), list) and all(
            isinstance(x, (int, float)) for x in d["sensitivity"])
        if missing or unknown or not numbers or not isinstance(d.get("groups"), int):
            bad = "" if numbers else ", 'sensitivity' is not a list of numbers"
            raise InputError(f"{path} is not a sensitivity sweep (missing {missing}, unknown "
                             f"{unknown}{bad}); pass the --json of tools/spd.py sensitivity")
        return cls.from_dict(d)


def build_pair(cfg: ModelConfig, full: FullStateDict, groups: int):
    """(dense model, all-SPD model) at the current TP, both holding ``full``."""
    dense = build_model(cfg, SPDPlan.dense(cfg.num_layers, groups))
    spd = build_model(cfg, SPDPlan.from_spd_blocks(cfg.num_layers, groups,
                                                   range(cfg.num_layers)))
    for m in (dense, spd):
        load_full_state_dict(m, full)
        m.eval()
    return dense, spd


@torch.no_grad()
def sweep(dense, spd, tokens: torch.Tensor, *, mode: str = "cumulative", micro_batch: int = 4,
          progress: bool = True, dense_inputs: Optional[list[torch.Tensor]] = None) -> Sensitivity:
    """Sensitivity of every block on calibration ``tokens`` ``[n, s]``.

    ``dense`` and ``spd`` are the same weights built dense and all-SPD (``build_pair``);
    ``dense_inputs`` may pass precomputed ``activations.block_inputs(dense, tokens)``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown sweep mode {mode!r}; use one of {MODES}")
    activations.check_model(spd)
    t0 = time.time()
    dense_layers, spd_layers = list(dense.decoder.layers), list(spd.decoder.layers)
    L = len(dense_layers)
    groups = spd_layers[0].spd_groups
    xs = dense_inputs if dense_inputs is not None else activations.block_inputs(dense, tokens,
                                                                           micro_batch=micro_batch)
    base = activations.perplexity_from(dense, xs[L], tokens, [], micro_batch)
    ppl = [0.0] * L
    steps = distributed.progress(range(L - 1, -1, -1), desc=f"{mode} sweep", total=L,
                                 enabled=progress)
    local = [0.0] * L
    for i in steps:
        if mode == "local":
            local[i] = _relative_block_error(dense, dense_layers[i], spd_layers[i], xs[i],
                                             micro_batch)
            ppl[i] = base
            continue
        rest = spd_layers[i:] if mode == "cumulative" else [spd_layers[i], *dense_layers[i + 1:]]
        ppl[i] = activations.perplexity_from(spd, xs[i], tokens, rest, micro_batch)
        if hasattr(steps, "set_postfix"):
            steps.set_postfix(block=i, ppl=f"{ppl[i]:.3f}")
    if mode == "cumulative":
        after = ppl[1:] + [base]
        sens = [ppl[i] - after[i] for i in range(L)]
    elif mode == "independent":
        sens = [p - base for p in ppl]
    else:
        sens = local
    n, s = tokens.shape
    return Sensitivity(mode=mode, groups=groups, baseline_ppl=base, ppl=ppl, sensitivity=sens,
                       n_samples=n, seq_len=s, seconds=time.time() - t0)


def _relative_block_error(model, dense_layer, spd_layer, x_cache: torch.Tensor,
                          micro_batch: int) -> float:
    ctx = activations.context(model, x_cache.shape[1])
    err = ref = 0.0
    for sl in activations.micro_batches(x_cache.shape[0], micro_batch):
        x = activations.to_sbh(x_cache, sl)
        y = activations.run_layers([dense_layer], x, ctx)
        y_spd = activations.run_layers([spd_layer], x, ctx)
        err += float((y_spd - y).double().pow(2).sum())
        ref += float((y - x).double().pow(2).sum())
    return err / max(ref, 1e-30)


def plot(results: list[Sensitivity], path: str | Path, title: Optional[str] = None) -> None:
    """PNG: sensitivity per block (one line per sweep) and, for cumulative sweeps, the
    perplexity with blocks i..L-1 SPD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        x = list(range(r.num_layers))
        if r.mode == "local":  # relative block error, not perplexity: its own axis
            twin = axes[0].twinx()
            twin.plot(x, r.sensitivity, color="tab:green", marker="s", ms=3,
                      label=f"local block error (right axis, G={r.groups})")
            twin.set(ylabel="relative block output error", yscale="log")
            twin.legend(fontsize=8, loc="lower right")
            continue
        axes[0].plot(x, r.sensitivity, marker="o", ms=3, label=f"{r.mode} (G={r.groups})")
        if r.mode == "cumulative":
            axes[1].plot(x, r.ppl, marker="o", ms=3, label=f"blocks i..L-1 SPD (G={r.groups})")
            axes[1].axhline(r.baseline_ppl, color="gray", ls="--", label="dense")
    axes[0].set(xlabel="block i", ylabel="sensitivity s_i (perplexity increase)",
                yscale="symlog", title="per-block sensitivity")
    axes[1].set(xlabel="block i", ylabel="calibration perplexity", yscale="log",
                title="cumulative sweep")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
