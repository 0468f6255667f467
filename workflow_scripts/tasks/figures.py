"""Paper 1's figures: the task Δ per category, and how often the neighbours' values are the gold token (matplotlib
through the backbone's figures.py). Each figure is a step that reads one table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from ..artifacts import read_table
from ..cli import step
from ..figures import plt, save


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


@step
def figure_tasks(params: dict, table: Path, png: Path, pdf: Path) -> None:
    """Draw Δ = kNN-LM − base LM per task, grouped by category, with bootstrap intervals, from its table."""
    task_delta(table, params["title"], png, pdf)


@step
def figure_neighbour_gold(params: dict, table: Path, png: Path, pdf: Path) -> None:
    """Draw how often the neighbours' values are the gold token against its datastore frequency, memory vs
    reasoning tasks, from the task-neighbours gold table."""
    neighbour_gold(table, params["title"], png, pdf)
