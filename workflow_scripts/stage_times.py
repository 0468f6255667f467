"""Per-stage wall time and peak memory, collected from the ``benchmark:`` files every rule writes."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .artifacts import write_table
from .cli import step


def collect(bench_dir, csv, parquet) -> pl.DataFrame:
    """One row per job (rule, wildcards) and one total row per rule: seconds and peak RSS in MB."""
    bench_dir = Path(bench_dir)
    rows = []
    for f in sorted(bench_dir.rglob("*.tsv")):
        rel = f.relative_to(bench_dir).with_suffix("")
        b = pl.read_csv(f, separator="\t").row(-1, named=True)  # the last repeat, if any
        rows.append(
            {
                "rule": rel.parts[0],
                "job": "/".join(rel.parts[1:]),
                "seconds": float(b["s"]),
                "max_rss_mb": float(b["max_rss"]) if b["max_rss"] not in (None, "NA", "-") else None,
            }
        )
    if not rows:
        raise ValueError(f"no benchmark files under {bench_dir}")
    jobs = pl.DataFrame(rows)
    totals = (
        jobs.group_by("rule")
        .agg(pl.lit("(all jobs)").alias("job"), pl.col("seconds").sum(), pl.col("max_rss_mb").max())
        .select(jobs.columns)
    )
    df = pl.concat([jobs, totals]).sort(["rule", "job"])
    write_table(df, csv, parquet)
    return df


@step
def stage_times(benchmarks: Path, csv: Path, parquet: Path) -> None:
    """Per-stage wall time and peak memory from every job's benchmark file (run last)."""
    collect(benchmarks, csv, parquet)
