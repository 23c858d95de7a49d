"""PNG figures of a latency report and of the analytic projection (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

from ..files import save_figure

PHASES = (("prefill", "time to first token (prefill)"), ("decode", "time per output token"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_measured(report: dict, path: str | Path) -> None:
    """Median step time vs SPD ratio (bars: quartiles), the bound (dense minus the time of the
    dropped all-reduces), the analytic prediction, and the stock megatron model."""
    plt = _pyplot()
    plans = [p for p in report["plans"] if not p["stock"]]
    stock = next((p for p in report["plans"] if p["stock"]), None)
    x = [100 * p["spd_ratio"] for p in plans]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (ph, title) in zip(axes, PHASES):
        med = [1e3 * p[ph]["median"] for p in plans]
        err = [[1e3 * (p[ph]["median"] - p[ph]["q1"]) for p in plans],
               [1e3 * (p[ph]["q3"] - p[ph]["median"]) for p in plans]]
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label="measured (median, IQR)")
        dense = plans[0][ph]["median"]
        ax.plot(x, [1e3 * (dense - p[ph]["bound_s"]) for p in plans], "k--",
                label="bound: dense - dropped all-reduces")
        val = report.get("analytic_validation", {}).get(ph, {})
        if "plans" in val:
            ax.plot(x, [1e3 * r["predicted_s"] for r in val["plans"]], "g:", marker="x",
                    label="analytic (rate fitted on dense)")
        if stock:
            ax.axhline(1e3 * stock[ph]["median"], color="r", lw=0.8,
                       label="stock megatron-core (dense)")
        ax.set_xlabel("SPD blocks (%)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    link = report["link"].get("simulated", {}).get("decode", {}).get("name") or "no simulator"
    fig.suptitle(f"{report['model']['name']}, TP={report['tp']}, batch "
                 f"{report['workload']['batch']}, prompt {report['workload']['prompt']}, "
                 f"link {link}, {report['host']['cpu']} ({report['host']['cores']} cores)",
                 fontsize=9)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_projection(projection: dict, path: str | Path) -> None:
    """Predicted end-to-end latency reduction vs SPD ratio, one panel per model, one line per
    (TP, link, batch)."""
    plt = _pyplot()
    rows = projection["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))  # in the projection's order
    links = list(dict.fromkeys(r["link"] for r in rows))
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    tps = sorted({r["tp"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        for tp in tps:
            for link in links:
                for b in batches:
                    pts = [r for r in rows
                           if (r["model"], r["tp"], r["link"], r["batch"]) == (m, tp, link, b)]
                    ax.plot([100 * r["spd_ratio"] for r in pts],
                            [100 * r["end_to_end_reduction"] for r in pts],
                            color=f"C{links.index(link)}", marker="os^v"[batches.index(b) % 4],
                            ms=3, ls=("-", "--", ":")[tps.index(tp) % 3],
                            label=f"TP{tp} {link} batch {b}")
        ax.axvline(70, color="grey", lw=0.5)
        ax.set_title(m)
        ax.set_xlabel("SPD blocks (%)")
        ax.set_ylabel("end-to-end latency reduction (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6, ncol=2)
    wl = projection["workload"]
    fig.suptitle(f"analytic projection, {projection['device']['name']}; prompt {wl['prompt']}, "
                 f"{wl['new_tokens']} new tokens", fontsize=9)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)
