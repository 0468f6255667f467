"""In-context retrieval on the tasks, beside the kNN-LM (the perplexity side and the passages: ``incontext.py``).

Each item is retrieved with its prompt (``question``: the premise or question the model reads) and the top passage(s)
are put before every context the model reads for it (its premise, each option's context, the domain premise of PMI,
a generate prompt), followed by a newline. The items are then scored by the task's own protocol with the
base LM alone: ``scoring.score_block`` fills a task cache as ``score_task`` does (with no neighbours), and
``evaluate.sweep_task`` reads the per-item scores off it, so the prompts' cutting, verbalizers, PMI and metrics are
the task's. The per-item table joins them with the base LM's and the kNN-LM's scores from the task's
``predictions.parquet``; the table compares the three per task and per category with the paired bootstrap
intervals of ``task_delta``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from .. import memory
from ..artifacts import ArtifactError, sha256_file, write_json, write_table
from ..cli import step
from ..incontext import Passages, read_scored
from .evaluate import bootstrap_delta, sweep_task
from .items import read_items, write_items

log = logging.getLogger(__name__)
SEPARATOR = "\n"  # between the passage(s) and the prompt


def with_passage(item: dict, text: str, sep: str) -> dict:
    """The item with ``text`` + ``sep`` before each context the model reads for it (unchanged for no text)."""
    if not text:
        return item

    def pre(s):
        return None if s is None else text + sep + s

    out = dict(item)
    for key in ("premise", "domain_premise", "context"):
        if key in item:
            out[key] = pre(item[key])
    for key in ("options", "domain"):
        if item.get(key):
            out[key] = [[[pre(c), t] for c, t in opt] for opt in item[key]]
    return out


def _no_neighbours(q):
    """The search of a base-LM-only task cache: no neighbour for any query."""
    n = len(q)
    return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int32), np.zeros((n, 0), np.int64)


def score_incontext(identity_json, passages_meta, ds_tokens_npy, items_parquet, knn_predictions, p: dict,
                    out_npz, out_json, csv, parquet, record_json) -> dict:
    """Score a task's items with their top passage(s) before the prompt; write the task cache (``out_npz``,
    ``out_json``), the per-item table (base LM, kNN-LM, in-context) and its record."""
    from .. import devices
    from ..lm import load_checked
    from .scoring import join_parts, score_block, write_task_cache

    t0 = time.time()
    entry = p["entry"]
    device = p["device"]
    model, tok, ident = load_checked(identity_json, device=device, dtype=devices.model_dtype(device, p["dtype"]),
                                     block_size=p["block_size"])
    passages = Passages(passages_meta, ds_tokens_npy, ident)
    items = read_items(items_parquet)[: p.get("max_items")]  # the first max_items, when set
    knn = pl.read_parquet(knn_predictions).head(len(items))
    if knn["id"].to_list() != [it["id"] for it in items]:
        raise ArtifactError(f"{knn_predictions}: its items are not those of {items_parquet}; rerun task_sweep "
                            f"(snakemake --forcerun {knn_predictions})")
    top = passages.top([it["question"] for it in items], p["passages"])
    texts = [tok.decode(passages.ids(picked)) for picked in top]
    aug = [with_passage(it, t, SEPARATOR) for it, t in zip(items, texts, strict=True)]
    block = memory.task_block(p)
    parts = [score_block(model, tok, ident, entry, aug[i : i + block], _no_neighbours, p, [None])
             for i in range(0, len(aug), block)]
    cache, record = join_parts(entry, parts)
    meta = {"task": p["task"], "kind": entry["kind"], "K": 0, "passages_meta_sha256": passages.digest,
            "items_sha256": sha256_file(items_parquet), **record.pop("meta")}
    write_task_cache(out_npz, out_json, cache, {"meta": meta, **record}, time.time() - t0)
    with tempfile.TemporaryDirectory() as tmp:  # the task's own protocol reads the per-item scores off the cache
        t = Path(tmp)
        write_items(items, t / "items.parquet")
        grid = {"lambdas": [], "ks": [], "sigmas": []}
        sweep_task(out_npz, out_json, t / "items.parquet", {**p, "grid": grid, "point": None}, None, t / "s.csv",
                   t / "s.parquet", t / "pred.parquet", t / "summary.json")
        mine = pl.read_parquet(t / "pred.parquet")
    df = knn.select("task", "category", "id", "question", "answer", "base_pred", "knn_pred", "base_score",
                    "knn_score").with_columns(
        incontext_pred=mine["base_pred"], incontext_score=mine["base_score"],
        passage_start=pl.Series([int(passages.spans[i[0], 0]) if i[0] >= 0 else -1 for i in top], dtype=pl.Int64),
        passage=pl.Series(texts, dtype=pl.Utf8),
    )
    write_table(df, csv, parquet)
    out = {"task": p["task"], "datastore": p["datastore"], "category": entry["category"], "n": len(items),
           "knn_predictions_sha256": sha256_file(knn_predictions), "task_cache_sha256": sha256_file(out_npz),
           "passages_meta_sha256": passages.digest, "parquet_sha256": sha256_file(parquet),
           "no_passage": int((top[:, 0] < 0).sum()), "seconds": round(time.time() - t0, 2)}
    write_json(record_json, out)
    log.info("%s: base %.3f, kNN-LM %.3f, in-context %.3f over %d items", p["task"], df["base_score"].mean(),
             df["knn_score"].mean(), df["incontext_score"].mean(), len(items))
    return out


def task_table(records: list, seed: int, n_boot: int) -> pl.DataFrame:
    """Per (datastore, task) and per (datastore, category) over its tasks' items: the mean score of the base LM,
    the kNN-LM and in-context retrieval, and each one's Δ against the base LM with its 95% paired bootstrap interval
    (``bootstrap_delta``, as the task Δ table)."""
    frames = []
    for f in records:
        record, df = read_scored(f)
        frames.append(df.with_columns(pl.lit(record["datastore"]).alias("datastore")))
    df = pl.concat(frames, how="vertical_relaxed")
    rows = []
    for keys in (["datastore", "category", "task"], ["datastore", "category"]):
        for key, g in df.group_by(keys, maintain_order=True):
            base = g["base_score"].to_numpy()
            task = key[2] if len(key) == 3 else f"all {key[1]}"
            for m in ("base", "knn", "incontext"):
                scores = g[f"{m}_score"].to_numpy()
                d, lo, hi = bootstrap_delta(base, scores, n_boot=n_boot, seed=seed)
                rows.append({"datastore": key[0], "category": key[1], "task": task, "method": m, "n": g.height,
                             "score": float(scores.mean()), "delta": d, "lo": lo, "hi": hi})
    return pl.DataFrame(rows).sort(["datastore", "category", "task", "method"])


@step(name="incontext-task")
def incontext_task(params: dict, model_json: Path, passages: Path, ds_tokens: Path, items: Path,
                   predictions: Path, npz: Path, scored_json: Path, csv: Path, parquet: Path, record: Path,
                   threads: int = 1) -> None:
    """Score a task with the top passage(s) of a datastore's corpus before each prompt (base LM), beside the base
    LM's and the kNN-LM's per-item scores (--predictions: the task's predictions.parquet)."""
    from ..lm import torch_threads

    torch_threads(threads)
    score_incontext(model_json, passages, ds_tokens, items, predictions, params, npz, scored_json, csv, parquet,
                    record)


@step(name="incontext-task-table")
def incontext_task_table(params: dict, records: list[Path], csv: Path, parquet: Path) -> None:
    """The task scores of the base LM, the kNN-LM and in-context retrieval, per task and per category, with Δ and
    95% bootstrap intervals."""
    write_table(task_table(records, params["seed"], params["n_boot"]), csv, parquet)
