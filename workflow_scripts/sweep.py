"""Sweep and tables: perplexity at every (λ, k, σ) from a retrieval cache, and the summary across eval sets.

Protocol (paper 1): the (λ, k, σ) point is chosen on the validation set and applied to the test set; the
oracle best point per eval set is reported beside it.
"""

from __future__ import annotations

import polars as pl

from . import knnlm
from .artifacts import write_table
from .retrieval import load_cache

COLUMNS = ["lambda", "k", "sigma", "ppl", "base_ppl", "n_tokens"]


def run_sweep(cache_dir, manifest_json, grid: dict, out_stem) -> pl.DataFrame:
    c = load_cache(cache_dir, manifest_json)
    too_big = [k for k in grid["ks"] if k > c["meta"]["K"]]
    if too_big:
        raise ValueError(f"sweep.ks {too_big} exceed the {c['meta']['K']} neighbours cached in {cache_dir}")
    rows = knnlm.sweep(
        c["dists"], c["vals"], c["targets"], c["lm_logprob"], grid["lambdas"], grid["ks"], grid["sigmas"]
    )
    df = pl.DataFrame(rows).select(COLUMNS).sort(["lambda", "k", "sigma"])
    write_table(df, out_stem)
    return df


def summarize(sweeps: dict[tuple[str, str], str], select_on: str, out_stem) -> pl.DataFrame:
    """One row per (eval set, datastore): base ppl, the kNN-LM at the point chosen on ``select_on``, the oracle."""
    frames = {key: pl.read_parquet(path) for key, path in sweeps.items()}
    rows = []
    for (evalset, datastore), df in frames.items():
        best = df.sort(["ppl", "lambda", "k", "sigma"]).row(0, named=True)
        sel_df = frames.get((select_on, datastore))
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
                "chosen_on": select_on if sel_df is not None else evalset,
                "oracle_ppl": best["ppl"],
                "oracle_lambda": best["lambda"],
                "oracle_k": best["k"],
                "oracle_sigma": best["sigma"],
            }
        )
    df = pl.DataFrame(rows).sort(["datastore", "eval_set"])
    write_table(df, out_stem)
    return df
