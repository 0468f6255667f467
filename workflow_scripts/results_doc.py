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


SECTIONS = {
    "perplexity": (
        "Perplexity: base LM and kNN-LM, (λ, k, σ) chosen on valid",
        lambda df: df,
    ),
    "tasks": (
        "Paper 1: tasks, base LM vs kNN-LM at the perplexity-chosen point",
        lambda df: df.select("datastore", "task", "category", "metric", "n", "base", "knn", "delta", "best"),
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
}


def write(tables: dict[str, Path], config: str, out) -> str:
    parts = [HEADER.format(config=config)]
    for key, (title, view) in SECTIONS.items():
        if key in tables:
            df = view(pl.read_csv(tables[key]))
            parts.append(f"## {title}\n\n`{tables[key]}`\n\n{markdown(df)}\n")
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
    }
    write({k: v for k, v in given.items() if v is not None}, params.get("config", "config.yaml"), out)
