"""Figures of the backbone: the perplexity sweep and the scaling study, drawn with matplotlib to PNG + PDF, and
``save`` for the wings' figure modules (``tasks/figures.py``, ``analyses/figures.py``): the three modules that
import matplotlib.

The numbers come from the tables the stages wrote; nothing here computes a result. Each figure is a step that
reads one table, so editing a figure module reruns its figure rules only.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from .artifacts import atomic_path, read_table  # noqa: E402
from .cli import step  # noqa: E402


def save(fig, png, pdf=None) -> None:
    for path in filter(None, (png, pdf)):
        with atomic_path(path, Path(path).suffix) as tmp:
            fig.savefig(tmp, format=Path(path).suffix[1:], dpi=150, bbox_inches="tight")
    plt.close(fig)


def perplexity_vs_lambda(sweep_parquet, title: str, png, pdf) -> None:
    """Small multiples: one panel per σ, perplexity against λ with k as colour; the base LM dashed grey."""
    df = read_table(sweep_parquet)
    ks, sigmas = sorted(df["k"].unique()), sorted(df["sigma"].unique())
    lambdas = [0.0] + sorted(df["lambda"].unique())
    base = df["base_ppl"][0]
    cmap = plt.get_cmap("viridis", max(2, len(ks)))
    ncol = min(4, len(sigmas))
    nrow = -(-len(sigmas) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol + 1.4, 3.0 * nrow), sharex=True, sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(sigmas):]:
        ax.set_visible(False)
    for ax, s in zip(axes.flat, sigmas, strict=False):
        ax.plot(lambdas, [base] * len(lambdas), color="grey", lw=1.5, ls=(0, (4, 2)), label=f"base LM ({base:.2f})")
        for i, k in enumerate(ks):
            sub = df.filter((pl.col("k") == k) & (pl.col("sigma") == s)).sort("lambda")
            ax.plot([0.0] + sub["lambda"].to_list(), [base] + sub["ppl"].to_list(), marker="o", ms=3,
                    color=cmap(i), label=f"k={k}")
        ax.set_title(f"σ = {s:g}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("λ (weight of the kNN distribution)")
    for ax in axes[:, 0]:
        ax.set_ylabel("perplexity")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle(title)
    fig.tight_layout()
    save(fig, png, pdf)


# --------------------------------------------------------------------------------------------- steps
@step
def figure_sweep(params: dict, sweep: Path, png: Path, pdf: Path) -> None:
    """Draw the perplexity-vs-λ figure of one (eval set, datastore) from its sweep table."""
    perplexity_vs_lambda(sweep, params["title"], png, pdf)


# --------------------------------------------------------------------------------------------- scaling study
def _fit_line(ax, fit: dict, x, color, label: str) -> None:
    """The log-linear fit y = a + b·log10(tokens) over the range of x, its slope and CI in the legend."""
    xs = np.geomspace(min(x), max(x), 50)
    ax.plot(xs, fit["intercept"] + fit["slope_per_decade"] * np.log10(xs), color=color, lw=1, ls=":",
            label=f"{label} fit: {fit['slope_per_decade']:+.3f}/decade [{fit['lo']:+.3f}, {fit['hi']:+.3f}]")


def _size_axes(ax, ylabel: str, title: str) -> None:
    """A scaling figure's axes: datastore tokens on a log scale, the legend outside."""
    ax.set_xscale("log")
    ax.set_xlabel("datastore tokens (fraction of the datastore, log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))


def _fits(path) -> dict:
    return {r["group"]: r for r in pl.read_parquet(path).iter_rows(named=True)}


@step
def figure_scaling_perplexity(params: dict, table: Path, fits: Path, png: Path, pdf: Path) -> None:
    """Draw perplexity against datastore tokens (log x) from the scaling table: per eval set the kNN-LM at the point
    chosen at each size (its λ written beside it) with its 95% CI, the base LM dashed, and the log-linear fit."""
    df, fit = pl.read_parquet(table), _fits(fits)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (ev,) in enumerate(df.select("eval_set").unique(maintain_order=True).iter_rows()):
        sub = df.filter(pl.col("eval_set") == ev).sort("datastore_tokens")
        x, y = sub["datastore_tokens"].to_numpy(), sub["knn_ppl"].to_numpy()
        err = [y - sub["knn_ppl_lo"].to_numpy(), sub["knn_ppl_hi"].to_numpy() - y]
        ax.errorbar(x, y, yerr=err, fmt="-o", ms=4, capsize=3, color=f"C{i}", label=f"kNN-LM ({ev})")
        ax.axhline(sub["base_ppl"][0], color=f"C{i}", ls="--", lw=1, label=f"base LM ({ev}) {sub['base_ppl'][0]:.3f}")
        for r in sub.iter_rows(named=True):
            ax.annotate(f"λ={r['lambda']:g}, k={r['k']}", (r["datastore_tokens"], r["knn_ppl"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 4 + 8 * i), color=f"C{i}")
        if ev in fit:
            _fit_line(ax, fit[ev], x, f"C{i}", ev)
    _size_axes(ax, "perplexity", params["title"])
    save(fig, png, pdf)


@step
def figure_scaling_tasks(params: dict, table: Path, fits: Path, png: Path, pdf: Path) -> None:
    """Draw task Δ = kNN-LM − base LM against datastore tokens per category, with 95% bootstrap CIs and the
    log-linear fit of each category's curve, from the scaling task table."""
    df, fit = pl.read_parquet(table).filter(pl.col("level") == "category"), _fits(fits)
    colors = {"memory": "tab:blue", "reasoning": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (cat,) in enumerate(df.select("group").unique(maintain_order=True).iter_rows()):
        sub = df.filter(pl.col("group") == cat).sort("datastore_tokens")
        x, y = sub["datastore_tokens"].to_numpy(), sub["delta"].to_numpy()
        c = colors.get(cat, f"C{i + 2}")
        ax.errorbar(x, y, yerr=[y - sub["lo"].to_numpy(), sub["hi"].to_numpy() - y], fmt="-o", ms=4, capsize=3,
                    color=c, label=f"{cat} (mean of its tasks' Δ)")
        if cat in fit:
            _fit_line(ax, fit[cat], x, c, cat)
    ax.axhline(0, color="grey", lw=1, ls="--")
    _size_axes(ax, "Δ = kNN-LM − base LM (95% bootstrap CI)", params["title"])
    save(fig, png, pdf)


@step
def figure_scaling_frequency(params: dict, table: Path, png: Path, pdf: Path) -> None:
    """Draw the mean log-probability gain of the kNN-LM over the base LM by how often the target token occurs in the
    datastore, one line per datastore size, one panel per eval set, from the scaling frequency table."""
    df = pl.read_parquet(table)
    evs = df["eval_set"].unique(maintain_order=True).to_list()
    buckets = df.sort("bucket_min")["bucket"].unique(maintain_order=True).to_list()
    sizes = sorted(df["datastore_tokens"].unique().to_list())
    cmap = plt.get_cmap("viridis", max(2, len(sizes)))
    fig, axes = plt.subplots(1, len(evs), figsize=(4.6 * len(evs) + 1.6, 3.6), sharey=True, squeeze=False)
    for ax, ev in zip(axes[0], evs, strict=True):
        for j, n in enumerate(sizes):
            sub = df.filter((pl.col("eval_set") == ev) & (pl.col("datastore_tokens") == n)).sort("bucket_min")
            ax.plot([buckets.index(b) for b in sub["bucket"]], sub["gain_nats"], "-o", ms=3, color=cmap(j),
                    label=f"{n:,} tokens")
        ax.axhline(0, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(buckets)), buckets, fontsize=7)
        ax.set_xlabel("occurrences of the target token in the datastore")
        ax.set_title(ev, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("mean gain in log p (nats), kNN-LM − base")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(params["title"])
    fig.tight_layout()
    save(fig, png, pdf)
