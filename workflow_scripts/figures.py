"""Figures: every plot of the pipeline, drawn with matplotlib to PNG + PDF (the one module that imports it).

The numbers come from the tables the stages wrote; nothing here computes a result. Each figure is a step that
reads one table, so editing this module reruns the figure rules only.
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
from .knnlm import VARIANTS  # noqa: E402


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


def task_delta(table, title: str, png, pdf) -> None:
    """Δ = kNN-LM − base LM per task with its interval, from the task-delta table (category, task, delta, lo, hi)."""
    rows = pl.read_parquet(table).select("category", "task", "delta", "lo", "hi").rows()
    colors = {"memory": "tab:blue", "reasoning": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    y = np.arange(len(rows))[::-1]
    for yi, (cat, _task, m, lo, hi) in zip(y, rows, strict=True):
        ax.errorbar(m, yi, xerr=[[m - lo], [hi - m]], fmt="o", color=colors.get(cat, "grey"), capsize=3)
    ax.set_yticks(y, [f"{t} ({c})" for c, t, *_ in rows])
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_xlabel("Δ = kNN-LM − base LM (task metric; 95% bootstrap CI over items)")
    ax.set_title(title)
    for cat, col in colors.items():
        ax.plot([], [], "o", color=col, label=cat)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    save(fig, png, pdf)


def macondo(table, png, pdf) -> None:
    """Log-likelihood of the child's name by number of children (mean ± std over seeds), perfect log(1/n)."""
    table = pl.read_parquet(table)
    rows = table.filter(pl.col("n_children").is_not_null())
    fig, ax = plt.subplots(figsize=(6, 4))
    x = rows["n_children"].to_numpy()
    for (c, name), style in zip(VARIANTS.items(), ("-o", ":s", ":v", "--^"), strict=True):
        ax.errorbar(
            x, rows[c].to_numpy(), yerr=np.nan_to_num(rows[f"{c}_std"].to_numpy()), fmt=style, capsize=3, label=name
        )
    ax.plot(x, rows["perfect"].to_numpy(), "k_", ms=20, mew=2, label="perfect: log(1/#children)")
    ax.set_xlabel("number of children of the villager")
    ax.set_ylabel("log-likelihood of the child's name")
    ax.set_title(f"Macondo test set (mean ± std over {int(table['seeds'].max())} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, png, pdf)


def macondo_curve(table, png, pdf) -> None:
    """Figure 1 analogue: log-likelihood of the child's name over fine-tuning steps, one line per number of
    children, one panel per variant; the perfect log(1/n) as horizontal lines of the same colour."""
    df = pl.read_parquet(table).filter(pl.col("n_children").is_not_null())
    groups = sorted(df["n_children"].unique())
    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(3.6 * len(VARIANTS), 3.6), sharey=True)
    for ax, (c, name) in zip(axes, VARIANTS.items(), strict=True):
        for i, n in enumerate(groups):
            sub = df.filter(pl.col("n_children") == n).sort("step")
            ax.plot(sub["step"], sub[c], "-o", ms=3, color=f"C{i}", label=f"{n} children")
            ax.axhline(sub["perfect"][0], color=f"C{i}", ls=":", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("log-likelihood of the child's name")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Macondo test set over fine-tuning (mean over {int(df['seeds'].max())} seeds; dotted: perfect)")
    fig.tight_layout()
    save(fig, png, pdf)


def hurdle(table, column: str, title: str, png, pdf) -> None:
    """The with / without last-MLP curves of one hurdle table."""
    table = pl.read_parquet(table)
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, style in (("full", "-o"), ("no_last_mlp", "--s")):
        sub = table.filter(pl.col("variant") == v)
        ax.plot(sub["step"], sub[column], style, ms=3, label=v.replace("_", " "))
    ax.set_xlabel("training step")
    ax.set_ylabel(column.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, png, pdf)


def neighbour_gold(table, title: str, png, pdf) -> None:
    """How often the k nearest neighbours' values are the gold token, against the gold token's frequency in the
    datastore (power-of-ten buckets), one line per task category, from the task-neighbours gold table."""
    df = read_table(table)
    colors = {"memory": "tab:blue", "reasoning": "tab:red"}
    fig, ax = plt.subplots(figsize=(6, 4))
    for (cat,), g in df.group_by(["category"], maintain_order=True):
        g = g.sort("bucket_min")
        x = np.maximum(g["bucket_min"].to_numpy(), 0.5)  # a gold token absent from the datastore at 0.5
        m, lo, hi = (g[c].to_numpy() for c in ("gold_hit_rate", "lo", "hi"))
        ax.errorbar(x, m, yerr=[m - lo, hi - m], marker="o", capsize=3, color=colors.get(cat, "grey"),
                    label=f"{cat} ({g['n_items'].sum()} items)")
    ax.set_xscale("log")
    ax.set_xlabel("gold token's count in the datastore's values (bucket from; 0.5: absent)")
    ax.set_ylabel("fraction of the k neighbours whose value is the gold token")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, png, pdf)


# --------------------------------------------------------------------------------------------- steps
@step
def figure_sweep(params: dict, sweep: Path, png: Path, pdf: Path) -> None:
    """Draw the perplexity-vs-λ figure of one (eval set, datastore) from its sweep table."""
    perplexity_vs_lambda(sweep, params["title"], png, pdf)


@step
def figure_tasks(params: dict, table: Path, png: Path, pdf: Path) -> None:
    """Draw Δ = kNN-LM − base LM per task, grouped by category, with bootstrap intervals, from its table."""
    task_delta(table, params["title"], png, pdf)


@step
def figure_neighbour_gold(params: dict, table: Path, png: Path, pdf: Path) -> None:
    """Draw how often the neighbours' values are the gold token against its datastore frequency, memory vs
    reasoning tasks, from the task-neighbours gold table."""
    neighbour_gold(table, params["title"], png, pdf)


@step
def figure_macondo(table: Path, png: Path, pdf: Path) -> None:
    """Draw the Figure 1 analogue (log-likelihood by number of children, perfect log(1/n)) from its table."""
    macondo(table, png, pdf)


@step
def figure_macondo_curve(table: Path, png: Path, pdf: Path) -> None:
    """Draw the Figure 1 analogue (log-likelihood over fine-tuning steps, perfect log(1/n)) from its table."""
    macondo_curve(table, png, pdf)


@step
def figure_hurdle(params: dict, table: Path, png: Path, pdf: Path) -> None:
    """Draw the hurdle curves (Fig. 4 / Fig. 5 analogues) from their table."""
    hurdle(table, params["column"], params["title"], png, pdf)


@step
def figure_projection(table: Path, png: Path, pdf: Path) -> None:
    """Draw the Eq. 2 projection figure from its table: one panel per projected kNN-LM point."""
    df = pl.read_parquet(table)
    points = df["point"].unique(maintain_order=True).to_list()
    n = df.filter(pl.col("point") == points[0]).height
    fig, axes = plt.subplots(len(points), 1, figsize=(max(6, 1.1 * n), 3.2 * len(points)), squeeze=False)
    for ax, point in zip(axes[:, 0], points, strict=True):
        sub = df.filter(pl.col("point") == point)
        labels = [f"{r['run']}\n{r['space']}" if r["space"] != "-" else r["run"] for r in sub.iter_rows(named=True)]
        bars = ax.bar(range(len(labels)), sub["ppl"].to_list(), color=["grey", "C0"] + ["C2"] * (len(labels) - 2))
        for b, kl in zip(bars, sub["kl"].to_list(), strict=True):
            ax.annotate(
                f"KL {kl:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7
            )
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("perplexity (tokens)")
        ax.set_title(f"p_knnlm at {point}; {sub['n_positions'][0]} positions", fontsize=9)
    fig.suptitle("Eq. 2: projection of p_knnlm onto the output space of f and f∘g")
    fig.tight_layout()
    save(fig, png, pdf)


@step
def figure_mlp(table: Path, png: Path, pdf: Path) -> None:
    """Draw the MLP-LM perplexity against λ beside the LM and the kNN-LM, from its table."""
    df = pl.read_parquet(table)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (ev,) in enumerate(df.select("eval_set").unique(maintain_order=True).iter_rows()):
        sub = df.filter(pl.col("eval_set") == ev)
        mlp = sub.filter(pl.col("model") == "MLP-LM").sort("lambda")
        ax.plot(mlp["lambda"], mlp["ppl"], "-o", color=f"C{i}", label=f"MLP-LM ({ev})")
        for r in sub.filter(pl.col("model") != "MLP-LM").iter_rows(named=True):
            ls = "--" if r["model"] == "LM" else ":"
            ax.axhline(r["ppl"], color=f"C{i}", ls=ls, lw=1, label=f"{r['model']} ({ev}) {r['ppl']:.3f}")
    ax.set_xlabel("λ (weight of the MLP part)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"MLP in place of kNN retrieval; storage {df['storage_ratio'][0]:.2%} of the datastore")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, png, pdf)


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
