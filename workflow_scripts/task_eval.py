"""Task stages: score a task against a datastore, sweep the λ/k/σ grid, and the report's tables and figure.

Per (datastore, task) — the datastore names its model — ``score_task`` writes ``scored.npz`` + ``scored.json``
(teacher-forced kinds: the task's retrieval cache; generate: the decoded answers at the base LM, at the point
chosen on perplexity and, with ``tasks.generate.points: grid``, at every grid point), and ``task_sweep`` writes
the metric at every point, the per-item predictions and a one-row summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import polars as pl

from . import lm, scoring
from .artifacts import ArtifactError, atomic_path, load_npy, read_json, write_json, write_table
from .tasks import TEXT_METRICS, read_items

log = logging.getLogger(__name__)
N_SHOWN = 8  # neighbour ids kept per item in predictions.parquet


def chosen_point(summary_csv, datastore: str):
    """(λ, k, σ) chosen on perplexity for ``datastore`` (the valid-set choice of perplexity_summary.csv)."""
    if not summary_csv or not Path(summary_csv).exists():
        return None, None
    df = pl.read_csv(summary_csv).filter(pl.col("datastore") == datastore)
    if df.is_empty():
        return None, None
    picked = df.filter(pl.col("chosen_on") != pl.col("eval_set"))
    r = (picked if not picked.is_empty() else df).row(0, named=True)
    return (float(r["lambda"]), int(r["k"]), float(r["sigma"])), f"perplexity on {r['chosen_on']}"


def _search(index, ds, K: int, exact: bool):
    from .retrieval import search

    def fn(q):
        d, i = search(index, ds, np.ascontiguousarray(q, dtype=np.float32), K, exact)
        return d, ds.gather_vals(i), i

    return fn


def score_task(
    identity_json, manifest_json, index_path, index_meta, items_parquet, p: dict, outdir, summary_csv=None, threads=1
) -> dict:
    """Run the datastore's model over a task, retrieving at every scored position; write the task's cache."""
    from .retrieval import open_retriever

    outdir = Path(outdir)
    entry, t0 = p["entry"], time.time()
    model, tok, ident, ds, index, imeta = open_retriever(
        identity_json, manifest_json, index_path, index_meta, p, threads
    )
    K = p["k_max"]
    search_fn = _search(index, ds, K, imeta["exact"])
    items = read_items(items_parquet)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    meta = {"task": p["task"], "kind": entry["kind"], "K": K, "n_items": len(items), "manifest_sha256": ds.hash}
    if entry["kind"] in ("classify", "choice"):
        seqs, starts, struct = scoring.build_pairs(items, encode, bos, p["block_size"])
        cache = scoring.score_cache(model, ident["hook_point"], seqs, starts, search_fn, p["batch_size"], "score")
        cache["pair_len"] = np.asarray([len(s) - st for s, st in zip(seqs, starts, strict=True)], np.int64)
        meta.update(n_pairs=len(seqs), n_tokens=int(cache["t_pair"].size), n_queries=int(len(cache["q_dists"])))
        record = {"meta": meta, "items": [{k: it[k] for k in ("options", "domain", "gold")} for it in struct]}
    else:
        gcfg = p["generate"]
        max_new = int(entry.get("max_new_tokens", gcfg["max_new_tokens"]))
        stops = entry.get("stop", ["\n"])
        prompts = [([bos] + encode(it["context"]))[-(p["block_size"] - max_new) :] for it in items]
        chosen, _ = chosen_point(summary_csv, p["datastore"])
        points = [None]
        if gcfg["points"] == "grid":
            g = p["grid"]
            points += [(float(lam), int(k), float(s)) for s in g["sigmas"] for k in g["ks"] for lam in g["lambdas"]]
        if chosen is not None and chosen not in points:
            points.append(chosen)
        eos = tok.eos_token_id

        def done(ids):
            return (eos is not None and ids[-1] == eos) or any(s in tok.decode(ids) for s in stops)

        res = scoring.greedy_generate(
            model,
            ident["hook_point"],
            prompts,
            points,
            search_fn,
            ident["vocab_size"],
            max_new,
            done,
            p["batch_size"],
        )
        record = {
            "meta": meta,
            "points": [
                {
                    "lambda": 0.0 if pt is None else pt[0],
                    "k": None if pt is None else pt[1],
                    "sigma": None if pt is None else pt[2],
                    "texts": [scoring.cut_at_stop(tok.decode(ids, skip_special_tokens=True), stops) for ids in out],
                    "neighbours": res["neighbours"][pt],
                }
                for pt, out in res["outputs"].items()
            ],
        }
        cache = {"generated_points": np.asarray([len(record["points"])])}
    meta["seconds"] = round(time.time() - t0, 2)
    with atomic_path(outdir / "scored.npz", ".npz") as tmp:
        np.savez(tmp, **cache)
    write_json(outdir / "scored.json", record)
    log.info("scored %s in %.1fs", p["task"], time.time() - t0)
    return meta


# --------------------------------------------------------------------------------------------- sweep
def _order(r):
    return (-r["score"], r["lambda"], r["k"], r["sigma"])


def task_sweep(scored_dir, items_parquet, p: dict, summary_csv, out_stem) -> dict:
    """The task's metric at every (λ, k, σ), the base LM, the best point and the point chosen on perplexity."""
    entry, scored_dir, out_stem = p["entry"], Path(scored_dir), Path(out_stem)
    record = read_json(scored_dir / "scored.json")
    items = read_items(items_parquet)
    if len(items) != record["meta"]["n_items"]:
        raise ArtifactError(f"{scored_dir}: scored {record['meta']['n_items']} items, {items_parquet} has {len(items)}")
    chosen, chosen_on = chosen_point(summary_csv, p["datastore"])
    rows, per_item = [], {}
    if entry["kind"] in ("classify", "choice"):
        with np.load(scored_dir / "scored.npz", allow_pickle=False) as z:
            cache = {k: z[k] for k in z.files}
        struct = record["items"]
        gold = np.asarray([it["gold"] for it in struct])
        n_pairs = int(cache["pair_len"].size)
        base_pred = scoring.predict(
            entry, struct, scoring.pair_logprobs(cache["t_lm"], cache["t_pair"], n_pairs), cache["pair_len"]
        )
        base = float(np.mean(base_pred == gold))
        per_item[None] = (base_pred == gold).astype(float), base_pred
        g = p["grid"]
        for point, tlp in scoring.token_logprobs_over_grid(cache, g["lambdas"], g["ks"], g["sigmas"]):
            pred = scoring.predict(
                entry, struct, scoring.pair_logprobs(tlp, cache["t_pair"], n_pairs), cache["pair_len"]
            )
            per_item[point] = (pred == gold).astype(float), pred
            rows.append({"lambda": point[0], "k": point[1], "sigma": point[2], "score": float(np.mean(pred == gold))})
        # neighbours of the first scored token of each item's gold answer
        _, first_tok = np.unique(cache["t_pair"], return_index=True)
        neigh = [
            cache["q_ids"][cache["t_row"][first_tok[it["options"][it["gold"]][0]]]][:N_SHOWN].tolist() for it in struct
        ]

        def shown(pred):
            return [items[i]["labels"][int(j)] for i, j in enumerate(pred)]
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
                rows.append({"lambda": point[0], "k": point[1], "sigma": point[2], "score": float(sc.mean())})
        base = float(per_item[None][0].mean())

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
    sweep = pl.DataFrame(rows, schema={"lambda": pl.Float64, "k": pl.Int64, "sigma": pl.Float64, "score": pl.Float64})
    sweep = (
        sweep.with_columns(
            pl.lit(p["task"]).alias("task"),
            pl.lit(entry["metric"]).alias("metric"),
            pl.lit(base).alias("base"),
            pl.lit(n).alias("n"),
        )
        .select(["task", "metric", "lambda", "k", "sigma", "score", "base", "n"])
        .sort(["lambda", "k", "sigma"])
    )
    write_table(sweep, out_stem)
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
    with atomic_path(out_stem.parent / "predictions.parquet", ".parquet") as tmp:
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
        "knn": float(knn_scores.mean()),
        "lambda": None if chosen is None else chosen[0],
        "k": None if chosen is None else chosen[1],
        "sigma": None if chosen is None else chosen[2],
        "chosen_on": chosen_on,
        "best": best["score"],
        "best_lambda": best["lambda"],
        "best_k": best["k"],
        "best_sigma": best["sigma"],
    }
    write_json(out_stem.parent / "summary.json", summary)
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


def task_summary(summary_jsons, out_stem) -> pl.DataFrame:
    """One row per (datastore, task): base LM, kNN-LM at the perplexity-chosen point, the best grid point."""
    rows = [read_json(f) for f in summary_jsons]
    df = pl.DataFrame(rows, infer_schema_length=None).with_columns((pl.col("knn") - pl.col("base")).alias("delta"))
    df = df.select(SUMMARY_COLUMNS).sort(["datastore", "category", "task"])
    write_table(df, out_stem)
    return df


# --------------------------------------------------------------------------------------------- report
def bootstrap_delta(base, knn, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """Mean of knn − base over items, with a paired percentile bootstrap interval."""
    diff = np.asarray(knn, np.float64) - np.asarray(base, np.float64)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(diff.mean()), float(lo), float(hi)


def figure_tasks(prediction_files, title: str, png, pdf, seed: int = 0) -> None:
    """Δ = kNN-LM − base LM per task (at the perplexity-chosen point), grouped by category, 95% bootstrap CIs."""
    from .figures import plt, save

    df = pl.concat([pl.read_parquet(f) for f in prediction_files], how="vertical_relaxed")
    rows = []
    for (task, category), g in df.group_by(["task", "category"], maintain_order=True):
        m, lo, hi = bootstrap_delta(g["base_score"].to_numpy(), g["knn_score"].to_numpy(), seed=seed)
        rows.append((category, task, m, lo, hi))
    rows.sort(key=lambda r: (r[0], r[1]))
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


def task_examples(prediction_files, tokens_npy, identity_json, p: dict, out_stem) -> pl.DataFrame:
    """Reasoning items the kNN-LM got right and the base LM did not, with their top retrieved neighbours: the
    datastore text up to the neighbour's row (global row r is the key at position r of the training token
    stream, whose value is token r + 1)."""
    from transformers import AutoTokenizer

    ident = lm.load_identity(identity_json)
    tok = AutoTokenizer.from_pretrained(
        ident["path"], revision=ident.get("revision"), trust_remote_code=ident.get("trust_remote_code", False)
    )
    tokens = load_npy(tokens_npy, mmap=True, dtype=np.int32, ndim=1)
    window, per_task, n_neigh = p.get("window", 24), p.get("items_per_task", 5), p.get("neighbours", 4)
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
    write_table(df, out_stem)
    return df
