"""Sweep and tables: perplexity at every (λ, k, σ) from a retrieval cache, and the summary across eval sets.

Protocol (paper 1): the (λ, k, σ) point is chosen on the validation set and applied to the test set; the
oracle best point per eval set is reported beside it. Each datastore chooses on its own set
(``datastores.<name>.select_on``: a Math datastore on Math valid); tasks may pin a point instead (``tasks.points``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from . import knnlm
from .artifacts import ArtifactError, read_table, write_json, write_table
from .cli import step
from .datastore import strided_windows, window_record
from .retrieval_cache import load_cache

# ppl, base_ppl: exp of the mean NLL per token; window_ppl, base_window_ppl: paper 1's run_clm.py aggregation, exp of
# the mean over the eval windows of each window's mean NLL (knnlm.window_perplexity); word_ppl, base_word_ppl: exp of
# the total NLL over the words the scored tokens spell (n_words, by the eval set's word_count convention)
COLUMNS = ["lambda", "k", "sigma", "ppl", "base_ppl", "n_tokens", "window_ppl", "base_window_ppl", "word_ppl",
           "base_word_ppl", "n_words"]
PINNED = "pinned in config"  # chosen_on of a point that tasks.points pins
METHODS = ("base", "knn", "incontext")  # the in-context perplexity table's (incontext.py)


def run_sweep(cache_dir, manifest_json, grid: dict, csv, parquet, tokens_npy=None) -> pl.DataFrame:
    """The grid's perplexities from one cache, checked against its datastore and (``tokens_npy``) its eval set; with
    the eval set's ``block_size`` (and ``stride``) in ``grid``, against its windows, and paper 1's per-window
    perplexity (``window_ppl``) beside the per-token one."""
    c = load_cache(cache_dir, manifest_json, tokens_npy=tokens_npy)
    too_big = [k for k in grid["ks"] if k > c["meta"]["K"]]
    if too_big:
        raise ValueError(f"sweep.ks {too_big} exceed the {c['meta']['K']} neighbours cached in {cache_dir}")
    block, stride = grid.get("block_size"), grid.get("stride")  # the eval set's windows (the rule passes them)
    want = window_record(block, stride).get("window") if block else None
    if c["meta"].get("window") != want:
        raise ArtifactError(
            f"{cache_dir}: queries computed in windows {c['meta'].get('window', 'of non-overlapping blocks')}, but the "
            f"eval set asks for {want or 'non-overlapping blocks'} (stride {stride}); rerun retrieve for it "
            f"(snakemake --forcerun {Path(cache_dir) / 'meta.json'})"
        )
    starts = [a for _, a, _ in strided_windows(0, c["meta"]["n_tokens"], block, stride)] if block else None
    convention = grid.get("word_count")  # the eval set's (the rule passes it)
    if convention and convention not in c["meta"].get("words", {}):
        raise ArtifactError(f"{cache_dir}: meta.json has no {convention!r} word count of its tokens (written before "
                            f"word counts, or edited); rerun retrieve for it (snakemake --forcerun "
                            f"{Path(cache_dir) / 'meta.json'})")
    n_words = c["meta"]["words"][convention] if convention else None
    rows = knnlm.sweep(c["dists"], c["vals"], c["targets"], c["lm_logprob"], grid["lambdas"], grid["ks"],
                       grid["sigmas"], starts, n_words)
    columns = COLUMNS[:6] + (COLUMNS[6:8] if block else []) + (COLUMNS[8:10] if convention else [])
    df = pl.DataFrame(rows).select(columns).sort(["lambda", "k", "sigma"])
    if convention:
        df = df.with_columns(n_words=pl.lit(n_words, pl.Int64))
    write_table(df, csv, parquet)
    return df


def summarize_sweeps(
    sweeps: dict[tuple[str, str], str], select_on: str | dict[str, str], csv, parquet
) -> pl.DataFrame:
    """One row per (eval set, datastore): base ppl, the kNN-LM at the point chosen on the datastore's selection
    set, the oracle. ``select_on``: one eval set for every datastore, or datastore -> eval set; a datastore whose
    set has no sweep ('' or absent) is chosen on each eval set itself."""
    df = summarize_frames({key: read_table(path) for key, path in sweeps.items()}, select_on)
    write_table(df, csv, parquet)
    return df


def summarize_frames(frames: dict[tuple[str, str], pl.DataFrame], select_on: str | dict[str, str]) -> pl.DataFrame:
    """``summarize_sweeps`` on sweep tables in memory ((eval set, datastore) -> table); the scaling study calls it
    once per datastore fraction."""
    rows = []
    for (evalset, datastore), df in frames.items():
        best = df.sort(["ppl", "lambda", "k", "sigma"]).row(0, named=True)
        on = select_on if isinstance(select_on, str) else select_on.get(datastore, "")
        sel_df = frames.get((on, datastore))
        chosen = (
            sel_df.sort(["ppl", "lambda", "k", "sigma"]).row(0, named=True) if sel_df is not None else best
        )
        at = df.filter(
            (pl.col("lambda") == chosen["lambda"])
            & (pl.col("k") == chosen["k"])
            & (pl.col("sigma") == chosen["sigma"])
        ).row(0, named=True)
        rows.append(
            {
                "eval_set": evalset,
                "datastore": datastore,
                "n_tokens": best["n_tokens"],
                "base_ppl": best["base_ppl"],
                "knn_ppl": at["ppl"],
                "lambda": at["lambda"],
                "k": at["k"],
                "sigma": at["sigma"],
                "chosen_on": on if sel_df is not None else evalset,
                "oracle_ppl": best["ppl"],
                "oracle_lambda": best["lambda"],
                "oracle_k": best["k"],
                "oracle_sigma": best["sigma"],
                **({"base_window_ppl": best["base_window_ppl"], "knn_window_ppl": at["window_ppl"]}
                   if "window_ppl" in df.columns else {}),
                **({"base_word_ppl": best["base_word_ppl"], "knn_word_ppl": at["word_ppl"], "n_words": best["n_words"]}
                   if "word_ppl" in df.columns else {}),
            }
        )
    return pl.DataFrame(rows).sort(["datastore", "eval_set"])


def chosen_point(summary_csv, datastore: str, pinned=None):
    """(λ, k, σ) for ``datastore`` and where it comes from: ``pinned`` (tasks.points) when given, else the point
    chosen on perplexity (on the datastore's selection set, as ``summarize``'s table records it)."""
    if pinned is not None:
        lam, k, sigma = pinned
        return (float(lam), int(k), float(sigma)), PINNED
    if isinstance(summary_csv, pl.DataFrame):  # a summary in memory (the scaling study's, at one fraction)
        df = summary_csv.filter(pl.col("datastore") == datastore)
    elif not summary_csv or not Path(summary_csv).exists():
        return None, None
    else:
        df = read_table(summary_csv).filter(pl.col("datastore") == datastore)
    if df.is_empty():
        return None, None
    picked = df.filter(pl.col("chosen_on") != pl.col("eval_set"))
    r = (picked if not picked.is_empty() else df).row(0, named=True)
    return (float(r["lambda"]), int(r["k"]), float(r["sigma"])), f"perplexity on {r['chosen_on']}"


# the perplexity summary's columns of in-context retrieval (column -> the in-context perplexity table's method and
# field): the tokens it scored (incontext.max_tokens: fewer than n_tokens), the base LM's and the kNN-LM's perplexity
# over those same tokens, in-context retrieval's with the table's 95% block-bootstrap interval
INCONTEXT_COLUMNS = {"incontext_n_tokens": ("incontext", "n_tokens", pl.Int64),
                     "incontext_base_ppl": ("base", "ppl", pl.Float64),
                     "incontext_knn_ppl": ("knn", "ppl", pl.Float64),
                     "incontext_ppl": ("incontext", "ppl", pl.Float64),
                     "incontext_ppl_lo": ("incontext", "ppl_lo", pl.Float64),
                     "incontext_ppl_hi": ("incontext", "ppl_hi", pl.Float64)}


def method_columns(summary: pl.DataFrame, table: pl.DataFrame, keys: list[str], columns: dict, name,
                   rule: str) -> pl.DataFrame:
    """``summary`` with one column per entry of ``columns`` (column -> (method, field, dtype)): the ``field`` of
    ``table``'s row of that ``method`` with the summary row's ``keys``, null where ``table`` has none (a datastore
    in-context retrieval did not run on). The summary's own columns and rows are unchanged. A table row of keys the
    summary lacks, keys without every method or with one twice, is refused naming ``name`` (the table's file) and
    ``rule``."""
    rows: dict[tuple, dict] = {}
    rerun = f"rerun {rule} (snakemake --forcerun {name})"
    for r in table.iter_rows(named=True):
        mine = rows.setdefault(tuple(r[k] for k in keys), {})
        if r["method"] in mine:
            raise ArtifactError(f"{name}: two rows of {tuple(r[k] for k in keys)}, method {r['method']!r}; {rerun}")
        mine[r["method"]] = r
    have = list(zip(*(summary[k] for k in keys), strict=True))
    unknown = sorted(set(rows) - set(have))
    if unknown:
        raise ArtifactError(f"{name}: {tuple(keys)} {unknown} not in the summary it is put beside; {rerun}")
    methods = {m for m, _, _ in columns.values()}
    incomplete = sorted(k for k, v in rows.items() if not methods <= set(v))
    if incomplete:
        raise ArtifactError(f"{name}: {incomplete} lack a method of {sorted(methods)}; {rerun}")
    return summary.with_columns(pl.Series(c, [rows[k][m][f] if k in rows else None for k in have], dtype=t)
                                for c, (m, f, t) in columns.items())


# --------------------------------------------------------------------------------------------- steps
@step
def sweep(params: dict, cache: Path, manifest: Path, tokens: Path, csv: Path, parquet: Path) -> None:
    """Perplexity at every (λ, k, σ) of the grid by rescoring one retrieval cache (--cache: its meta.json) of the
    eval set whose --tokens it was built from."""
    run_sweep(cache.parent, manifest, params, csv, parquet, tokens)


@step
def verify_tables(tables: list[Path], out: Path) -> None:
    """Check tables as their consumer reads them (``read_table``: readable, each against the sha256 its parquet
    records) and write a marker (--out) naming them. A job before the consumer: when the check fails, Snakemake
    does not start the consumer, which would remove its own tables first."""
    write_json(out, {"checked": "tables", "tables": {str(t): read_table(t).height for t in tables}})


@step
def summarize(params: dict, sweeps: list[Path], csv: Path, parquet: Path) -> None:
    """The chosen points' table (results/sweeps/summary.csv, what later stages read the point from): base LM and
    kNN-LM per (eval set, datastore), (λ, k, σ) chosen on each datastore's selection set (params.select_on:
    datastore -> eval set)."""
    keys = [tuple(k) for k in params["keys"]]
    summarize_sweeps(dict(zip(keys, sweeps, strict=True)), params["select_on"], csv, parquet)


@step(name="perplexity-summary")
def perplexity_summary(summary: Path, csv: Path, parquet: Path, incontext: Path | None = None) -> None:
    """The perplexity summary: the chosen points' table (--summary, summarize's), with in-context retrieval's
    perplexity beside it (--incontext: the in-context perplexity table, when in-context retrieval ran); both read
    checked against the sha256 they were written with."""
    df = read_table(summary)
    if incontext is not None:
        df = method_columns(df, read_table(incontext), ["eval_set", "datastore"], INCONTEXT_COLUMNS, incontext,
                            "incontext_perplexity_table")
    write_table(df, csv, parquet)
