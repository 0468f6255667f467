"""Paper 2's figures: Macondo, its fine-tuning curve, the MLP hurdle, the projection and the MLP-LM (matplotlib
through the backbone's figures.py). Each figure is a step that reads one table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ..cli import step
from ..figures import plt, save
from ..knnlm import VARIANTS


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
    children, one panel per variant scored at every step (the MLP-LM only with analyses.macondo.checkpoint_mlp);
    the perfect log(1/n) as horizontal lines of the same colour."""
    df = pl.read_parquet(table).filter(pl.col("n_children").is_not_null())
    groups = sorted(df["n_children"].unique())
    shown = {c: name for c, name in VARIANTS.items() if df[c].null_count() == 0}
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.6), sharey=True)
    for ax, (c, name) in zip(axes, shown.items(), strict=True):
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
