"""Task Δ against datastore size: paper 1's open question (does a larger datastore help reasoning?) from one scoring.

For each fraction f of the scaling study (``workflow_scripts/scaling.py``), each teacher-forced task cache
(``scored.npz``: K_max neighbours and the query of every distinct scored position) is subsampled after retrieval as
the perplexity caches are: the first k cached neighbours with u(row) < f, queries short of k searched again in the
subset. The task is then scored by ``evaluate.sweep_task`` itself at the point chosen on perplexity at that size
(or the one ``tasks.points`` pins), so its metric is the task sweep's. Δ = kNN-LM − base LM per task with a 95%
paired bootstrap interval (``evaluate.bootstrap_delta``); per category (memory, reasoning) the mean of its tasks' Δ,
and the log-linear fit of each curve, with intervals from one bootstrap over items shared by every fraction.
Generate tasks decode with the neighbours of every step and are not subsampled (listed as such in the log).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from .. import scaling
from ..artifacts import ArtifactError, sha256_file, write_json, write_table
from ..cli import step
from ..datastore import Datastore
from ..sweep import chosen_point
from .evaluate import bootstrap_delta, check_task_cache, sweep_task

log = logging.getLogger(__name__)


def _subset_cache(cache: dict, keep, need: int, search_subset, ds: Datastore, where) -> tuple[dict, int]:
    """The task cache on a subset: every query's first ``need`` subset neighbours; (cache, queries searched again)."""
    if "q_keys" not in cache or cache["q_ids"].shape[1] != cache["q_dists"].shape[1]:
        raise ArtifactError(
            f"{where}: written before task caches kept every neighbour's datastore row and the queries (q_ids, "
            f"q_keys), which the scaling study needs; rerun score_task for it (snakemake --forcerun {where})"
        )
    d, ids, searched = scaling.subsample_neighbours(cache["q_dists"], cache["q_ids"], cache["q_keys"], keep, need,
                                                    search_subset)
    return {**cache, "q_dists": d, "q_vals": ds.gather_vals(ids), "q_ids": ids}, int(searched.sum())


def item_scores(cache: dict, record: dict, items_parquet, p: dict, point, tmp: Path) -> tuple[np.ndarray, np.ndarray]:
    """(base, kNN-LM) per-item scores of a task cache at one (λ, k, σ), by ``evaluate.sweep_task`` itself."""
    npz, rec = tmp / "scored.npz", tmp / "scored.json"
    np.savez(npz, **cache)
    write_json(rec, {**record, "meta": {**record["meta"], "npz_sha256": sha256_file(npz)}})
    lam, k, sigma = point
    q = {**p, "grid": {"lambdas": [lam], "ks": [k], "sigmas": [sigma]}, "point": [lam, k, sigma]}
    sweep_task(npz, rec, items_parquet, q, None, tmp / "s.csv", tmp / "s.parquet", tmp / "pred.parquet",
               tmp / "summary.json")
    pred = pl.read_parquet(tmp / "pred.parquet")
    return pred["base_score"].to_numpy(), pred["knn_score"].to_numpy()


def scale_tasks(caches: list[tuple[Path, Path, Path]], manifest_json, index_path, index_meta, perplexity_parquet,
                p: dict, out: dict) -> dict:
    """Δ per (task, fraction) and per (category, fraction), with CIs, and the log-linear fits of the Δ curves."""
    from ..index import load_index

    ds = Datastore(manifest_json)
    ppl = pl.read_parquet(perplexity_parquet)
    fracs = sorted(ppl["fraction"].unique().to_list())
    seed, n_boot = int(p["seed"]), int(p["n_boot"])
    tasks = []
    for npz, scored_json, items in caches:
        record, item_rows = check_task_cache(npz, scored_json, items, manifest_json=manifest_json)
        entry = p["entries"][record["meta"]["task"]]
        if entry["kind"] == "generate":
            log.info("%s: a generate task decodes with each step's neighbours; not subsampled", record["meta"]["task"])
            continue
        with np.load(npz, allow_pickle=False) as z:
            tasks.append((record, {k: z[k] for k in z.files}, items, entry, npz))
    index, exact = None, None
    rows, scores = [], {}  # scores: (task, fraction) -> (base, knn) per item
    for f in fracs:
        at = ppl.filter(pl.col("fraction") == f)
        point, chosen_on = chosen_point(at, p["datastore"], p.get("point"))
        tokens = int(at["datastore_tokens"][0])
        subset = scaling.subset_rows(ds.rows, f, int(p["scaling_seed"]))
        if exact is None:
            index, imeta = load_index(index_path, index_meta, ds, p.get("nprobe"))
            exact = imeta["exact"]
        search_subset = scaling.SubsetSearch(ds, subset, index, exact, p.get("distances") or "exact", p.get("nprobe"))

        def keep(i, f=f):
            return scaling.in_subset(int(p["scaling_seed"]), f, i)

        for record, cache, items, entry, npz in tasks:
            task = record["meta"]["task"]
            sub, n_again = _subset_cache(cache, keep, point[1], search_subset, ds, npz)
            with tempfile.TemporaryDirectory() as tmp:
                tp = {"task": task, "entry": entry, "datastore": p["datastore"], "model": p["model"]}
                base, knn = item_scores(sub, record, items, tp, point, Path(tmp))
            scores[task, f] = base, knn
            m, lo, hi = bootstrap_delta(base, knn, n_boot=n_boot, seed=seed)
            rows.append({"datastore": p["datastore"], "group": task, "level": "task", "category": entry["category"],
                         "fraction": f, "datastore_tokens": tokens, "lambda": point[0], "k": point[1],
                         "sigma": point[2], "chosen_on": chosen_on, "base": float(base.mean()),
                         "knn": float(knn.mean()), "delta": m, "lo": lo, "hi": hi, "n": int(base.size),
                         "second_search": n_again, "n_queries": int(len(cache["q_dists"]))})
    # one bootstrap over items, shared by every fraction: per category the mean of its tasks' Δ, and the fits
    rng = np.random.default_rng(seed)
    names = sorted({t for t, _ in scores})
    draws = {t: rng.integers(0, scores[t, fracs[0]][0].size, size=(n_boot, scores[t, fracs[0]][0].size))
             for t in names}
    boot = {t: np.stack([(scores[t, f][1] - scores[t, f][0])[draws[t]].mean(axis=1) for f in fracs], axis=1)
            for t in names}  # [B, F]
    category = {r["group"]: r["category"] for r in rows}
    x = np.asarray([ppl.filter(pl.col("fraction") == f)["datastore_tokens"][0] for f in fracs], np.float64)
    curves = {t: ("task", category[t], boot[t], [np.mean(scores[t, f][1] - scores[t, f][0]) for f in fracs])
              for t in names}
    for cat in sorted(set(category.values())):
        members = [t for t in names if category[t] == cat]
        b = np.mean([boot[t] for t in members], axis=0)
        est = np.mean([curves[t][3] for t in members], axis=0)
        curves[cat] = ("category", cat, b, list(est))
        for j, f in enumerate(fracs):
            lo, hi = np.quantile(b[:, j], [0.025, 0.975])
            first = next(r for r in rows if r["group"] == members[0] and r["fraction"] == f)
            rows.append({**{k: first[k] for k in ("datastore", "fraction", "datastore_tokens", "lambda", "k", "sigma",
                                                   "chosen_on")},
                         "group": cat, "level": "category", "category": cat,
                         "base": float(np.mean([scores[t, f][0].mean() for t in members])),
                         "knn": float(np.mean([scores[t, f][1].mean() for t in members])),
                         "delta": float(est[j]), "lo": float(lo), "hi": float(hi),
                         "n": int(sum(scores[t, f][0].size for t in members)),
                         "second_search": int(sum(r["second_search"] for r in rows if r["group"] in members
                                                  and r["fraction"] == f)),
                         "n_queries": int(sum(r["n_queries"] for r in rows if r["group"] in members
                                              and r["fraction"] == f))})
    fits = []
    for name, (level, _, b, est) in curves.items():
        if len(fracs) < 2:
            break
        slope, icpt = scaling.loglinear_fit(x, np.asarray(est))
        lo, hi = np.quantile(scaling.loglinear_fit(x, b)[0], [0.025, 0.975])
        fits.append({"datastore": p["datastore"], "curve": f"task Δ ({level})", "group": name, "n_points": len(fracs),
                     "slope_per_decade": float(slope), "lo": float(lo), "hi": float(hi), "intercept": float(icpt),
                     "ci": f"paired bootstrap over items, shared by every fraction ({n_boot} replicates)"})
    delta = pl.DataFrame(rows).sort(["level", "category", "group", "fraction"], descending=[True, False, False, False])
    tables = {"delta": delta, "fits": pl.DataFrame(fits, schema=scaling.FIT_SCHEMA)}
    for name, df in tables.items():
        write_table(df, out[name + "_csv"], out[name + "_parquet"])
    return tables


@step
def scaling_tasks(
    params: dict, npz: list[Path], scored_json: list[Path], task_items: list[Path], manifest: Path, index: Path,
    index_meta: Path, perplexity: Path, delta_csv: Path, delta_parquet: Path, fits_csv: Path, fits_parquet: Path,
    threads: int = 1,
) -> None:
    """Task Δ = kNN-LM − base LM at every fraction of a datastore (--perplexity: the scaling study's table, whose
    point chosen at each size is used), per task and category, with 95% bootstrap CIs and log-linear fits."""
    import faiss

    faiss.omp_set_num_threads(threads)
    caches = list(zip(npz, scored_json, task_items, strict=True))
    out = {"delta_csv": delta_csv, "delta_parquet": delta_parquet, "fits_csv": fits_csv, "fits_parquet": fits_parquet}
    scale_tasks(caches, manifest, index, index_meta, perplexity, params, out)
