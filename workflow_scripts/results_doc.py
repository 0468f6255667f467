"""docs/results.md: the numbers the docs quote, written from ``results/tables/`` so that they cannot drift.

Every table is printed as the pipeline wrote it (rounded for reading); the prose in docs/ refers to it instead
of typing numbers. ``snakemake --cores 1 results_doc`` regenerates it after a run.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .artifacts import atomic_path
from .cli import step

HEADER = """# Results of the default run

Written by `snakemake --cores 1 results_doc` from `results/tables/` (rule `results_doc`,
`workflow_scripts/results_doc.py`); do not edit by hand. Config: `{config}`. What each table means and how it
compares with the papers: [paper 1](paper1.md), [paper 2](paper2.md).
"""


def markdown(df: pl.DataFrame, digits: int = 3) -> str:
    """A markdown table of ``df``; floats rounded to ``digits`` significant decimals."""

    def cell(v) -> str:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines)


def incontext_rows(df: pl.DataFrame, columns: list[str]) -> pl.DataFrame | None:
    """``columns`` of a summary's rows where in-context retrieval ran (its first ``incontext_`` column filled); None
    for a summary without in-context columns (in-context retrieval not configured)."""
    marker = next(c for c in columns if c.startswith("incontext_"))
    return df.filter(pl.col(marker).is_not_null()).select(columns) if marker in df.columns else None


SECTIONS = {
    "perplexity": (
        "Perplexity: base LM and kNN-LM, (λ, k, σ) chosen on valid",
        lambda df: df.select(c for c in df.columns if not c.startswith("incontext_")),
    ),
    "perplexity_incontext": (
        "Perplexity: in-context retrieval beside the base LM and kNN-LM, over the tokens it scored "
        "(incontext_n_tokens; docs/incontext.md)",
        lambda df: incontext_rows(df, ["eval_set", "datastore", "n_tokens", "base_ppl", "knn_ppl", "incontext_n_tokens",
                                       "incontext_base_ppl", "incontext_knn_ppl", "incontext_ppl",
                                       "incontext_ppl_lo", "incontext_ppl_hi"]),
    ),
    "tasks": (
        "Paper 1: tasks, base LM vs kNN-LM at the perplexity-chosen point",
        lambda df: df.select("datastore", "task", "category", "metric", "n", "base", "knn", "delta", "best"),
    ),
    "tasks_incontext": (
        "Tasks: in-context retrieval beside the kNN-LM, over the items it scored (incontext_n; Δ against the base LM "
        "with its 95% bootstrap CI)",
        lambda df: incontext_rows(df, ["datastore", "task", "category", "n", "base", "knn", "delta", "incontext_n",
                                       "incontext_base", "incontext", "incontext_delta", "incontext_lo",
                                       "incontext_hi"]),
    ),
    "macondo": (
        "Paper 2: Macondo, mean log-likelihood of the child's name by number of children (mean over seeds)",
        lambda df: df.select("children", "lm", "knn_lm", "knn_lm_literal", "mlp_lm", "perfect", "seeds"),
    ),
    "macondo_curve": (
        "Paper 2: Macondo over fine-tuning steps (mean over seeds)",
        lambda df: df.select("step", "children", "lm", "knn_lm", "knn_lm_literal", "mlp_lm", "perfect"),
    ),
    "projection": (
        "Paper 2: Eq. 2 projection",
        lambda df: df.select("point", "run", "space", "n_positions", "ppl", "word_ppl", "kl"),
    ),
    "mlp": (
        "Paper 2: MLP in place of kNN retrieval (perplexity)",
        lambda df: df.select("eval_set", "model", "lambda", "ppl", "word_ppl", "chosen", "storage_ratio"),
    ),
    "comparison": (
        "Paper 2: ours beside the paper's",
        lambda df: df.select("experiment", "quantity", "ours", "paper", "our_setup"),
    ),
    "scaling": (
        "Scaling: kNN-LM perplexity against datastore size, (λ, k, σ) chosen at each size (docs/scaling.md)",
        lambda df: df.select("datastore", "eval_set", "fraction", "datastore_tokens", "base_ppl", "knn_ppl",
                             "knn_ppl_lo", "knn_ppl_hi", "lambda", "k", "sigma", "oracle_ppl", "second_search"),
    ),
    "scaling_task_delta": (
        "Scaling: task Δ = kNN-LM − base LM by category against datastore size (95% bootstrap CI)",
        lambda df: df.filter(pl.col("level") == "category").select(
            "datastore", "category", "fraction", "datastore_tokens", "lambda", "k", "sigma", "delta", "lo", "hi", "n",
            "second_search"),
    ),
    "scaling_fits": (
        "Scaling: log-linear fits of perplexity, slope per decade of datastore tokens (95% CI)",
        lambda df: df.select("datastore", "curve", "group", "n_points", "slope_per_decade", "lo", "hi"),
    ),
    "scaling_task_fits": (
        "Scaling: log-linear fits of task Δ, slope per decade of datastore tokens (95% CI)",
        lambda df: df.select("datastore", "curve", "group", "n_points", "slope_per_decade", "lo", "hi"),
    ),
}


def scaling_answer(task_fits: pl.DataFrame, delta: pl.DataFrame | None = None) -> str:
    """Paper 1's open question, does Δ on reasoning tasks move with datastore size, answered from the fitted slopes
    of the scaling study's category curves: a slope whose 95% interval excludes 0 moves, else no trend is detected."""
    lines = []
    for r in task_fits.filter(pl.col("curve") == "task Δ (category)").sort("group").iter_rows(named=True):
        moves = r["lo"] > 0 or r["hi"] < 0
        verdict = (f"Δ {'rises' if r['slope_per_decade'] > 0 else 'falls'} with datastore size (the interval "
                   "excludes 0)" if moves else "no trend is detected (the interval includes 0)")
        lines.append(f"* datastore {r['datastore']}, {r['group']} tasks: Δ changes by {r['slope_per_decade']:+.4f} "
                     f"per decade of datastore tokens (95% CI [{r['lo']:+.4f}, {r['hi']:+.4f}], "
                     f"{r['n_points']} sizes): {verdict}.")
    return "\n".join(lines)


def write(tables: dict[str, Path | list[Path]], config: str, out) -> str:
    parts = [HEADER.format(config=config)]
    for key, (title, view) in SECTIONS.items():
        source = key.removesuffix("_incontext")  # the in-context sections: other columns of the same summary
        if source in tables:
            paths = tables[source] if isinstance(tables[source], list | tuple) else [tables[source]]
            if not paths:
                continue
            df = view(pl.concat([pl.read_csv(p) for p in paths], how="vertical_relaxed"))
            if df is None:
                continue
            where = ", ".join(f"`{p}`" for p in paths)
            parts.append(f"## {title}\n\n{where}\n\n{markdown(df)}\n")
            if key == "scaling_task_fits":
                parts.append(f"### Does Δ on reasoning tasks move with datastore size? (paper 1's open question)\n\n"
                             f"{scaling_answer(df)}\n")
    text = "\n".join(parts)
    with atomic_path(out, ".md") as tmp:
        Path(tmp).write_text(text)
    return text


@step
def results_doc(
    params: dict,
    out: Path,
    perplexity: Path,
    tasks: Path | None = None,
    macondo: Path | None = None,
    macondo_curve: Path | None = None,
    projection: Path | None = None,
    mlp: Path | None = None,
    comparison: Path | None = None,
    scaling: list[Path] = (),
    scaling_task_delta: list[Path] = (),
    scaling_fits: list[Path] = (),
    scaling_task_fits: list[Path] = (),
) -> None:
    """Write the markdown page of the run's result tables that the docs quote (docs/results.md)."""
    given = {
        "perplexity": perplexity,
        "tasks": tasks,
        "macondo": macondo,
        "macondo_curve": macondo_curve,
        "projection": projection,
        "mlp": mlp,
        "comparison": comparison,
        "scaling": list(scaling),
        "scaling_task_delta": list(scaling_task_delta),
        "scaling_fits": list(scaling_fits),
        "scaling_task_fits": list(scaling_task_fits),
    }
    write({k: v for k, v in given.items() if v is not None}, params.get("config", "config.yaml"), out)
