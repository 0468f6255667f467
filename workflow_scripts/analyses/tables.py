"""Paper 2's tables from the per-seed scores: the Macondo table (Table 5 analogue) and curve (Figure 1 analogue),
and the hurdle curves (Fig. 4 / Fig. 5 analogues). polars only: these steps start without torch.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .. import knnlm
from ..artifacts import write_table
from ..cli import step


def macondo(score_files) -> pl.DataFrame:
    """Mean log-likelihood of the children's names by number of children, then two averages: "average", the
    plain mean of the per-number-of-children means (paper 2's Table 5 average), and "item mean", the mean over
    test items (weighted towards parents with more children). Each row is computed per seed (each file is one
    seed's scores), then its mean and std over seeds are reported. ``perfect``: log(1/n), averaged the same way."""
    scores = [*knnlm.VARIANTS, "perfect"]
    per_seed = []
    for f in score_files:
        df = pl.read_parquet(f).with_columns(perfect=-(pl.col("n_children").cast(pl.Float64).log()))
        seed = df["seed"][0]
        groups = df.group_by("n_children").agg([pl.col(c).mean() for c in scores]).sort("n_children")
        rows = groups.with_columns(pl.col("n_children").cast(pl.Utf8).alias("children"))
        average = groups.select(pl.lit("average").alias("children"), *[pl.col(c).mean() for c in scores])
        items = df.select(pl.lit("item mean").alias("children"), *[pl.col(c).mean() for c in scores])
        per_seed.append(
            pl.concat([rows, average, items], how="diagonal_relaxed").with_columns(pl.lit(seed).alias("seed"))
        )
    allseeds = pl.concat(per_seed)
    order = {c: i for i, c in enumerate(allseeds["children"].unique(maintain_order=True))}
    return (
        allseeds.group_by("children", maintain_order=True)
        .agg(
            pl.col("n_children").first(),
            *[pl.col(c).mean().alias(c) for c in scores],
            *[pl.col(c).std().alias(f"{c}_std") for c in knnlm.VARIANTS],
            pl.len().alias("seeds"),
        )
        .sort(pl.col("children").replace_strict(order))
        .select("children", "n_children", *knnlm.VARIANTS, *[f"{c}_std" for c in knnlm.VARIANTS], "seeds", "perfect")
    )


def macondo_curve(score_files, loss_files) -> pl.DataFrame:
    """The Figure 1 / Table 5 curve: ``table`` at each fine-tuning step evaluated (each scores file's ``at``:
    "step<N>", or "final", which is the step count of its seed's fine-tuning, read from its loss log)."""
    total = {}
    for f in loss_files:  # one per seed: the last logged step is the last update
        loss = pl.read_parquet(f, columns=["seed", "step"])
        total[int(loss["seed"][0])] = int(loss["step"].max()) + 1
    by_step: dict[int, list] = {}
    for f in score_files:
        head = pl.read_parquet(f, columns=["seed", "at"]).row(0, named=True)
        step = total[head["seed"]] if head["at"] == "final" else int(head["at"].removeprefix("step"))
        by_step.setdefault(step, []).append(f)
    parts = [macondo(files).with_columns(pl.lit(step).alias("step")) for step, files in sorted(by_step.items())]
    return pl.concat(parts).filter(pl.col("children") != "item mean").select("step", pl.exclude("step"))


def hurdle(files, column: str) -> pl.DataFrame:
    """Mean and std over seeds of ``column`` per (variant, step)."""
    df = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    return (
        df.group_by("variant", "step")
        .agg(pl.col(column).mean().alias(column), pl.col(column).std().alias("std"), pl.len().alias("seeds"))
        .sort("variant", "step")
    )


# --------------------------------------------------------------------------------------------- steps
@step(name="macondo-table")
def macondo_table_step(scores: list[Path], csv: Path, parquet: Path) -> None:
    """The Table 5 analogue: log-likelihood of the child's name by number of children, over seeds."""
    write_table(macondo(scores), csv, parquet)


@step(name="macondo-curve")
def macondo_curve_step(scores: list[Path], losses: list[Path], csv: Path, parquet: Path) -> None:
    """The log-likelihood by number of children over fine-tuning steps (Figure 1 / Table 5 analogue)."""
    write_table(macondo_curve(scores, losses), csv, parquet)


@step
def hurdle_table(params: dict, scores: list[Path], csv: Path, parquet: Path) -> None:
    """The table of the hurdle curves (Fig. 4 / Fig. 5 analogues): mean and std over seeds per step."""
    write_table(hurdle(scores, params["column"]), csv, parquet)
