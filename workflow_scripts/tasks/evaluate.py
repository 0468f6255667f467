"""Task stages after scoring: sweep the λ/k/σ grid, the task table, the Δ table and the qualitative examples.

Per (datastore, task) — the datastore names its model — ``score_task`` (``tasks/scoring.py``) writes
``scored.npz`` + ``scored.json``
(teacher-forced kinds: the task's retrieval cache; generate: the decoded answers at the base LM, at the point
chosen on perplexity and, with ``tasks.generate.points: grid``, at every grid point), and ``task_sweep`` writes
the metric at every point, the per-item predictions and a one-row summary. A task's score is the mean of its
per-item scores, or with ``aggregate: macro`` (BBH) the mean of its subtasks' means (``metrics.aggregate``).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import polars as pl

from ..artifacts import (
    ArtifactError,
    atomic_path,
    load_npy,
    read_json,
    read_table,
    sha256_file,
    write_json,
    write_table,
)
from ..cli import step
from ..sweep import chosen_point, method_columns
from . import rescoring
from .items import read_items
from .metrics import TEXT_METRICS, aggregate

log = logging.getLogger(__name__)
N_SHOWN = 8  # neighbour ids kept per item in predictions.parquet
NO_ANSWER_SHOWN = "(no option scored above -inf)"  # an item's prediction in predictions.parquet when none did


# --------------------------------------------------------------------------------------------- sweep
def _grid_and_pin(over_grid, cache, g: dict, chosen):
    """The grid's points, then a pinned point off the grid (a row of the sweep like the grid's)."""
    points = over_grid(cache, g["lambdas"], g["ks"], g["sigmas"])
    if chosen is not None and not (chosen[0] in g["lambdas"] and chosen[1] in g["ks"] and chosen[2] in g["sigmas"]):
        points = itertools.chain(points, over_grid(cache, *([x] for x in chosen)))
    return points


def _order(r):
    return (-r["score"], r["lambda"], r["k"], r["sigma"])


def check_task_cache(scored_npz, scored_json, items_parquet, task: str | None = None, manifest_json=None):
    """(record, items): a task cache checked against its items (their count) and its record (the npz's sha256,
    which must be there when there is an npz). With ``task``, the record must name it; with ``manifest_json`` (as
    the pipeline's steps read a cache), the record must hold that datastore manifest's hash and the items' sha256:
    a cache of another task or datastore, or of other items, is refused."""
    record = read_json(scored_json)
    meta = record["meta"]
    rerun = f"rerun score_task for it (snakemake --forcerun {scored_json})"
    items = read_items(items_parquet)
    if len(items) != meta["n_items"]:
        raise ArtifactError(
            f"{scored_json}: scored {meta['n_items']} items, {items_parquet} has {len(items)}"
        )
    if scored_npz is not None and meta.get("npz_sha256") is None:
        raise ArtifactError(f"{scored_json}: no npz_sha256 record of {scored_npz} (written by an older version, "
                            f"or edited); {rerun}")
    if scored_npz is not None and sha256_file(scored_npz) != meta["npz_sha256"]:
        raise ArtifactError(
            f"{scored_npz}: sha256 differs from the one recorded in {scored_json} when it was written (the file, "
            f"or the record, was altered since); {rerun}"
        )
    if task is not None and meta.get("task") != task:
        raise ArtifactError(f"{scored_json}: the cache of task {meta.get('task')!r}, read as task {task!r} (caches "
                            f"swapped or copied); {rerun}")
    if manifest_json is not None:
        from ..datastore import manifest_hash

        if meta.get("manifest_sha256") != manifest_hash(manifest_json):
            raise ArtifactError(f"{scored_json}: built from another datastore or version of it than {manifest_json}"
                                f"; {rerun}")
        if meta.get("items_sha256") != sha256_file(items_parquet):
            raise ArtifactError(f"{scored_json}: scored other items than {items_parquet} (items_sha256 "
                                f"{str(meta.get('items_sha256'))[:12]}, the file's {sha256_file(items_parquet)[:12]})"
                                f"; {rerun}")
    return record, items


def sweep_task(
    scored_npz, scored_json, items_parquet, p: dict, summary_csv, csv, parquet, predictions, summary_json,
    manifest_json=None,
) -> dict:
    """The task's metric at every (λ, k, σ), the base LM, the best point and the point chosen on perplexity. The
    cache is checked (``check_task_cache``) against p['task'] and, when given, the datastore's manifest."""
    entry = p["entry"]
    record, items = check_task_cache(scored_npz, scored_json, items_parquet, p.get("task"), manifest_json)
    chosen, chosen_on = chosen_point(summary_csv, p["datastore"], p.get("point"))
    rows, per_item = [], {}
    if entry["kind"] in ("classify", "choice"):
        with np.load(scored_npz, allow_pickle=False) as z:
            cache = {k: z[k] for k in z.files}
        struct = record["items"]
        gold = np.asarray([it["gold"] for it in struct])
        if entry.get("protocol") == "last_token":  # one query per premise: log p at the synonym slots [Q, S]
            q = np.asarray([it["q"] for it in struct], np.int64)
            dq = np.asarray([it["dq"] for it in struct], np.int64)
            classes, pmi = record["classes"], bool(entry.get("pmi"))

            def predict(logp):
                return rescoring.decide(rescoring.last_token_scores(logp, q, dq, classes, pmi))

            base_logp, over_grid = cache["q_lm"], rescoring.last_token_logps_over_grid
            neigh = [cache["q_ids"][i][:N_SHOWN].tolist() for i in q]
        else:  # one log-probability per scored token, summed per (context, continuation) pair
            n_pairs = int(cache["pair_len"].size)
            choose = rescoring.task_predictor(entry, struct, cache["pair_len"])  # the items' layout, built once

            def predict(tlp):
                return choose(rescoring.pair_logprobs(tlp, cache["t_pair"], n_pairs))

            base_logp, over_grid = cache["t_lm"], rescoring.token_logprobs_over_grid
            # neighbours of the first scored token of each item's gold answer
            _, first_tok = np.unique(cache["t_pair"], return_index=True)
            neigh = [
                cache["q_ids"][cache["t_row"][first_tok[it["options"][it["gold"]][0]]]][:N_SHOWN].tolist()
                for it in struct
            ]
        base_pred = predict(base_logp)
        base = float(np.mean(base_pred == gold))
        per_item[None] = (base_pred == gold).astype(float), base_pred
        for point, logp in _grid_and_pin(over_grid, cache, p["grid"], chosen):
            pred = predict(logp)
            per_item[point] = (pred == gold).astype(float), pred
            rows.append({"lambda": point[0], "k": point[1], "sigma": point[2], "score": float(np.mean(pred == gold)),
                         "undecided": int(np.sum(pred == rescoring.NO_ANSWER))})

        def shown(pred):
            return [items[i]["labels"][int(j)] if j != rescoring.NO_ANSWER else NO_ANSWER_SHOWN
                    for i, j in enumerate(pred)]
    else:
        golds = [it["answers"] for it in items]
        fn = TEXT_METRICS[entry["metric"]]
        neigh_at = {}
        for pt in record["points"]:
            point = None if pt["k"] is None else (float(pt["lambda"]), int(pt["k"]), float(pt["sigma"]))
            sc = np.asarray([fn(t, gs) for t, gs in zip(pt["texts"], golds, strict=True)])
            per_item[point] = sc, pt["texts"]
            neigh_at[point] = pt["neighbours"]
            if point is not None:
                score = aggregate(entry, items, sc)
                rows.append({"lambda": point[0], "k": point[1], "sigma": point[2], "score": score, "undecided": 0})
        base = aggregate(entry, items, per_item[None][0])  # mean, or the macro average over subtasks (BBH)

        def shown(pred):
            return list(pred)

    n = len(items)
    best = sorted(rows, key=_order)[0] if rows else {"lambda": 0.0, "k": None, "sigma": None, "score": base}
    if chosen is None or chosen not in per_item:
        chosen, chosen_on = (
            ((best["lambda"], best["k"], best["sigma"]), "task (no perplexity choice)") if rows else (None, "none")
        )
    knn_scores, knn_pred = per_item[chosen]
    if entry["kind"] == "generate":
        neigh = [x or [] for x in neigh_at.get(chosen) or [[]] * n]
    undecided = [r for r in rows if r["undecided"]]
    if undecided:
        log.warning("task %s: %s", p["task"], "; ".join(
            f"{r['undecided']} of {len(items)} items have no option scoring above -inf at λ={r['lambda']:g}, "
            f"k={r['k']}, σ={r['sigma']:g} (counted wrong, column 'undecided')" for r in undecided))
    sweep = pl.DataFrame(rows, schema={"lambda": pl.Float64, "k": pl.Int64, "sigma": pl.Float64, "score": pl.Float64,
                                       "undecided": pl.Int64})
    sweep = (
        sweep.with_columns(
            pl.lit(p["task"]).alias("task"),
            pl.lit(entry["metric"]).alias("metric"),
            pl.lit(base).alias("base"),
            pl.lit(n).alias("n"),
        )
        .select(["task", "metric", "lambda", "k", "sigma", "score", "undecided", "base", "n"])
        .sort(["lambda", "k", "sigma"])
    )
    write_table(sweep, csv, parquet)
    preds = pl.DataFrame(
        {
            "task": [p["task"]] * n,
            "category": [entry["category"]] * n,
            "id": [it["id"] for it in items],
            "question": [it["question"] for it in items],
            "answer": [it["answer"] for it in items],
            "base_pred": [str(x) for x in shown(per_item[None][1])],
            "knn_pred": [str(x) for x in shown(knn_pred)],
            "base_score": per_item[None][0].astype(float),
            "knn_score": knn_scores.astype(float),
            "neighbours": [[int(r) for r in x] for x in neigh],
        },
        schema_overrides={"neighbours": pl.List(pl.Int64)},
    )
    with atomic_path(predictions, ".parquet") as tmp:
        preds.write_parquet(tmp)
    summary = {
        "model": p["model"],
        "datastore": p["datastore"],
        "task": p["task"],
        "category": entry["category"],
        "kind": entry["kind"],
        "metric": entry["metric"],
        "n": n,
        "base": base,
        "knn": aggregate(entry, items, knn_scores),
        "knn_undecided": next((r["undecided"] for r in rows if (r["lambda"], r["k"], r["sigma"]) == chosen), 0),
        "lambda": None if chosen is None else chosen[0],
        "k": None if chosen is None else chosen[1],
        "sigma": None if chosen is None else chosen[2],
        "chosen_on": chosen_on,
        "best": best["score"],
        "best_lambda": best["lambda"],
        "best_k": best["k"],
        "best_sigma": best["sigma"],
    }
    write_json(summary_json, summary)
    return summary


SUMMARY_COLUMNS = [
    "model",
    "datastore",
    "task",
    "category",
    "kind",
    "metric",
    "n",
    "base",
    "knn",
    "delta",
    "lambda",
    "k",
    "sigma",
    "chosen_on",
    "best",
    "best_lambda",
    "best_k",
    "best_sigma",
]


# the task summary's columns of in-context retrieval (column -> the in-context task table's method and field, its
# per-task rows): the items it scored (incontext.max_items: fewer than n), the base LM's score over them, in-context
# retrieval's score and its Δ against the base LM with the 95% paired bootstrap interval (bootstrap_delta, as
# task_delta's for the kNN-LM)
INCONTEXT_COLUMNS = {"incontext_n": ("incontext", "n", pl.Int64), "incontext_base": ("base", "score", pl.Float64),
                     "incontext": ("incontext", "score", pl.Float64),
                     "incontext_delta": ("incontext", "delta", pl.Float64),
                     "incontext_lo": ("incontext", "lo", pl.Float64), "incontext_hi": ("incontext", "hi", pl.Float64)}


def summarize_tasks(summary_jsons, csv, parquet, incontext=None) -> pl.DataFrame:
    """One row per (datastore, task): base LM, kNN-LM at the perplexity-chosen point, the best grid point; with
    ``incontext`` (the in-context task table), in-context retrieval's columns beside them."""
    rows = [read_json(f) for f in summary_jsons]
    df = pl.DataFrame(rows, infer_schema_length=None).with_columns((pl.col("knn") - pl.col("base")).alias("delta"))
    df = df.select(SUMMARY_COLUMNS).sort(["datastore", "category", "task"])
    if incontext is not None:  # its per-task rows; the per-category ones (task "all <category>") stay in its table
        table = read_table(incontext).filter(~pl.col("task").str.starts_with("all "))
        df = method_columns(df, table, ["datastore", "task"], INCONTEXT_COLUMNS, incontext, "incontext_task_table")
    write_table(df, csv, parquet)
    return df


# --------------------------------------------------------------------------------------------- report
def bootstrap_delta(base, knn, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """Mean of knn − base over items, with a paired percentile bootstrap interval."""
    diff = np.asarray(knn, np.float64) - np.asarray(base, np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def delta_table(prediction_files, seed: int = 0) -> pl.DataFrame:
    """Per task, Δ = kNN-LM − base LM at the perplexity-chosen point with its 95% paired bootstrap interval."""
    df = pl.concat([pl.read_parquet(f) for f in prediction_files], how="vertical_relaxed")
    rows = []
    for (task, category), g in df.group_by(["task", "category"], maintain_order=True):
        m, lo, hi = bootstrap_delta(g["base_score"].to_numpy(), g["knn_score"].to_numpy(), seed=seed)
        rows.append({"category": category, "task": task, "delta": m, "lo": lo, "hi": hi, "n": g.height})
    return pl.DataFrame(rows).sort("category", "task")


def group_replicates(diffs: list[np.ndarray], n_boot: int, rng) -> list[np.ndarray]:
    """Bootstrap replicates [n_boot] of each group's mean difference, its items resampled within it (one draw of
    ``rng`` per group, in order: a single group draws as ``bootstrap_delta`` does)."""
    return [d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1) for d in diffs]


def _row(level, category, task, subtask, units: list[float], n: int, reps: list[np.ndarray]) -> dict:
    """A row of the subtask table: Δ the mean of ``units`` (its groups' or tasks' Δ), the interval the 2.5 and 97.5
    percentiles of the mean of their replicates."""
    lo, hi = np.quantile(np.mean(reps, axis=0), [0.025, 0.975])
    return {"level": level, "category": category, "task": task, "subtask": subtask, "delta": float(np.mean(units)),
            "lo": float(lo), "hi": float(hi), "n": n, "groups": len(units)}


SUBTASK_SCHEMA = {"level": pl.Utf8, "category": pl.Utf8, "task": pl.Utf8, "subtask": pl.Utf8, "delta": pl.Float64,
                  "lo": pl.Float64, "hi": pl.Float64, "n": pl.Int64, "groups": pl.Int64}


def subtask_delta_table(prediction_files, item_files, seed: int = 0, n_boot: int = 1000) -> pl.DataFrame:
    """Δ = kNN-LM − base LM at the perplexity-chosen point by subtask, task and category, each with a 95% percentile
    bootstrap interval that resamples items within each subtask (stratified):

    * ``subtask``: the items of one subtask (the item's ``group``: BBH's 27), their mean;
    * ``task``: the mean over the task's subtasks of their means (a task without subtasks is one group: its Δ and
      interval are task_delta's);
    * ``category``: the mean over the category's tasks of their Δ (each task one stratum, drawn independently)."""
    tasks = []
    for pf, itf in zip(prediction_files, item_files, strict=True):
        df, items = pl.read_parquet(pf), read_items(itf)
        if df["id"].to_list() != [it["id"] for it in items]:
            raise ArtifactError(f"{pf}: predictions of other items than {itf}; rerun task_sweep for it "
                                f"(snakemake --forcerun {pf})")
        diff = (df["knn_score"] - df["base_score"]).to_numpy().astype(np.float64)
        groups = [it.get("group") for it in items]
        names = list(dict.fromkeys(groups))
        tasks.append((df["category"][0], df["task"][0], names,
                      [diff[[g == h for h in groups]] for g in names]))
    rows = []
    for category in sorted({c for c, *_ in tasks}):
        mine = sorted((t for t in tasks if t[0] == category), key=lambda t: t[1])
        rng = np.random.default_rng(seed + 1)  # tasks as independent strata of the category
        reps = [np.mean(group_replicates(diffs, n_boot, rng), axis=0) for *_, diffs in mine]
        units = [float(np.mean([d.mean() for d in diffs])) for *_, diffs in mine]
        rows.append(_row("category", category, None, None, units, sum(d.size for *_, ds in mine for d in ds), reps))
        for _, task, names, diffs in mine:
            reps = group_replicates(diffs, n_boot, np.random.default_rng(seed))
            rows.append(_row("task", category, task, None, [d.mean() for d in diffs], sum(d.size for d in diffs),
                             reps))
            if names != [None]:
                rows += [_row("subtask", category, task, str(g), [d.mean()], d.size, [r])
                         for g, d, r in sorted(zip(names, diffs, reps, strict=True), key=lambda x: str(x[0]))]
    return pl.DataFrame(rows, schema=SUBTASK_SCHEMA)


EXAMPLE_COLUMNS = {
    "task": pl.Utf8,
    "id": pl.Utf8,
    "question": pl.Utf8,
    "answer": pl.Utf8,
    "base_pred": pl.Utf8,
    "knn_pred": pl.Utf8,
    "rank": pl.Int64,
    "row": pl.Int64,
    "neighbour_context": pl.Utf8,
    "neighbour_next": pl.Utf8,
}


def examples(prediction_files, tokens_npy, identity_json, p: dict, csv, parquet) -> pl.DataFrame:
    """Reasoning items the kNN-LM got right and the base LM did not, with their top retrieved neighbours: the
    datastore text up to the neighbour's row (global row r is the key at position r of the training token
    stream, whose value is token r + 1)."""
    from .. import lm  # the one step here that needs the tokenizer (and so torch): imported by it alone

    tok = lm.load_tokenizer(lm.load_identity(identity_json))
    tokens = load_npy(tokens_npy, mmap=True, dtype=np.int32, ndim=1)
    window, per_task, n_neigh = p["window"], p["items_per_task"], p["neighbours"]
    rows = []
    for f in prediction_files:
        df = pl.read_parquet(f).filter(
            (pl.col("category") == "reasoning") & (pl.col("knn_score") > pl.col("base_score"))
        )
        for r in df.head(per_task).iter_rows(named=True):
            for rank, row in enumerate(r["neighbours"][:n_neigh]):
                if not 0 <= row < tokens.size - 1:
                    raise ArtifactError(f"neighbour row {row} outside {tokens_npy} ({tokens.size} tokens)")
                ctx = tok.decode(tokens[max(0, row - window + 1) : row + 1].tolist())
                rows.append(
                    {k: r[k] for k in ("task", "id", "question", "answer", "base_pred", "knn_pred")}
                    | {
                        "rank": rank + 1,
                        "row": int(row),
                        "neighbour_context": ctx,
                        "neighbour_next": tok.decode([int(tokens[row + 1])]),
                    }
                )
    df = pl.DataFrame(rows, schema=EXAMPLE_COLUMNS)
    write_table(df, csv, parquet)
    return df


# --------------------------------------------------------------------------------------------- steps
@step
def task_sweep(
    params: dict, npz: Path, scored_json: Path, items: Path, manifest: Path, summary: Path, csv: Path,
    parquet: Path, predictions: Path, summary_json: Path,
) -> None:
    """A task's metric over the λ/k/σ grid, its per-item predictions and its one-row summary."""
    sweep_task(npz, scored_json, items, params, summary, csv, parquet, predictions, summary_json, manifest)


@step
def verify_task_cache(params: dict, npz: Path, scored_json: Path, items: Path, manifest: Path, out: Path) -> None:
    """Check a task cache as the task sweep does (the npz's sha256 against --scored-json, the task params.task,
    the --manifest and the --items it was scored from) and write a marker (--out) naming what was checked. A job
    before task_sweep: when the check fails, Snakemake does not start task_sweep, which would remove its tables
    first."""
    record, _ = check_task_cache(npz, scored_json, items, params["task"], manifest)
    write_json(out, {"checked": "task cache", "npz": str(npz), "scored_json": str(scored_json),
                     "npz_sha256": record["meta"]["npz_sha256"]})


@step
def task_summary(summaries: list[Path], csv: Path, parquet: Path, incontext: Path | None = None) -> None:
    """The task table: base LM vs kNN-LM per (datastore, task), at the perplexity-chosen and the best point; with
    --incontext (the in-context task table, when in-context retrieval ran), in-context retrieval's score and Δ
    beside them, read checked against the sha256 it was written with."""
    summarize_tasks(summaries, csv, parquet, incontext)


@step
def task_delta(params: dict, predictions: list[Path], csv: Path, parquet: Path) -> None:
    """The table of Δ = kNN-LM − base LM per task with 95% bootstrap intervals over items (the figure's rows)."""
    write_table(delta_table(predictions, params["seed"]), csv, parquet)


@step
def task_examples(params: dict, predictions: list[Path], tokens: Path, model_json: Path, csv: Path, parquet: Path):
    """Reasoning items the kNN-LM got right and the base LM did not, with their retrieved neighbours."""
    examples(predictions, tokens, model_json, params, csv, parquet)


@step
def task_subtask_delta(params: dict, predictions: list[Path], items: list[Path], csv: Path, parquet: Path) -> None:
    """Δ = kNN-LM − base LM by subtask (the items' group: BBH's 27), task and category, with stratified 95% bootstrap
    intervals (--params: seed), from each task's --predictions and its --items, in the same order."""
    write_table(subtask_delta_table(predictions, items, params["seed"]), csv, parquet)
