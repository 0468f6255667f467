"""Figures: matplotlib PNG + PDF, each registered in the Snakemake report with a caption."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from .artifacts import atomic_path  # noqa: E402


def save(fig, png, pdf=None) -> None:
    for path in filter(None, (png, pdf)):
        with atomic_path(path, Path(path).suffix) as tmp:
            fig.savefig(tmp, format=Path(path).suffix[1:], dpi=150, bbox_inches="tight")
    plt.close(fig)


def perplexity_vs_lambda(sweep_parquet, title: str, png, pdf) -> None:
    """Perplexity against λ, one line per (k, σ): colour by k, line style by σ; base LM dashed grey."""
    df = pl.read_parquet(sweep_parquet)
    ks, sigmas = sorted(df["k"].unique()), sorted(df["sigma"].unique())
    cmap = plt.get_cmap("viridis", max(2, len(ks)))
    styles = ["-", "--", "-.", ":", (0, (1, 3)), (0, (5, 1))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        [0] + sorted(df["lambda"].unique()),
        [df["base_ppl"][0]] * (1 + df["lambda"].n_unique()),
        color="grey",
        lw=2,
        ls=(0, (4, 2)),
        label=f"base LM ({df['base_ppl'][0]:.2f})",
    )
    for i, k in enumerate(ks):
        for j, s in enumerate(sigmas):
            sub = df.filter((pl.col("k") == k) & (pl.col("sigma") == s)).sort("lambda")
            ax.plot(
                [0.0] + sub["lambda"].to_list(),
                [df["base_ppl"][0]] + sub["ppl"].to_list(),
                marker="o",
                ms=3,
                color=cmap(i),
                ls=styles[j % len(styles)],
                label=f"k={k}, σ={s:g}",
            )
    ax.set_xlabel("λ (weight of the kNN distribution)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=1 + len(ks) * len(sigmas) // 16, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    save(fig, png, pdf)
